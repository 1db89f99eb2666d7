"""Predictions on activation units at init: dead ReLU units, saturated sigmoid/tanh outputs.

The severity of dead units follows the training-time ``dying_relu`` detector
(``judge/detectors/dying.py``): a site whose every unit is dead passes no gradient at all (error);
units held below zero by a large negative bias are a defect (error from
``dying_fraction_error`` on, warning below); dead units that nothing at init explains cost
capacity, and whether training revives them cannot be known yet (info). Sites after an
entirely dead one see a constant and are not judged.
"""

from __future__ import annotations

import math
from typing import Any

from ..findings import Cause, Finding, Remedy
from ..judge.context import fmt
from ..remedies import remedy
from .judge import (
    SEVERITY_RANK,
    Measured,
    depth_causes,
    init_cause,
    init_ratio,
    input_cause,
    label,
    ordered,
)
from .tables import finite

_DEAD_KEYS = ("dead_fraction", "dead_units", "units", "layer", "pre_mean", "pre_std",
              "dead_indices", "bias_dead_mean", "revived_by_zero_bias", "values_per_unit")
_SATURATED_KEYS = ("saturated_fraction", "kind", "layer", "pre_mean", "pre_std", "pre_rms",
                   "units")


def dying(m: Measured) -> list[Finding]:
    """ReLU sites with at least ``dying_fraction`` of their units dead on the example batch:
    one finding for the sites with a defect (warning/error), one for the others (info)."""
    t = m.t
    defects: list[tuple[dict[str, Any], str, Cause | None]] = []
    capacity: list[dict[str, Any]] = []
    for s in m.sites:
        if not s.get("judged") or not finite(s["dead_fraction"]):
            continue
        if s["dead_fraction"] >= t.dying_fraction:
            cause = _bias_cause(m, s)
            if s["dead_units"] == s["units"]:
                defects.append((s, "error", cause))
            elif cause is not None:
                severity = "error" if s["dead_fraction"] >= t.dying_fraction_error else "warning"
                defects.append((s, severity, cause))
            else:
                capacity.append(s)
        if s["dead_units"] == s["units"]:
            # Every later site sees a constant: its dead units are a consequence, reported
            # with this one (as dying_relu does during training).
            break
    return [f for f in (_defect_finding(m, defects), _capacity_finding(m, capacity)) if f]


def _bias_cause(m: Measured, s: dict[str, Any]) -> Cause | None:
    """The bias on the dead units is more negative than the pre-activation spread (the
    training-time cause) and than any bias PyTorch's default init draws for the layer
    (1/sqrt(fan_in)), and a zero bias would revive at least
    ``preflight_bias_revive_fraction`` of the dead units or of the units that would then be
    active (measured on the same batch: units dead with a zero bias too are dead through the
    weights, and a bias that kills every unit the weights leave alive is a cause however
    many of those there are).

    The default-init bound matters at init: in a narrow net whose signal is small, the
    units that happen to draw the most negative default biases are dead, and their biases
    exceed the spread, yet nothing was set wrong; training decides whether they stay dead.
    """
    bias, revived, spread = s.get("bias_dead_mean"), s.get("revived_by_zero_bias"), s["pre_std"]
    if bias is None or revived is None or not finite(spread) or bias >= 0 or -bias < spread:
        return None
    row = m.row(s["layer"])
    fan_in = row["fan_in"] if row else None
    default = 1 / math.sqrt(fan_in) if fan_in else 0.0
    dead = s["dead_units"]
    alive_at_zero = s["units"] - (dead - revived)  # units a zero bias would leave active
    if -bias <= default or not revived or \
            revived < m.t.preflight_bias_revive_fraction * min(dead, alive_at_zero):
        return None
    return Cause("large_negative_bias",
                 f"{label(s['layer'])} feeds {s['name']} with a bias of {fmt(bias)} on average "
                 f"over its {dead} dead units, more negative than the pre-activation spread "
                 f"(std {fmt(spread)}) and than PyTorch's default init draws (+-{fmt(default)}); "
                 f"with a zero bias {revived} of them would be active on this batch: the bias, "
                 f"not the weights, kills them")


