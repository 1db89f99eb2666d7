"""The per-layer and per-site tables of a preflight, built on the host from the measurements."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..measure.structure import init_scale
from .measure import Probe


def finite(x: float | None) -> bool:
    """Whether ``x`` is a number and finite."""
    return x is not None and math.isfinite(x)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` when both are finite and ``b`` is positive, else None."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return a / b


def layer_rows(probe: Probe, raw: list[dict[str, Any]], graph: Any,
               inp: dict[str, float] | None) -> list[dict[str, Any]]:
    """The per-layer table, input side first (layers that never ran at the end)."""
    relu6_fed = {s.layer for s in probe.sites if s.kind == "relu6"}
    rows = []
    for i, (layer, r) in enumerate(zip(probe.layers, raw, strict=True)):
        w = layer.weight
        act = None
        if w is not None and graph is not None:
            act = graph.act_after.get(id(w))
            if act == "hardtanh" and (i in relu6_fed or i + 1 in relu6_fed):
                act = "relu"
        n = sum(numel for _, numel, _ in r["out"])
        out_rms = math.sqrt(sum(rms ** 2 * numel for rms, numel, _ in r["out"]) / n) if n \
            else None
        grads = [g for g in r["grad"] if g is not None]
        scale = init_scale(w, act) if w is not None else None
        rows.append({
            "name": layer.name, "type": type(layer.module).__name__,
            "params": sum(p.numel() for _, p in layer.params), "ran": layer.order is not None,
            "order": layer.order, "calls": len(r["out"]), "activation": act,
            "fan_in": scale["fan_in"] if scale else None,
            "fan_out": scale["fan_out"] if scale else None,
            "init": {k: scale[k] for k in ("std", "recommended_std", "ratio", "family")}
            if scale else None,
            "output_rms": out_rms,
            "output_nonfinite": int(sum(nf for _, _, nf in r["out"])),
            "grad_norm": math.sqrt(sum(g ** 2 for g in grads)) if grads else None,
            "weight_grad_norm": r["weight_grad"],
            "output_grad_norm": math.sqrt(sum(g ** 2 for g in r["out_grad"]))
            if r["out_grad"] else None,
        })
    rows.sort(key=lambda row: (row["order"] is None, row["order"] or 0))
    prev = inp["rms"] if inp else None
    ran = [row for row in rows if row["ran"]]
    for k, row in enumerate(ran):
        row["forward_gain"] = ratio(row["output_rms"], prev)
        prev = row["output_rms"]
        nxt = ran[k + 1]["output_grad_norm"] if k + 1 < len(ran) else None
        row["backward_gain"] = ratio(row["output_grad_norm"], nxt)
    for depth, row in enumerate(rows):
        row["depth"] = depth
        row.pop("order")
        row.setdefault("forward_gain", None)
        row.setdefault("backward_gain", None)
    return rows


def site_rows(probe: Probe, raw: list[dict[str, Any]],
              min_values: int) -> list[dict[str, Any]]:
    """The per-site table, in call order; ReLU units are judged with ``min_values`` values."""
    rows = []
    for site, r in zip(probe.sites, raw, strict=True):
        feeding = probe.layers[site.layer] if site.layer is not None else None
        row: dict[str, Any] = {
            "name": site.name, "kind": site.kind, "module": site.module,
            "functional": site.functional,
            "layer": feeding.name if feeding else None,
            "layer_path": feeding.path if feeding else None,
            "units": site.units, "unit_dim": site.unit_dim,
            "values_per_unit": site.values_per_unit,
            "pre_mean": r["pre_mean"], "pre_std": r["pre_std"], "pre_rms": r["pre_rms"],
            "dead_fraction": r.get("dead_fraction"),
            "saturated_fraction": r.get("saturated_fraction")}
        if "dead" in r:
            dead = [i for i, d in enumerate(r["dead"]) if d]
            row["dead_units"] = len(dead)
            row["dead_indices"] = dead[:16]
            row["judged"] = site.values_per_unit >= min_values
            if "revived" in r and dead:
                row["revived_by_zero_bias"] = int(sum(1 for v in r["revived"] if v))
                row["bias_dead_mean"] = float(np.mean([r["bias"][i] for i in dead]))
        rows.append(row)
    return rows
