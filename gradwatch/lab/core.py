"""The lab's building blocks: an experiment is a seed's claim, its arms, and a judge.

Every experiment reproduces one claim of the seed documents (``shared/SEEDS.md``) exactly as
the seed writes it, runs each arm under :func:`gradwatch.watch` over several torch seeds,
and asks its *judge* for a :class:`Verdict`: does the claim hold, what was observed (numbers
with their spread over seeds), the measured reason (from gradwatch's findings), and the
repair that really works (an arm with ``role="repair"``, run side by side).

An experiment module defines its arms as functions ``run(seed, steps=...) -> RunResult``
(the length defaults to the one the experiment describes) and one :class:`Experiment`;
``gradwatch/lab/__init__.py`` lists them all in ``EXPERIMENTS``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch.report import Report

__all__ = ["Arm", "ArmResults", "Experiment", "RunResult", "Verdict", "at_steps", "depth_ratio",
           "deviating", "fit", "int_range", "most_seeds", "n_steps", "percent", "run_length",
           "spread", "stat"]

VERDICTS = ("holds", "does not hold", "partly")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One watched training run of one arm with one seed."""

    experiment: str
    variant: str
    claim: str
    final_loss: float  # the last step's loss, as the seed's loop records it
    losses: list[float]
    report: Report
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Experiment-specific measurements beyond the loss (accuracy, output spread between
    repeated evaluations, dead fraction...), JSON-able numbers."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One side of an experiment: as the seed writes it, or a repair run side by side."""

    name: str
    claim: str  # the seed's claim about this arm ("" for a repair the seed does not make)
    description: str  # the exact setup: data, layers, init, optimizer, lr, steps
    run: Callable[..., RunResult]
    """``run(seed)`` trains the arm as described. Every arm also takes its length as a
    keyword, ``steps`` (full-batch arms) or ``epochs`` (mini-batch arms), whose default is
    the described one: tests pass fewer where the verdict they check does not need more."""
    role: str = "seed"  # "seed" | "repair"

    def __post_init__(self) -> None:
        if self.role not in ("seed", "repair"):
            raise ValueError(f"arm role must be 'seed' or 'repair', got {self.role!r}")


class ArmResults(dict[str, list[RunResult]]):
    """Arm name -> its runs (one per seed, in seed order), handed to a judge."""

    def losses(self, arm: str) -> list[float]:
        """Final losses of an arm's runs (NaN for a non-finite one)."""
        return [r.final_loss if math.isfinite(r.final_loss) else math.nan for r in self[arm]]

    def metric(self, arm: str, name: str) -> list[float]:
        """One metric of an arm's runs, NaN where a run did not record it."""
        return [float(r.metrics.get(name, math.nan)) for r in self[arm]]

    def kinds(self, arm: str, *severities: str) -> list[set[str]]:
        """Per run: the finding kinds of these severities (default warning and error)."""
        wanted = severities or ("warning", "error")
        return [{f.kind for f in r.report.findings if f.severity in wanted} for r in self[arm]]

    def finding(self, arm: str, kind: str, run: int = 0) -> Any:
        """The first finding of ``kind`` in one run's report, or None."""
        return next((f for f in self[arm][run].report.findings if f.kind == kind), None)

    def every(self, arm: str, kind: str) -> bool:
        """Whether every run of the arm has a warning/error finding of ``kind``."""
        return all(kind in k for k in self.kinds(arm))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What an experiment showed: the verdict on the seed's claim and why."""

    verdict: str  # "holds" | "does not hold" | "partly"
    observed: str  # what was measured, numbers with their spread over seeds
    reason: str  # the measured reason, from gradwatch's findings
    repair: str  # the repair that really works, with its numbers

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A seed's claim, the arms that test it, and the judge that reads their results."""

    name: str  # identifier on the command line: gradwatch lab NAME
    source: str  # "seed 002 #1"
    title: str
    claim: str  # the seed's claim, translated, as close to its words as English allows
    setup: str  # what is run, and where the lab departs from the seed (and why)
    arms: tuple[Arm, ...]
    judge: Callable[[ArmResults], Verdict]
    cost_s: float = 5.0  # rough seconds per seed on 2 cores, for the progress display's ETA
    #: The figure beside the loss on the index's first screen: "layers" (the gradient flow
    #: across layers of the seed's arm and its repair), "through_time" (every arm's
    #: gradient reaching the first timestep / the last one's, over the run) or
    #: "dead_units" (every arm's largest dead ReLU fraction in any layer, over the run).
    evidence: str = "layers"

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
        steps: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        before_step: Callable[[int], None] | None = None,
        **watch_options: Any) -> tuple[list[float], Report]:
    """The lab's full-batch loop under ``gradwatch.watch``: zero_grad, loss, backward,
    ``before_step(step)`` (clipping, when an arm clips), step; every step's loss recorded
    with ``loss.item()`` as the seeds' loops do. Returns the losses and the report."""
    loss_fn = loss_fn or nn.functional.mse_loss
    losses: list[float] = []
    with gradwatch.watch(model, optimizer, **watch_options) as gw:
        for step in range(steps):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if before_step is not None:
                before_step(step)
            optimizer.step()
            losses.append(loss.item())
    return losses, gw.report()


