"""What a report could not see, in sentences a person reads before trusting "no problems"."""

from __future__ import annotations

from typing import Any

__all__ = ["cadence_sentence", "coverage_notes"]

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


def _nth(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def cadence_sentence(run: dict[str, Any]) -> str | None:
    """gradwatch's measured share of the step, and the detail cadence it kept to."""
    c = run.get("cadence")
    share = c.get("overhead") if c else None
    if share is None:
        return None
    stretch = c["detail_every"]
    detail = f"detail steps every {_nth(stretch[0]['every'])}"
    if len(stretch) > 1:
        detail = (f"detail steps stretched from every {_nth(stretch[0]['every'])} step to "
                  f"every {_nth(stretch[-1]['every'])} by step {stretch[-1]['from_step']}")
    cost = c.get("cost_ms") or {}
    ms = ""
    if all(isinstance(cost.get(k), (int, float)) for k in ("plain_step", "detail_step",
                                                           "user_step")):
        ms = (f" ({cost['plain_step']:.2g} ms a step, {cost['detail_step']:.2g} ms a detail "
              f"step; the script's own step {cost['user_step']:.3g} ms)")
    text = f"cost: gradwatch's own work took {share:.1%} of the step{ms}"
    turns = c.get("site_turns", 1)
    if turns > 1:
        detail += f", each activation site on every {_nth(turns)} of them (too many to " \
                  f"measure all on one)"
    budget = c.get("overhead_budget")
    if budget is None:
        return f"{text}; {detail} (overhead=None: a fixed cadence)."
    if share <= budget * 1.05:
        return f"{text}, within its {budget:.0%} budget; {detail}."
    plain, user = cost.get("plain_step"), cost.get("user_step")
    if isinstance(plain, (int, float)) and isinstance(user, (int, float)) and user > 0 \
            and plain / user > budget:
        why = ("on a step this short its per-step work alone (gradient norms, hook calls) "
               "costs more than that (every=2 measures the gradient norms every 2nd step)")
    else:
        why = (f"a run this short keeps at least one detail step in {c['density']} for the "
               f"detectors")
    return f"{text}, over its {budget:.0%} budget: {why}; {detail}."