def _init_causes(m: Measured) -> list[Cause]:
    """Weights far below their Kaiming scale, or a forward signal shrinking with depth."""
    rows = m.weight_rows
    small = init_cause(m, rows, "small") if len(rows) >= 2 else None
    shrink = [c for c in depth_causes(m, rows, ()) if c.id == "signal_shrinks_forward"] \
        if len(rows) >= m.t.min_layers else []
    return [c for c in (small, *shrink) if c]


def _dead_evidence(m: Measured, hits: list[dict[str, Any]]) -> dict[str, Any]:
    return {"sites": {s["name"]: {k: s.get(k) for k in _DEAD_KEYS} for s in hits},
            "threshold": m.t.dying_fraction, "threshold_error": m.t.dying_fraction_error}


def _more(hits: list[dict[str, Any]], limit: float) -> str:
    """`` (2 more sites at or above 25%)``, or nothing for a single site."""
    n = len(hits) - 1
    return f" ({n} more site{'s' if n > 1 else ''} at or above {fmt(100 * limit)}%)" if n else ""


def _defect_finding(m: Measured, defects: list[tuple[dict[str, Any], str, Cause | None]]
                    ) -> Finding | None:
    if not defects:
        return None
    defects = sorted(defects, key=lambda d: -d[0]["dead_fraction"])
    hits = [s for s, _, _ in defects]
    bias_causes = [(s, c) for s, _, c in defects if c is not None]
    causes = [c for _, c in bias_causes] + _init_causes(m)
    remedies: list[Remedy] = []
    if bias_causes:
        s = bias_causes[0][0]
        remedies.append(remedy("positive_bias_init", layer=s["layer_path"],
                               bias=fmt(s["bias_dead_mean"])))
    if causes:  # Kaiming weights with zero biases: what the catalogue's code sets
        rows = [r for r in (m.row(s["layer"]) for s in hits if s["layer"]) if r is not None]
        remedies.append(remedy("kaiming_init", nonlinearity="relu",
                               **({"ratio": r} if (r := init_ratio(rows)) else {})))
    top = hits[0]
    remedies.append(remedy("leaky_relu", old="(nn.ReLU, nn.ReLU6)", site=top["name"]))
    if top["dead_units"] == top["units"]:
        why = ("the site passes no gradient at all, so nothing before it learns through it and "
               "nothing revives it")
    else:
        why = (f"the bias of {label(top['layer'])} holds them below 0 for every sample, and "
               f"dead units pass it no gradient, so it cannot lift them")
    summary = (f"ReLU units are dead from the start: {fmt(100 * top['dead_fraction'])}% of the "
               f"{top['units']} units of {top['name']} output 0 for every one of the batch's "
               f"samples, with pre-activation mean {fmt(top['pre_mean'])} and std "
               f"{fmt(top['pre_std'])}{_more(hits, m.t.dying_fraction)}; {why}.")
    severity = min((sev for _, sev, _ in defects), key=SEVERITY_RANK.__getitem__)
    layers = ordered(m, [s["layer"] for s in hits if s["layer"]])
    return Finding("dying_relu", severity, 0, 0, layers, summary, _dead_evidence(m, hits),
                   causes, remedies)