def depth_ratio(report: Report) -> float:
    """Median over the run of the first weight layer's gradient norm / the last one's, from
    the report's series (layers in forward order): how much gradient reaches the input side."""
    data = report.to_dict()
    grads = data["series"].get("grad_norm", {})
    weighted = [layer["name"] for layer in data["layers"]
                if (data["facts"].get("layers", {}).get(layer["name"]) or {}).get("fan_in")]
    names = [n for n in weighted if n in grads] or list(grads)
    if len(names) < 2:
        return math.nan
    first = np.array([np.nan if v is None else v for v in grads[names[0]]], dtype=float)
    last = np.array([np.nan if v is None else v for v in grads[names[-1]]], dtype=float)
    ok = np.isfinite(first) & np.isfinite(last) & (last > 0)
    return float(np.median(first[ok] / last[ok])) if ok.any() else math.nan


def stat(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the finite values (NaN when none), and how many were not."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    finite = v[np.isfinite(v)]
    out = {"median": float(np.median(finite)) if finite.size else math.nan,
           "min": float(finite.min()) if finite.size else math.nan,
           "max": float(finite.max()) if finite.size else math.nan}
    if finite.size < v.size:
        out["nonfinite"] = int(v.size - finite.size)
    return out


def spread(values: Sequence[float], digits: int = 3, unit: str = "") -> str:
    """``9.76 (9.75-9.77 over 3 seeds)``; non-finite runs are counted, not averaged.
    ``unit`` follows the median and the range: ``84.4% (81.2-90.6% over 3 seeds)``."""
    s = stat(values)
    n = len(values)
    bad = s.get("nonfinite", 0)
    if bad == n:
        return f"NaN/Inf on all {n} seeds"
    text = _num(s["median"], digits) + unit
    if n > 1 and _num(s["min"], digits) != _num(s["max"], digits):
        text += f" ({_num(s['min'], digits)}-{_num(s['max'], digits)}{unit} over {n} seeds)"
    elif n > 1:
        text += f" (all {n} seeds)"
    if bad:
        text += f"; NaN/Inf on {bad} of {n}"
    return text


def _num(x: float, digits: int) -> str:
    if not math.isfinite(x):
        return "NaN"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def percent(values: Sequence[float]) -> str:
    """Fractions as a percentage with their spread: ``84.4% (81.2-90.6% over 3 seeds)``."""
    return spread([100 * v for v in values], 3, "%")


def most_seeds(flags: Sequence[bool]) -> bool:
    """True on every seed, or on all but one when there are more than two."""
    return sum(flags) >= (len(flags) - 1 if len(flags) > 2 else len(flags))


def deviating(flags: Sequence[bool]) -> str:
    """`` (not on seed 1, 2)`` for the seeds where a condition failed, else ``""``."""
    bad = [str(i) for i, ok in enumerate(flags) if not ok]
    return f" (not on seed {', '.join(bad)})" if bad else ""


def int_range(values: Sequence[float]) -> str:
    """``3`` when every finite value is 3, ``1-4`` when they range from 1 to 4, ``"?"`` when
    none is finite: counts and step numbers measured over seeds, for a verdict's text."""
    finite = sorted({int(v) for v in values if v is not None and math.isfinite(v)})
    if not finite:
        return "?"
    return str(finite[0]) if len(finite) == 1 else f"{finite[0]}-{finite[-1]}"


def at_steps(values: Sequence[float]) -> str:
    """``step 1`` when every run measured step 1, ``steps 0-3`` when they differ."""
    text = int_range(values)
    return f"step{'s' if '-' in text else ''} {text}"


def n_steps(values: Sequence[float]) -> str:
    """``1 step``, ``2 steps``, ``1-2 steps``: a number of steps measured over seeds."""
    text = int_range(values)
    return f"{text} step{'' if text == '1' else 's'}"


def run_length(results: ArmResults, *arms: str) -> str:
    """How many steps the runs of ``arms`` (default: every arm) recorded: ``500``, or
    ``200-500`` if they differ. Verdicts quote it instead of the length the arm was
    written with, so that a run with fewer steps is described as it ran."""
    return int_range([len(run.losses) for arm in (arms or tuple(results))
                      for run in results[arm]])
