"""``gradwatch lab`` and ``gradwatch demo``: run the lab's experiments and write the page.

``gradwatch demo`` is ``gradwatch lab`` with every experiment and the default seeds: the
README's main job. Both print each experiment's verdict and the path of the index page, and
open nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..report.atomic import write_text_atomic
from . import EXPERIMENTS
from .runner import run_lab

__all__ = ["DEFAULT_SEEDS", "main"]

DEFAULT_SEEDS = 3
DEFAULT_OUT = {"lab": "gradwatch-lab", "demo": "gradwatch-demo"}


class UsageError(Exception):
    """A problem with the user's arguments (exit status 2)."""


def _parser(command: str) -> argparse.ArgumentParser:
    names = ", ".join(EXPERIMENTS)
    if command == "demo":
        parser = argparse.ArgumentParser(
            prog="gradwatch demo",
            description="Run every lab experiment (the seed documents' claims about vanishing "
            "and exploding gradients, dying and saturating units, eval mode) over "
            f"{DEFAULT_SEEDS} seeds, with the repairs that really work side by side; print the "
            "verdicts and write an HTML page with plots. Opens nothing.")
    else:
        parser = argparse.ArgumentParser(
            prog="gradwatch lab",
            description="Run lab experiments (default: all) over several seeds and write "
            "their reports, lab.json and an index page with plots.",
            epilog=f"experiments: {names}")
        parser.add_argument("names", nargs="*", metavar="NAME",
                            help="experiments to run (default: all; --list shows them)")
        parser.add_argument("--list", action="store_true",
                            help="list the experiments with their seed documents and exit")
        parser.add_argument("--json", metavar="PATH",
                            help="also write lab.json's content to PATH ('-' for stdout)")
    parser.add_argument("--seeds", metavar="K", type=int, default=DEFAULT_SEEDS,
                        help=f"run torch seeds 0..K-1 (default {DEFAULT_SEEDS}; verdicts "
                        "need >= 3 to show a spread)")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT[command],
                        help=f"folder for the reports (default ./{DEFAULT_OUT[command]}; created "
                        "if missing; existing reports in it are overwritten)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line and no verdicts: print only the index's path")
    return parser


def _prepare_out(out: str) -> Path:
    """Create the output folder, or say why it cannot be used."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} is an existing file, not a folder: give a folder "
                         f"name (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {out!r}: "
                         f"{exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write into the output folder {out!r}: permission denied")
    return path


def main(argv: Sequence[str] | None = None, command: str = "lab") -> int:
    """Entry point of ``gradwatch lab`` / ``gradwatch demo``; returns the exit status."""
    parser = _parser(command)
    try:
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if getattr(ns, "list", False):
        for exp in EXPERIMENTS.values():
            print(f"{exp.name:24} {exp.source:14} {exp.title}")
        return 0
    names = getattr(ns, "names", []) or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    prog = f"gradwatch {command}"
    if unknown:
        print(f"{prog}: unknown experiment {', '.join(map(repr, unknown))}; known: "
              f"{', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    if ns.seeds < 1:
        print(f"{prog}: --seeds must be at least 1, got {ns.seeds}", file=sys.stderr)
        return 2
    try:
        out = _prepare_out(ns.out)
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    to_stdout = getattr(ns, "json", None) == "-"
    stream = None if ns.quiet or to_stdout else sys.stdout
    if stream is not None:
        stream.write(f"{prog}: {len(names)} experiment{'s' if len(names) != 1 else ''} x "
                     f"{ns.seeds} seed{'s' if ns.seeds != 1 else ''}, reports in {out}\n")
    try:
        lab = run_lab([EXPERIMENTS[n] for n in names], list(range(ns.seeds)), out, stream,
                      progress=not ns.quiet)
    except OSError as exc:
        print(f"{prog}: could not write the reports in {out}: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(lab, indent=2, allow_nan=False) + "\n"
    if to_stdout:
        sys.stdout.write(text)
    elif getattr(ns, "json", None):
        write_text_atomic(Path(ns.json), text)
    index = (out / "index.html").resolve()
    summary = {"holds": 0, "does not hold": 0, "partly": 0}
    for e in lab["experiments"]:
        summary[e["verdict"]] += 1
    n = len(lab["experiments"])
    line = (f"\n{n} experiment{'s' if n != 1 else ''} in {lab['duration_s']} s: "
            f"{summary['holds']} claims hold, {summary['partly']} partly, "
            f"{summary['does not hold']} do not.\nindex: {index}\n")
    (sys.stderr if to_stdout else sys.stdout).write(line if not ns.quiet else f"{index}\n")
    return 0
