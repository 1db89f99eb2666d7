"""Predictions of gradient flow through depth: vanishing, exploding, non-finite."""

from __future__ import annotations

import math
from typing import Any

from ..findings import Cause, Finding
from ..judge.context import fmt
from ..remedies import remedy
from .judge import Measured, depth_causes, depth_remedies, geomean, input_cause, label, ordered
from .tables import finite, ratio


def vanishing(m: Measured) -> Finding | None:
    """The first weight layer's gradient norm far below the last one's."""
    rows, t = m.weight_rows, m.t
    if len(rows) < t.min_layers:
        return None
    first, last = rows[0], rows[-1]
    first_to_last = ratio(first["grad_norm"], last["grad_norm"])
    if first_to_last is None or first_to_last >= t.vanishing_ratio:
        return None
    grads = [r["grad_norm"] for r in rows]
    starved = [r["name"] for r in rows if finite(r["grad_norm"])
               and r["grad_norm"] < t.vanishing_ratio * last["grad_norm"]]
    # factor by which the gradient norm falls from layer k+1 to layer k (input side)
    drops = [ratio(grads[k + 1], grads[k]) for k in range(len(rows) - 1)]
    measured = [(k, d) for k, d in enumerate(drops) if finite(d) and d > 0]
    evidence: dict[str, Any] = {
        "grad_norm_ratio_first_to_last": first_to_last,
        "per_layer_grad_norm": {r["name"]: r["grad_norm"] for r in rows},
        "per_layer_output_grad_norm": {r["name"]: r["output_grad_norm"] for r in rows},
        "backward_gain": {r["name"]: r["backward_gain"] for r in rows},
        "forward_gain": {r["name"]: r["forward_gain"] for r in rows},
        "threshold": t.vanishing_ratio}
    where = ""
    zero = [k for k, g in enumerate(grads) if g == 0]
    if zero:
        where = f"; no gradient at all reaches {label(rows[zero[-1]]['name'])}" + \
            (" and the layers below it" if zero[-1] > 0 else "")
    elif measured:
        k, worst = max(measured, key=lambda kd: kd[1])
        mean = geomean([d for _, d in measured])
        evidence["largest_drop"] = {"from": rows[k + 1]["name"], "to": rows[k]["name"],
                                    "factor": worst}
        evidence["mean_factor_per_layer"] = mean
        if worst > max(t.single_layer_drop, mean ** 2):
            where = (f"; most of it is lost between {label(rows[k + 1]['name'])} and "
                     f"{label(rows[k]['name'])} ({fmt(worst)}x)")
        else:
            where = f"; it is lost gradually, about {fmt(mean)}x per layer over {len(rows)} layers"
    saturating = any(c.id.endswith("_in_deep_stack") for c in depth_causes(m, rows, ()))
    causes = _dead_cause(m, rows) + \
        depth_causes(m, rows, ("small", "large") if saturating else ("small",))
    summary = (f"Gradients will vanish towards the input: at init {label(first['name'])} gets "
               f"{fmt(first_to_last)} of the gradient norm of {label(last['name'])}{where}, so the "
               f"input-side layers will barely learn.")
    severity = "error" if first_to_last < t.vanishing_ratio_error else "warning"
    return Finding("vanishing_gradient", severity, 0, 0, starved or [first["name"]], summary,
                   evidence, causes, depth_remedies(m, rows, causes))


def _dead_cause(m: Measured, rows: list[dict[str, Any]]) -> list[Cause]:
    """ReLU sites, between the weight layers, whose units are mostly dead: they block the
    gradient of every layer below them."""
    inside = {r["name"] for r in rows[:-1]}
    dead = [s for s in m.sites if s.get("judged") and s["layer"] in inside
            and finite(s["dead_fraction"]) and s["dead_fraction"] >= m.t.dying_fraction_error]
    if not dead:
        return []
    worst = max(dead, key=lambda s: s["dead_fraction"])
    return [Cause("dead_units_block_gradient",
                  f"{len(dead)} ReLU site{'s' if len(dead) > 1 else ''} between the layers "
                  f"start{'' if len(dead) > 1 else 's'} mostly dead ({worst['name']}: "
                  f"{fmt(100 * worst['dead_fraction'])}% of {worst['units']} units): a dead "
                  f"unit passes no gradient to the layers below it")]


