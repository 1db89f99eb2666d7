"""``gradwatch run --verify``: prove a remedy on the user's own, unmodified script.

* ``run.verify_report`` (the parent) re-runs the script in fresh processes
  (``launch``), one per remedy of each warning/error finding plus one baseline without any
  remedy, all for the same bounded number of steps; ``search`` decides which remedies and
  pairs of remedies to run, ``verdict`` turns their outcomes into each remedy's
  ``verified`` record;
* ``child.ChildControl`` (inside the re-run) applies the remedies to the script's live model
  before its first forward and to its optimizer before its first step, and stops the script
  cleanly after ``--max-steps`` steps.

Re-runs start from the user's script file, never a copy, and never write to it. Each runs
in its own temporary folder (its current directory), so that whatever the script writes
(checkpoints, logs) lands there and not over the user's files. The script's own folder is
on ``sys.path`` as in a normal run; data read by a path relative to the current folder is
not found, which the report says when the baseline fails.
"""
