"""The ``verified`` record of a remedy: its re-runs against the baseline, judged."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from ..remedies import CATALOGUE

__all__ = ["DETERMINISM_RTOL", "MARGIN", "WINDOW", "Outcome", "Parts", "Status", "Verified",
           "declares_all", "deterministic", "loss_at", "rank", "solved", "verdict", "window_loss"]

#: Share of a re-run's last steps whose mean loss is compared (at least one step).
WINDOW = 0.1
#: A remedy is "better" above this improvement (loss_before / loss_after), "worse" below
#: its inverse; in between it has no measurable effect.
MARGIN = 1.1
#: Relative tolerance when the baseline re-run's first losses are compared with the first
#: run's: the re-runs use one thread, the first run may use several, so sums can round
#: differently; an unseeded script differs by far more.
DETERMINISM_RTOL = 1e-3

#: One candidate: the remedies applied together in one re-run, as (id, params) pairs.
Parts = tuple[tuple[str, dict[str, Any]], ...]

Status = Literal["better", "fixed", "no_effect", "worse", "failed", "diagnostic",
                 "not_applicable", "not_finished", "not_tried"]


@dataclasses.dataclass
class Verified:
    """What ``--verify`` measured for one remedy (the report's ``verified``, see README)."""

    status: Status
    steps: int = 0
    loss_before: float | None = None
    loss_after: float | None = None
    improvement: float | None = None
    finding_gone: bool | None = None
    note: str | None = None
    new_findings: list[str] = dataclasses.field(default_factory=list)
    finding_in_baseline: bool = True
    changes: list[str] = dataclasses.field(default_factory=list)
    repeats: int | None = None  # with repeats (an unseeded script): how many ran, ...
    spread: dict[str, list[float | None]] | None = None  # ... the range of the losses ...
    finding_gone_runs: str | None = None  # ... and in how many the finding was gone
    settled: str | None = None  # the re-runs stopped early: "repaired" or "no_better"

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON: the contract's keys always, the others where they say
        something."""
        out: dict[str, Any] = {"steps": self.steps, "loss_before": self.loss_before,
                               "loss_after": self.loss_after, "improvement": self.improvement,
                               "finding_gone": self.finding_gone, "status": self.status}
        if self.new_findings:
            out["new_findings"] = list(self.new_findings)
        if self.note:
            out["note"] = self.note
        if not self.finding_in_baseline:
            out["finding_in_baseline"] = False
        if self.changes:
            out["changes"] = list(self.changes)
        if self.settled:
            out["settled"] = self.settled
        if self.repeats is not None:
            out["repeats"], out["spread"] = self.repeats, self.spread
            out["finding_gone_runs"] = self.finding_gone_runs
        return out


@dataclasses.dataclass
class Outcome:
    """One finished re-run, reduced to what the comparison needs."""

    status: str  # "ok", "failed", "not_finished", "not_applicable", "not_tried"
    steps: int = 0
    loss: float | None = None  # mean over the last WINDOW of steps; None: not finite
    first_loss: float | None = None
    losses: list[tuple[int, float | None]] = dataclasses.field(default_factory=list)
    kinds: set[str] = dataclasses.field(default_factory=set)
    changes: list[str] = dataclasses.field(default_factory=list)
    note: str | None = None
    #: The remedies the re-run's own report offers for what is still wrong, worst first.
    follow_ups: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    settled: str | None = None  # why it stopped before its budget: repaired, no_better


def window_loss(losses: list[tuple[int, float | None]], steps: int) -> float | None:
    """Mean loss over the last WINDOW of ``steps``; None when any of it is not finite."""
    if not losses:
        return None
    start = steps - max(1, round(steps * WINDOW))
    window = [v for s, v in losses if s >= start] or [losses[-1][1]]
    if any(v is None or not math.isfinite(v) for v in window):
        return None
    return sum(window) / len(window)  # type: ignore[arg-type]


def loss_at(outcome: Outcome, steps: int) -> float | None:
    """``outcome``'s window loss as it stood after ``steps`` steps: runs that stopped at
    different steps are compared over the same steps."""
    if outcome.steps == steps and outcome.loss is not None:
        return outcome.loss
    return window_loss([(s, v) for s, v in outcome.losses if s < steps], steps)


def deterministic(original: list[tuple[int, float | None]],
                   rerun: list[tuple[int, float | None]]) -> bool:
    """Do the first losses of the baseline re-run repeat those of the first run?"""
    first = dict(original)
    common = [(first[s], v) for s, v in rerun if s in first][:10]
    if not common:
        return False
    for a, b in common:
        if a is None or b is None:
            if a is not b:
                return False
        elif not math.isclose(a, b, rel_tol=DETERMINISM_RTOL, abs_tol=1e-12):
            return False
    return True


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _spread(values: list[float | None]) -> list[float | None]:
    finite = [v for v in values if v is not None]
    return [min(finite), max(finite)] if finite else [None, None]


def _declared(parts: Parts, what: str) -> list[Any]:
    """What the remedies of ``parts`` declare about themselves (``RemedyEntry.<what>``)."""
    return [getattr(CATALOGUE[rid], what) for rid, _ in parts if rid in CATALOGUE]


def declares_all(parts: Parts, what: str) -> bool:
    """Every remedy of ``parts`` is in the catalogue and declares ``what`` (``diagnostic``,
    ``loss_neutral``) about itself."""
    return bool(parts) and all(rid in CATALOGUE and getattr(CATALOGUE[rid], what)
                               for rid, _ in parts)


def verdict(kind: str, base: list[Outcome], runs: list[Outcome], steps: int,
            parts: Parts = ()) -> Verified:
    """The ``verified`` record of one remedy against the baseline, over its repeats."""
    # A remedy that removes what the detector measures cannot show the finding gone.
    blind = next((hides[kind] for hides in _declared(parts, "hides") if kind in hides), None)
    done = [r for r in runs if r.status == "ok"]
    if not done:
        worst = next((r for r in runs if r.status in ("failed", "not_applicable")), None) or \
            (runs[0] if runs else Outcome("not_finished", note="never started"))
        if worst.status == "failed" and declares_all(parts, "diagnostic"):
            # Stopping at the first bad value, and naming it, is what it is for.
            return Verified("diagnostic", note="a diagnostic, not a fix: it stopped the re-run "
                            f"where the first non-finite value appeared: {worst.note}")
        return Verified(worst.status, note=worst.note)  # type: ignore[arg-type]
    base_ok = [b for b in base if b.status == "ok"]
    # Same steps on both sides: a re-run that stopped once its outcome was settled is
    # compared with the run without the remedy up to that step, not to its end.
    at = min(r.steps for r in done)
    befores = [loss_at(b, at) for b in base_ok]
    afters = [loss_at(r, at) for r in done]
    before = _mean(befores) if base_ok else None
    after = _mean(afters)
    first = _mean([r.first_loss for r in done])
    gone = [kind not in r.kinds for r in done]
    finding_gone: bool | None = None if blind else sum(gone) * 2 > len(gone)
    in_baseline = not base_ok or any(kind in b.kinds for b in base_ok)
    improvement = before / after if before is not None and after not in (None, 0.0) \
        else None
    status: Status
    if after is None:
        status = "worse" if before is not None else "no_effect"
        note: str | None = "the loss is not finite with this remedy" + \
            ("" if before is not None else ", as without it")
    elif before is None:
        # Without the remedy the loss is not finite: finite is better only if it learns.
        learned = first is not None and after < 0.9 * first
        status = "better" if learned else "fixed" if finding_gone else "no_effect"
        note = "without it the loss is not finite; with it the loss " + \
            (f"falls from {first:.3g} to {after:.3g}" if learned else
             f"stays finite but does not fall ({after:.3g})")
    else:
        assert improvement is not None or after == 0.0
        ratio = improvement if improvement is not None else math.inf
        status = "better" if ratio >= MARGIN else "worse" if ratio <= 1 / MARGIN else \
            "no_effect"
        note = {"better": None, "no_effect": "no measurable effect on the loss",
                "worse": f"makes the loss worse: {before:.3g} -> {after:.3g}"}[status]
        if declares_all(parts, "loss_neutral"):
            # What it fixes is not the training loss (a validation forward in eval mode):
            # the training loss differs only by chance (another random stream for dropout).
            status = "fixed" if finding_gone and in_baseline else "no_effect"
            note = f"the training loss is not what it changes ({before:.3g} -> " \
                f"{after:.3g})" + ("" if status == "fixed" else "; the finding remains")
    # Problems the remedy brings that the run without it did not have.
    before_kinds = set().union(*(b.kinds for b in base_ok)) if base_ok else set()
    new = sorted(k for k in set().union(*(r.kinds for r in done)) - before_kinds
                 if sum(k in r.kinds for r in done) * 2 > len(done))
    if new:
        note = (note + "; " if note else "") + "but the re-run has new findings: " + \
            ", ".join(new)
    if blind:
        note = (note + "; " if note else "") + blind
    stops = {r.settled for r in done}
    if stops == {"no_better"}:
        note = (note + "; " if note else "") + f"stopped after {at} steps, no better than " \
            "the run without it at the same steps"
    elif stops == {"repaired"}:
        note = (note + "; " if note else "") + f"stopped after {at} steps, settled: the " \
            "problem gone and the loss below the best of the run without it"
    out = Verified(status, steps=at, loss_before=before,
                   loss_after=after, improvement=improvement, finding_gone=finding_gone,
                   note=note, new_findings=new, finding_in_baseline=in_baseline,
                   changes=next((r.changes for r in done if r.changes), []),
                   settled=next(iter(stops)) if len(stops) == 1 and None not in stops
                   else None)
    if len(runs) > 1:
        out.repeats = len(done)
        out.spread = {"loss_before": _spread(befores), "loss_after": _spread(afters)}
        out.finding_gone_runs = f"{sum(gone)}/{len(gone)}"
    return out


_RANK = {"better": 0, "fixed": 0, "no_effect": 1, "worse": 2, "diagnostic": 3, "failed": 3,
         "not_applicable": 4, "not_finished": 5, "not_tried": 5}


def rank(verified: dict[str, Any] | None) -> tuple[Any, ...]:
    """Sort key: better (or fixed) first; among those the finding gone, then the one that
    settled as repaired in the fewest steps (improvements measured at different steps do
    not compare), then the larger improvement (a fix that only ends non-finite values
    learns or it is not better), the lower loss, and no new findings."""
    if not verified:
        return (9, True, math.inf, 0.0, math.inf, True)
    improvement = verified.get("improvement")
    if improvement is None:
        improvement = math.inf if verified.get("status") == "better" else 0.0
    after = verified.get("loss_after")
    repaired_at = verified.get("steps", math.inf) \
        if verified.get("settled") == "repaired" else math.inf
    return (_RANK.get(verified.get("status", ""), 6), not verified.get("finding_gone"),
            repaired_at, -improvement, after if after is not None else math.inf,
            bool(verified.get("new_findings")))


def solved(verified: dict[str, Any] | None) -> bool:
    """A single remedy settles its finding: it helps, the finding goes, nothing new comes."""
    return bool(verified) and verified.get("status") in ("better", "fixed") and \
        bool(verified.get("finding_gone")) and not verified.get("new_findings")