def _first_nonfinite(m: Measured) -> dict[str, Any] | None:
    """The first layer (forward order) whose output holds NaN/Inf."""
    return next((r for r in m.rows if r["ran"] and r["output_nonfinite"]), None)


def _forward_growth(m: Measured, upto: dict[str, Any] | None = None
                    ) -> tuple[float, dict[str, Any], float] | None:
    """Largest finite layer-output RMS (before ``upto``) over the input scale."""
    ran = [r for r in m.rows if r["ran"]]
    if upto is not None:
        ran = ran[: ran.index(upto)]
    ran = [r for r in ran if finite(r["output_rms"])]
    if not ran:
        return None
    base = m.inp["rms"] if m.inp and finite(m.inp["rms"]) and m.inp["rms"] > 0 \
        else ran[0]["output_rms"]
    top = max(ran, key=lambda r: r["output_rms"])
    if base <= 0:
        return None
    return top["output_rms"] / base, top, base


def exploding(m: Measured) -> Finding | None:
    """The forward signal or the gradient growing through depth, or already overflowing."""
    t, rows = m.t, m.weight_rows
    reasons: list[str] = []
    evidence: dict[str, Any] = {}
    layers: list[str] = []
    worst = 0.0  # how far past its limit the strongest sign is
    bad = _first_nonfinite(m)
    grown = _forward_growth(m, bad)
    if grown is not None:
        growth, top, base = grown
        if growth > t.preflight_forward_growth or top["output_rms"] > t.forward_overflow:
            depth = 1 + [r["name"] for r in m.rows if r["ran"]].index(top["name"])
            per_layer = growth ** (1 / depth)
            reasons.append(f"the forward signal grows {fmt(growth)}x from the input (RMS "
                           f"{fmt(base)}) to the output of {label(top['name'])} (RMS "
                           f"{fmt(top['output_rms'])}), about {fmt(per_layer)}x per layer")
            evidence.update(forward_growth=growth, forward_growth_per_layer=per_layer,
                            input_rms=base, max_output_rms=top["output_rms"],
                            max_output_rms_layer=top["name"])
            worst = max(worst, growth / t.preflight_forward_growth)
            if top["output_rms"] > t.forward_overflow:
                worst = math.inf
    if len(rows) >= t.min_layers:
        first, last = label(rows[0]["name"]), label(rows[-1]["name"])
        # the gradient at layer outputs, then the parameters' own gradient
        for key, says in (("output_grad_norm", f"the gradient at layer outputs grows {{}}x from "
                                               f"{last} back to {first}"),
                          ("grad_norm", f"{first} gets {{}}x the gradient norm of {last}")):
            growth = ratio(rows[0][key], rows[-1][key])
            if growth is not None and growth > t.exploding_depth_ratio:
                reasons.append(says.format(fmt(growth)))
                evidence[f"{key}_ratio_first_to_last"] = growth
                worst = max(worst, growth / t.exploding_depth_ratio)
    if not reasons:
        return None
    invalid = _nonfinite_facts(m)
    if invalid:
        reasons.append(invalid)
        worst = math.inf
    evidence["per_layer_output_rms"] = {r["name"]: r["output_rms"] for r in m.rows if r["ran"]}
    evidence["forward_gain"] = {r["name"]: r["forward_gain"] for r in m.rows if r["ran"]}
    evidence["backward_gain"] = {r["name"]: r["backward_gain"] for r in rows}
    evidence["per_layer_grad_norm"] = {r["name"]: r["grad_norm"] for r in rows}
    if m.loss is not None:
        evidence["loss"] = m.loss
    depth_rows = rows or [r for r in m.rows if r["ran"] and r["fan_in"] is not None]
    overflow = None
    if worst == math.inf:
        what = [f"largest layer-output RMS {fmt(evidence['max_output_rms'])}"] \
            if "max_output_rms" in evidence else []
        what += [invalid] if invalid else []
        overflow = Cause("forward_overflow",
                         f"the very first forward pass already overflows ({'; '.join(what)}): "
                         f"no learning rate or clipping can train from these weights")
    causes = [c for c in (overflow,) if c] + depth_causes(m, depth_rows, ("large",))
    causes = [c for c in causes if c.id != "signal_shrinks_forward"]
    inputs = input_cause(m)
    if inputs:
        causes.append(inputs)
    remedies = depth_remedies(m, depth_rows, causes)
    if inputs and m.inp:
        remedies.insert(0, remedy("standardize_inputs", mean=fmt(m.inp["mean"]),
                                  std=fmt(m.inp["std"])))
    large = [r["name"] for r in depth_rows if r["init"] and finite(r["init"]["ratio"])
             and r["init"]["ratio"] > t.init_scale_high]
    layers = large or [r["name"] for r in depth_rows[:1]] + \
        ([evidence["max_output_rms_layer"]] if "max_output_rms_layer" in evidence else [])
    severity = "error" if worst >= t.exploding_error_factor else "warning"
    summary = f"Gradients will explode: {'; '.join(reasons)}."
    if overflow:
        summary += " Training cannot start from these weights; gradient clipping cannot help."
    return Finding("exploding_gradient", severity, 0, 0, ordered(m, layers), summary, evidence,
                   causes, remedies)


