"""When a ``--verify`` re-run's outcome is settled, so that it stops there.

A re-run is as long as the user's own run by default; most of them need not be. Every
``every`` steps the re-run's recent loss is compared with the run without the remedy (the
reference) over the same steps:

* **repaired**: for ``patience`` checks in a row the loss is below the reference's best over
  its whole run and at least ``MARGIN`` better than the reference at the same step, and then
  none of the problems the remedy is for is found on the re-run so far;
* **no better**: from ``judge_from`` of the budget on, and only once the reference has shown
  its problem, for ``patience`` checks in a row the loss is not ``MARGIN`` better than the
  reference at the same step (or not finite) and is not catching up with it: a remedy that
  starts slower (a normalisation, a lower rate) but gains on the reference runs on.

Before the reference's problem begins there is nothing to compare: a remedy for an
explosion at step 300 looks like no remedy at step 100. The verdict then compares both runs
over the same steps, those before the stop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .verdict import MARGIN, window_loss

__all__ = ["CATCHING_UP", "Settle", "Settler", "best_window_loss"]

#: A re-run behind the reference is catching up when its loss ratio to the reference fell
#: by more than this factor over the last ``patience`` checks.
CATCHING_UP = 1.05

Losses = Sequence[tuple[int, "float | None"]]


def best_window_loss(losses: Losses, total: int, every: int) -> float | None:
    """The lowest finite window loss of ``losses`` at the check steps up to ``total``."""
    best: float | None = None
    for count in range(every, total + 1, every):
        value = window_loss([(s, v) for s, v in losses if s < count], count)
        if value is not None and (best is None or value < best):
            best = value
    return best


@dataclasses.dataclass(frozen=True)
class Settle:
    """The rule a re-run stops by, with its reference run (picklable and JSON-able, so
    that it reaches a forked or a spawned re-run alike)."""

    reference: tuple[tuple[int, float | None], ...]
    """(step, loss) of the run without the remedy."""
    kinds: tuple[str, ...]
    """The problems (finding kinds) that must be gone for a repaired stop."""
    onset: int
    """The first step at which the reference shows any of them."""
    total: int
    """The re-run's step budget."""
    every: int
    patience: int = 3
    judge_from: float = 0.3

    @classmethod
    def for_run(cls, losses: Iterable[tuple[int, float | None]], findings: Iterable[Any],
                total: int) -> Settle:
        """The rule for re-runs of ``total`` steps of a remedy for ``findings`` (the
        warning/error findings that offer it) against a run with these ``losses``."""
        problems = [f for f in findings if f.severity in ("warning", "error")]
        onset = min((int(f.first_step) for f in problems if f.first_step is not None),
                    default=0)
        reference = tuple((int(s), None if v is None else float(v)) for s, v in losses
                          if s is not None and s < total)
        return cls(reference, tuple(sorted({f.kind for f in problems})), onset, total,
                   every=max(5, total // 20))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settle:
        data = dict(data)
        data["reference"] = tuple((int(s), v) for s, v in data["reference"])
        data["kinds"] = tuple(data["kinds"])
        return cls(**data)


class Settler:
    """One re-run's checks against its :class:`Settle` rule."""

    def __init__(self, rule: Settle) -> None:
        self.rule = rule
        self.best = best_window_loss(rule.reference, rule.total, rule.every)
        self.good = self.bad = 0
        self.reason: str | None = None
        self.gaps: list[float] = []  # own / reference loss at each check, once judged

    def check(self, count: int, losses: Losses,
              problems_now: Callable[[], set[str]]) -> str | None:
        """After ``count`` steps with ``losses``: "repaired", "no_better" or None (go on).
        ``problems_now`` judges the re-run so far; called only when the loss says
        repaired."""
        rule = self.rule
        if count % rule.every or count >= rule.total:
            return None
        width = max(1, round(count * 0.1))
        if count < rule.onset + width:
            return None  # the reference has not shown its problem yet
        own = window_loss([(s, v) for s, v in losses if s < count], count)
        ref = window_loss([(s, v) for s, v in rule.reference if s < count], count)
        first = next((v for _, v in losses if v is not None), None)
        if own is None:
            better = False
        elif ref is None:  # the reference is not finite here: better only if it learns
            better = first is not None and math.isfinite(first) and own < 0.9 * first
        else:
            better = ref >= MARGIN * own and (self.best is None or own <= self.best)
        self.good = self.good + 1 if better else 0
        # Not finite with the remedy is no better, whatever the reference did.
        no_better = own is None or (ref is not None and ref < MARGIN * own)
        judged = count >= rule.judge_from * rule.total
        if own is not None and ref is not None and ref > 0:
            self.gaps.append(own / ref)
            earlier = self.gaps[-rule.patience] if len(self.gaps) >= rule.patience else None
            if earlier is not None and self.gaps[-1] < earlier / CATCHING_UP:
                no_better = False  # behind, but gaining on the reference: let it run
        self.bad = self.bad + 1 if no_better and judged else 0
        if self.good >= rule.patience:
            if not problems_now() & set(rule.kinds):
                self.reason = "repaired"
                return self.reason
            self.good = 0  # the loss is fine but the problem is still there: go on
        if self.bad >= rule.patience:
            self.reason = "no_better"
            return self.reason
        return None