def _capacity_finding(m: Measured, hits: list[dict[str, Any]]) -> Finding | None:
    if not hits:
        return None
    hits = sorted(hits, key=lambda s: -s["dead_fraction"])
    causes = _init_causes(m)
    remedies: list[Remedy] = []
    if causes:
        remedies.append(remedy("kaiming_init", nonlinearity="relu"))
    top = hits[0]
    remedies.append(remedy("leaky_relu", old="(nn.ReLU, nn.ReLU6)", site=top["name"]))
    summary = (f"Some ReLU units start dead: {fmt(100 * top['dead_fraction'])}% of the "
               f"{top['units']} units of {top['name']} output 0 for every one of the batch's "
               f"samples{_more(hits, m.t.dying_fraction)}; no such site is entirely dead and "
               f"no large negative bias holds their units down. They cost capacity; at init it "
               f"cannot be known whether training revives them (updates to the layers before "
               f"them can).")
    layers = ordered(m, [s["layer"] for s in hits if s["layer"]])
    return Finding("dying_relu", "info", 0, 0, layers, summary, _dead_evidence(m, hits),
                   causes, remedies)


def saturated(m: Measured) -> Finding | None:
    """Sigmoid/tanh-like sites with at least ``saturation_fraction`` of their outputs within
    ``saturation_margin`` of a bound."""
    t = m.t
    hits = [s for s in m.sites if finite(s["saturated_fraction"])
            and s["saturated_fraction"] >= t.saturation_fraction]
    if not hits:
        return None
    hits.sort(key=lambda s: -s["saturated_fraction"])
    causes: list[Cause] = []
    first = m.weight_rows[0]["name"] if m.weight_rows else None
    inputs = input_cause(m)
    if inputs and any(s["layer"] in (None, first) for s in hits):
        causes.append(inputs)
    large = []
    for s in hits:
        r = m.row(s["layer"])
        if r and r["init"] and finite(r["init"]["ratio"]) and \
                r["init"]["ratio"] > t.init_scale_high:
            large.append((s, r))
    if large:
        s, r = large[0]
        causes.append(Cause("init_too_large",
                            f"{label(r['name'])} starts at {fmt(r['init']['ratio'])}x the "
                            f"{r['init']['family'].capitalize()} std for the {s['kind']} that "
                            f"follows (std {fmt(r['init']['std'])} vs "
                            f"{fmt(r['init']['recommended_std'])})"))
    top = hits[0]
    if not causes:
        causes.append(Cause("large_preactivations",
                            f"the pre-activations of {top['name']} have std "
                            f"{fmt(top['pre_std'])} and mean {fmt(top['pre_mean'])}, far "
                            f"outside the {top['kind']}'s linear range"))
    remedies: list[Remedy] = []
    if inputs and m.inp and causes[0] is inputs:
        remedies.append(remedy("standardize_inputs", mean=fmt(m.inp["mean"]),
                               std=fmt(m.inp["std"])))
    if large:
        remedies.append(remedy("xavier_init", nonlinearity=_gain_name(large[0][0]["kind"])))
    remedies.append(remedy("batch_norm"))
    remedies.append(remedy("leaky_relu", old="(nn.Sigmoid, nn.Tanh)"))
    summary = (f"Activations start saturated: {fmt(100 * top['saturated_fraction'])}% of the "
               f"outputs of {top['name']} ({top['kind']}) lie within "
               f"{fmt(100 * t.saturation_margin)}% of its range from a bound, because its "
               f"pre-activations have std {fmt(top['pre_std'])} (mean {fmt(top['pre_mean'])})"
               f"{_more(hits, t.saturation_fraction)}; saturated units pass almost no gradient.")
    evidence = {"sites": {s["name"]: {k: s.get(k) for k in _SATURATED_KEYS} for s in hits},
                "threshold": t.saturation_fraction, "margin": t.saturation_margin}
    if m.inp:
        evidence["input"] = dict(m.inp)
    severity = "error" if top["saturated_fraction"] >= t.saturation_fraction_error else "warning"
    layers = ordered(m, [s["layer"] for s in hits if s["layer"]])
    return Finding("saturated_activation", severity, 0, 0, layers, summary, evidence, causes,
                   remedies)


def _gain_name(kind: str) -> str:
    """The ``nn.init.calculate_gain`` name of an activation kind."""
    return kind if kind in ("sigmoid", "tanh") else "tanh"