def _nonfinite_facts(m: Measured) -> str | None:
    """Where NaN/Inf first shows (a layer output, the output, the loss, a gradient), if any."""
    bad = _first_nonfinite(m)
    if bad is not None:
        return f"the output of {label(bad['name'])} is already non-finite (NaN/Inf)"
    if m.out_nonfinite:
        return "the model's output is non-finite (NaN/Inf)"
    if m.loss is not None and not math.isfinite(m.loss):
        return "the loss is non-finite"
    if any(r["grad_norm"] is not None and not math.isfinite(r["grad_norm"]) for r in m.rows):
        return "the backward pass produces non-finite gradients"
    return None


def nonfinite(m: Measured, explained: Finding | None) -> Finding | None:
    """NaN/Inf from a finite batch that no forward growth (``explained``, the
    exploding_gradient finding) explains: an invalid operation."""
    what = _nonfinite_facts(m)
    if what is None or explained is not None:
        return None
    bad = _first_nonfinite(m)
    backward = bad is None and not m.out_nonfinite and (m.loss is None or math.isfinite(m.loss))
    grads = [r["name"] for r in m.rows if r["grad_norm"] is not None
             and not math.isfinite(r["grad_norm"])]
    if bad is not None:
        cause = Cause("invalid_forward_op",
                      f"{label(bad['name'])} ({bad['type']}) turns a finite input into NaN/Inf "
                      f"without the signal growing before it: an invalid operation (log of 0, "
                      f"division by 0, sqrt of a negative) in or just before it")
    elif backward:
        cause = Cause("invalid_backward_op",
                      "the forward pass is finite but its gradient is not: an operation whose "
                      "derivative is infinite where it is evaluated (sqrt or pow at 0, a norm of "
                      "a zero vector)")
    else:
        cause = Cause("invalid_forward_op", f"{what} although every layer output is finite: "
                      f"an invalid operation after the last layer or in the loss")
    summary = f"Training will produce NaN/Inf from the first step: {what} on a finite batch."
    evidence = {"first_nonfinite_layer": bad["name"] if bad else None,
                "nonfinite_grad_layers": grads, "output_nonfinite": m.out_nonfinite,
                "loss": m.loss}
    layers = [bad["name"]] if bad else grads
    return Finding("nonfinite", "error", 0, 0, layers, summary, evidence, [cause],
                   [remedy("detect_anomaly")])
