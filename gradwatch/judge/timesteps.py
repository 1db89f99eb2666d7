"""Gradient through time, per recurrent module: the measured profiles of a view.

Read from the ``through_time`` series of ``measure/extensions/recurrent.py``: per module and
detail step, the sequence length and the input-gradient norm at ``PROFILE_POINTS`` timesteps
(``history.sampled_timesteps``). The through-time detector judges them; the report plots
them (:func:`report_series`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..history import PROFILE_POINTS, sampled_timesteps
from .context import Context

__all__ = ["Measured", "measurements", "report_series"]


@dataclasses.dataclass
class Measured:
    """The through-time measurements of one recurrent module on the steps of a view."""

    rnn: dict[str, Any]  # the module's facts (``history.facts["recurrent"]``)
    name: str  # display name (the layer's, as in the report)
    steps: np.ndarray  # measured steps
    lengths: np.ndarray  # sequence length per measured step
    profile: np.ndarray  # (steps, PROFILE_POINTS) norms at sampled_timesteps(length)
    mean: np.ndarray  # mean norm over all timesteps, per step

    def last(self) -> np.ndarray:
        """Norm at the last timestep, per step."""
        idx = np.minimum(self.lengths, PROFILE_POINTS).astype(int) - 1
        return self.profile[np.arange(len(self.steps)), idx]

    def ratio(self) -> np.ndarray:
        """First timestep's norm / last timestep's, per step (NaN where undefined)."""
        last = self.last()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.isfinite(last) & (last > 0), self.profile[:, 0] / last, np.nan)

    def decay(self, rows: np.ndarray) -> float | None:
        """Geometric-mean factor per timestep, from the earliest timestep whose gradient is
        not 0 (it can underflow even float32's smallest number) to the last; median."""
        rates = []
        for r in np.nonzero(rows)[0]:
            length = int(self.lengths[r])
            ts = sampled_timesteps(length)
            g = self.profile[r, : len(ts)]
            ok = np.nonzero(np.isfinite(g[:-1]) & (g[:-1] > 0))[0]
            if not ok.size or not (np.isfinite(g[-1]) and g[-1] > 0):
                continue
            j = int(ok[0])
            rates.append((g[j] / g[-1]) ** (1.0 / (ts[-1] - ts[j])))
        return float(np.median(rates)) if rates else None

    def relative_profile(self, rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
        """At the most common length among ``rows``: the length, the sampled timesteps and
        the median of each one's norm relative to the last timestep's."""
        lengths = self.lengths[rows]
        if not lengths.size:
            return None
        values, counts = np.unique(lengths, return_counts=True)
        length = int(values[np.argmax(counts)])
        ts = sampled_timesteps(length)
        sel = rows & (self.lengths == length)
        g = self.profile[sel, : len(ts)]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = g / g[:, -1:]
        return length, ts, np.nanmedian(rel, axis=0)


def measurements(ctx: Context) -> list[Measured]:
    """Every recurrent module of this view that was measured at least once."""
    series = ctx.h.extra.get("through_time")
    rnns = ctx.facts.get("recurrent") or []
    if series is None or not rnns:
        return []
    steps = series.steps
    in_view = np.isin(steps, ctx.steps) if ctx.root is not None else np.ones(len(steps), bool)
    length, mean, profile = (series.block(k) for k in ("length", "mean", "profile"))
    out = []
    for rnn in rnns:
        if ctx.root is not None and rnn.get("root") != ctx.root:
            continue
        k = int(rnn["column"])
        if k >= length.shape[1]:
            continue
        rows = in_view & np.isfinite(length[:, k]) & (length[:, k] >= 2)
        if not rows.any():
            continue
        name = ctx.name(rnn["layer"]) if rnn.get("layer") is not None else rnn["name"]
        out.append(Measured(rnn, name, steps[rows], length[rows, k].astype(int),
                            profile[rows, k * PROFILE_POINTS:(k + 1) * PROFILE_POINTS],
                            mean[rows, k]))
    return out


def report_series(ctx: Context) -> dict[str, Any]:
    """For the report's ``series``: per recurrent module, the measured steps and the ratio of
    the first timestep's input gradient to the last one's."""
    out: dict[str, Any] = {}
    for m in measurements(ctx):
        ratio = m.ratio()
        out[m.name] = {"step": m.steps.tolist(),
                       "ratio_first_to_last_timestep": [float(r) if np.isfinite(r) else None
                                                        for r in ratio],
                       "sequence_length": m.lengths.tolist()}
    return out
