"""What the measurements say: the shared facts, causes and remedies of the predictions.

:class:`Measured` holds the host-side tables, and the same measurements as a one-step
History (:attr:`Measured.context`), so that the causes (init scale, depth, inputs) are
checked by the training-time judge's own code (``judge.causes``); they serve several
finding kinds, which live in :mod:`.flow` (gradients through depth) and :mod:`.units`
(dead and saturated activation units).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from ..findings import Cause, Remedy
from ..history import History, LayerInfo
from ..judge import causes as C
from ..judge.advice import remedies_for_depth
from ..judge.context import Context, Group, fmt
from ..thresholds import Thresholds
from .tables import finite

"""Activations for which Kaiming init is the right scale."""
SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
"""Findings sort by this, most severe first."""


def label(name: str) -> str:
    """``layer 0`` for an nn.Sequential index, so that a bare number reads as a layer."""
    return f"layer {name}" if name.replace(".", "").isdigit() else name


@dataclasses.dataclass
class Measured:
    """Everything the predictions read, on the host."""

    t: Thresholds
    rows: list[dict[str, Any]]
    sites: list[dict[str, Any]]
    inp: dict[str, float] | None
    out_rms: float | None
    out_nonfinite: int
    loss: float | None
    graph: Any

    @property
    def weight_rows(self) -> list[dict[str, Any]]:
        """Layers with a weight matrix/kernel that ran and got a gradient, input side first."""
        return [r for r in self.rows if r["ran"] and r["fan_in"] is not None
                and r["grad_norm"] is not None]

    def row(self, name: str | None) -> dict[str, Any] | None:
        """The layer row of that name, if any."""
        return next((r for r in self.rows if r["name"] == name), None)

    @functools.cached_property
    def context(self) -> Context:
        """The measurements as a one-step History, as the training-time judge reads one: the
        causes are checked by the same code (``judge.causes``) as during training."""
        h = History()
        h.roots.append("model")
        for depth, r in enumerate(self.rows):
            info = LayerInfo(name=r["name"], type=r["type"], params=r["params"], root=0,
                             order=depth, fan_in=r["fan_in"], fan_out=r["fan_out"],
                             activation=r["activation"])
            if r["init"]:
                info.init_scale = {**r["init"], "activation": r["activation"] or "unknown"}
            h.add_layer(info)
        step = np.array([0])
        n = len(self.rows)
        h.record_steps(step, np.array([_num(self.loss)]), np.array([self.loss is not None]),
                       np.array([[_num(r["grad_norm"]) for r in self.rows]]), np.zeros((1, n)))
        inp = self.inp or {}
        io = {"output_spread": math.nan, "input_rms": inp.get("rms"),
              "input_mean": inp.get("mean"), "input_std": inp.get("std"),
              "output_rms": self.out_rms}
        empty = np.full((1, n), np.nan)
        h.record_detail(step, {"weight_norm": empty, "update_norm": empty,
                               "grad_norm_applied": empty,
                               "act_rms": np.array([[_num(r["output_rms"]) for r in self.rows]]),
                               "model_io": np.array([[_num(io[k]) for k in History.MODEL_IO]])})
        if self.graph is not None:
            h.facts["graph"] = {"0": {"norm_ops": self.graph.norm_ops,
                                      "branch_merges": self.graph.branch_merges,
                                      "activations": dict(self.graph.activations)}}
        return Context(h, self.t)

    def group(self, rows: list[dict[str, Any]]) -> Group:
        """These layer rows as a depth group of the one-step History."""
        column = {r["name"]: i for i, r in enumerate(self.rows)}
        return Group(0, "model", [column[r["name"]] for r in rows])


def _num(x: float | None) -> float:
    return math.nan if x is None else float(x)


def init_cause(m: Measured, rows: list[dict[str, Any]], kind: str) -> Cause | None:
    """Most weight layers initialised far below ("small") or above ("large") Kaiming/Xavier."""
    return C.init_scale(m.context, m.group(rows), (kind,))


def span(rows: list[dict[str, Any]]) -> str:
    """A list of layer names, shortened to its ends when longer than three."""
    return C.span([label(r["name"]) for r in rows])


def depth_causes(m: Measured, rows: list[dict[str, Any]],
                 init_kinds: tuple[str, ...]) -> list[Cause]:
    """Depth-related causes that hold for ``rows``: saturating stack, init scale (of the
    ``init_kinds``, "small" and/or "large"), shrinking forward signal, plain deep stack."""
    ctx, group = m.context, m.group(rows)
    found = [C.saturating_activation(ctx, group),
             *(C.init_scale(ctx, group, (kind,)) for kind in init_kinds),
             C.signal_shrinks_forward(ctx, group), C.deep_plain_stack(ctx, group)]
    return [c for c in found if c is not None]


def geomean(values: list[float]) -> float:
    """Geometric mean of the positive values (NaN without any)."""
    pos = [v for v in values if v > 0]
    return float(np.exp(np.mean(np.log(pos)))) if pos else math.nan


def has(causes: list[Cause], *ids: str) -> bool:
    """Whether any of ``causes`` has one of ``ids``."""
    return any(c.id in ids for c in causes)


def init_ratio(rows: list[dict[str, Any]]) -> str | None:
    """Median init std / Kaiming-or-Xavier std of ``rows``, formatted, for remedy texts."""
    ratios = [r["init"]["ratio"] for r in rows if r["init"] and finite(r["init"]["ratio"])]
    return fmt(float(np.median(ratios))) if ratios else None


def depth_remedies(m: Measured, rows: list[dict[str, Any]],
                   causes: list[Cause]) -> list[Remedy]:
    """The init (and activation, normalisation, skip) that fits the causes found."""
    return remedies_for_depth([r["activation"] for r in rows], causes,
                              rows[len(rows) // 2]["fan_in"] if rows else None, len(rows),
                              init_ratio(rows))  # type: ignore[arg-type]


def ordered(m: Measured, names: list[str]) -> list[str]:
    """Layer names without repeats, in the order of the layer table."""
    rank = {r["name"]: k for k, r in enumerate(m.rows)}
    return sorted(set(names), key=lambda n: rank.get(n, len(rank)))


def input_cause(m: Measured) -> Cause | None:
    """Inputs far from unit scale (RMS outside ``input_scale_high`` and its inverse)."""
    return C.unscaled_inputs(m.context)
