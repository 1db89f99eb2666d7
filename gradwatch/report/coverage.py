"""What a report could not see, in sentences a person reads before trusting "no problems"."""

from __future__ import annotations

from typing import Any

__all__ = ["coverage_notes"]

_FORWARD = ("its forward (activations: dead and saturated units, layer outputs, model input "
            "and output, the eval-mode check) is not measured; losses, gradients, weights and "
            "updates are")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def coverage_notes(data: dict[str, Any]) -> list[str]:
    """Sentences on the parts of the run that were not measured or not judged."""
    run, facts = data.get("run") or {}, data.get("facts") or {}
    notes: list[str] = []
    compiled = facts.get("compiled_roots") or []
    if compiled:
        notes.append(f"{_names(compiled)} ran through torch.compile: {_FORWARD}.")
    unseen = [n for n in facts.get("forward_unseen") or [] if n not in compiled]
    if unseen:
        notes.append(f"the forward of {_names(unseen)} was never seen outside compiled code "
                     f"(torch.compile, or only its submodules were called): {_FORWARD}.")
    detector_errors = run.get("detector_errors") or []
    measuring = [e for e in run.get("internal_errors") or [] if e not in detector_errors]
    if measuring:
        stopped = run.get("measured_steps")
        where = f" at step {stopped}" if isinstance(stopped, int) else ""
        notes.append(f"gradwatch hit {len(measuring)} internal error(s) and stopped "
                     f"measuring{where} (your run was not affected; the findings cover only "
                     f"the steps before): {measuring[0]}")
    for error in detector_errors:
        notes.append(f"{error}; what it would have shown is missing from this report (your "
                     f"run was not affected)")
    return notes
