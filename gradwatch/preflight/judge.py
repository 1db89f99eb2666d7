"""What the measurements say: the shared facts, causes and remedies of the predictions.

:class:`Measured` holds the host-side tables; the causes here (init scale, depth, inputs)
serve several finding kinds, which live in :mod:`.flow` (gradients through depth) and
:mod:`.units` (dead and saturated activation units).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..findings import Cause, Remedy
from ..judge.advice import remedies_for_depth
from ..judge.context import fmt
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


def init_cause(m: Measured, rows: list[dict[str, Any]], kind: str) -> Cause | None:
    """Most weight layers initialised far below ("small") or above ("large") Kaiming/Xavier."""
    scales = [r for r in rows if r["init"] and finite(r["init"]["ratio"])]
    if len(scales) < 2:
        return None
    low, high = m.t.init_scale_low, m.t.init_scale_high
    picked = [r for r in scales if (r["init"]["ratio"] < low if kind == "small"
                                    else r["init"]["ratio"] > high)]
    if len(picked) * 2 < len(scales):
        return None
    parts = []
    by_act: dict[str, list[dict[str, Any]]] = {}
    for r in picked:
        by_act.setdefault(r["activation"] or "none", []).append(r)
    for act, items in sorted(by_act.items(), key=lambda kv: -len(kv[1])):
        med = float(np.median([r["init"]["ratio"] for r in items]))
        fam = items[0]["init"]["family"].capitalize()
        after = "a layer without activation" if act in ("none", "unknown") else \
            f"the {act} that follows"
        ex = items[0]
        parts.append(f"{fmt(med)}x the {fam} std for {after} ({span(items)}; e.g. "
                     f"{label(ex['name'])}: std {fmt(ex['init']['std'])} vs "
                     f"{fmt(ex['init']['recommended_std'])})")
    text = f"weights start at {'; and '.join(parts)}: " + (
        "each layer shrinks the signal, forward and backward" if kind == "small"
        else "each layer multiplies the signal, forward and backward")
    return Cause(f"init_too_{kind}", text)


def span(rows: list[dict[str, Any]]) -> str:
    """A list of layer names, shortened to its ends when longer than three."""
    names = [label(r["name"]) for r in rows]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]}"


def depth_causes(m: Measured, rows: list[dict[str, Any]],
                 init_kinds: tuple[str, ...]) -> list[Cause]:
    """Depth-related causes that hold for ``rows``: saturating stack, init scale (of the
    ``init_kinds``, "small" and/or "large"), shrinking forward signal, plain deep stack."""
    causes: list[Cause] = []
    acts = [r["activation"] for r in rows]
    for act in ("sigmoid", "tanh"):
        n = sum(a == act for a in acts)
        if n >= max(2, m.t.deep_stack_layers - 1) or (n >= 2 and n >= len(acts) // 2):
            gains = [r["backward_gain"] for r in rows if finite(r["backward_gain"])]
            measured = f"; measured here, the gradient at layer outputs changes " \
                f"{fmt(geomean(gains))}x per layer" if gains else ""
            bound = "0.25" if act == "sigmoid" else "1 (and far less off-centre)"
            causes.append(Cause(f"{act}_in_deep_stack",
                                f"{n} of the {len(acts)} layers feed a {act}; its derivative "
                                f"is at most {bound}{measured}"))
            break
    for kind in init_kinds:
        c = init_cause(m, rows, kind)
        if c:
            causes.append(c)
    rms = [r["output_rms"] for r in rows]
    if len(rows) >= m.t.min_layers and finite(rms[0]) and finite(rms[-2]) and rms[0] > 0:
        factor = (rms[-2] / rms[0]) ** (1 / max(1, len(rms) - 2))
        if 0 < factor <= m.t.forward_shrink_per_layer:
            causes.append(Cause(
                "signal_shrinks_forward",
                f"the forward signal shrinks {fmt(1 / factor)}x per layer (output RMS "
                f"{fmt(rms[0])} at {label(rows[0]['name'])}, {fmt(rms[-2])} at "
                f"{label(rows[-2]['name'])}): the backward signal shrinks with it"))
    g = m.graph
    if len(rows) >= m.t.deep_stack_layers and g is not None and not g.norm_ops and \
            not g.branch_merges:
        causes.append(Cause("deep_plain_stack",
                            f"{len(rows)} layers in a plain chain: the autograd graph has no "
                            f"skip connection and no normalisation layer to keep the gradient "
                            f"scale from compounding"))
    return causes


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
    if not m.inp or not finite(m.inp["rms"]) or m.inp["rms"] <= 0:
        return None
    rms, limit = m.inp["rms"], m.t.input_scale_high
    if 1 / limit <= rms <= limit:
        return None
    return Cause("unscaled_inputs",
                 f"the inputs are not standardised: RMS {fmt(rms)} (mean "
                 f"{fmt(m.inp['mean'])}, std {fmt(m.inp['std'])}), so the first layer sees "
                 f"{fmt(rms)}x the unit scale its init assumes")
