"""Findings linked by cause: a root finding (an explosion, a NaN) and the findings it brought
about (units that died, a loss that diverged or stalled after it), so that the report names
the root once and each consequence says what it follows from."""

from __future__ import annotations

from ..findings import Cause, Finding
from ..thresholds import Thresholds

__all__ = ["CAUSES", "CONSEQUENCES", "ROOTS", "link"]

ROOTS = ("nonfinite", "exploding_gradient")
"""Kinds that can bring others about, strongest first: a finding is linked to the first root
that explains it."""
CONSEQUENCES = ("dying_relu", "saturated_activation", "loss_divergence", "loss_plateau",
                "loss_spike", "exploding_gradient")
"""Kinds a blow-up brings about: units pushed to a dead or saturated regime by oversized
updates, a loss that rises or stalls after them (an explosion is itself the consequence of a
NaN only when it began before it, so it is listed for that case)."""
CAUSES = ("follows_explosion", "follows_nonfinite")
"""The ids of the causes this module adds to a consequence."""
_SEVERITY = {"info": 0, "warning": 1, "error": 2}
_BROUGHT = " It brought on the findings that follow it"
_WHAT = {"nonfinite": ("nonfinite", "values turned NaN/Inf"),
         "exploding_gradient": ("explosion", "the gradients exploded")}


def _explains(root: Finding, other: Finding, window: int) -> bool:
    """``other`` began at or after the root's start and no later than ``window`` steps after
    the root was fully under way (its start, or for a gradient that grew over many steps the
    step it passed its limit): close enough to be its consequence, not a problem the run had
    anyway."""
    if other is root or other.kind not in CONSEQUENCES or other.kind == root.kind:
        return False
    if root.kind == "nonfinite" and other.kind == "exploding_gradient":
        return False  # an explosion before the NaN is the NaN's cause, not its consequence
    under_way = max(root.first_step, int(root.evidence.get("growth_past_limit_step") or 0))
    return root.first_step <= other.first_step <= under_way + window


def link(findings: list[Finding], thresholds: Thresholds) -> list[Finding]:
    """Link each finding to the root that brought it about, in place; returns ``findings``.

    A consequence gets the cause ``follows_explosion`` / ``follows_nonfinite`` after its
    own causes (they say how the blow-up did it) and ``evidence["root"]`` (the root's kind
    and first step); the root gets
    ``evidence["consequences"]`` (kind and first step of each) and a severity at least that
    of its worst consequence: the problem that brought on an error is one too. The window is
    ``consequence_window_steps``.
    """
    window = thresholds.consequence_window_steps
    linked: set[int] = set()
    for kind in ROOTS:
        for root in (f for f in findings if f.kind == kind):
            if id(root) in linked:
                continue  # already a consequence of a stronger root
            follows = [f for f in findings if id(f) not in linked and _explains(root, f, window)]
            if not follows:
                continue
            word, what = _WHAT[kind]
            for f in follows:
                linked.add(id(f))
                f.evidence["root"] = {"kind": root.kind, "first_step": root.first_step}
                lag = f.first_step - root.first_step
                when = "at the same step" if lag == 0 else \
                    f"{lag} step{'s' if lag > 1 else ''} later"
                f.causes.append(Cause(f"follows_{word}", (
                    f"{what} from step {root.first_step} ({root.kind}, the root finding) and "
                    f"this began {when}: it is a consequence; repair the {root.kind} first")))
            known = root.evidence.setdefault("consequences", [])
            if known:  # a whole-run root linked again from another model's findings
                root.summary = root.summary[: root.summary.rindex(_BROUGHT)]
            known += [{"kind": f.kind, "first_step": f.first_step} for f in follows]
            worst = max(follows, key=lambda f: _SEVERITY[f.severity]).severity
            if _SEVERITY[worst] > _SEVERITY[root.severity]:
                root.evidence["severity_from"] = (
                    f"raised from {root.severity}: it brought on {worst}-level findings")
                root.severity = worst
            kinds = ", ".join(dict.fromkeys(c["kind"] for c in known))
            root.summary += (f"{_BROUGHT} ({kinds}, from step "
                             f"{min(c['first_step'] for c in known)}).")
    return findings
