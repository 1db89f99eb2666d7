"""saturated_activation: sigmoid/tanh/hardtanh/softsign outputs stuck near their bounds.

Measured per call site as the fraction of outputs within ``saturation_margin`` of the
output range from a bound, where the slope is a few percent of its maximum. Reported when
that fraction stays at or above ``saturation_fraction`` on ``persistence`` of the
measurements: saturation at one step is not a finding. This is not the vanishing finding: a
deep sigmoid net with small pre-activations vanishes without saturating, and a saturated
layer near the output may not starve the layers before it; each is reported as measured.
"""

from __future__ import annotations

import numpy as np

from ...findings import Cause, Finding, Remedy
from .. import causes as C
from ..advice import lower_lr, remedy, standardize
from ..context import Context, fmt

KIND = "saturated_activation"
CAUSES = ("large_preactivations", "preactivation_offset", "weights_grew",
          "output_activation_bound")
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""
SATURATING = ("sigmoid", "tanh", "hardtanh", "softsign", "hardsigmoid")
MIN_MEASUREMENTS = 3


def detect(ctx: Context) -> list[Finding]:
    return ctx.per_site(_site_finding)


def _first_layer(ctx: Context, layer: int | None) -> bool:
    """Whether ``layer`` is the first weight layer of its model (it sees the raw inputs)."""
    if layer is None:
        return False
    group = next((g for g in ctx.groups if layer in g.layers), None)
    return group is not None and group.layers[0] == layer


def _last_layer(ctx: Context, layer: int | None) -> bool:
    """Whether ``layer`` is the last weight layer of its model (what follows is its
    output)."""
    group = next((g for g in ctx.groups if layer in g.layers), None) \
        if layer is not None else None
    return group is not None and group.layers[-1] == layer


def _site_finding(ctx: Context, i: int) -> Finding | None:
    site = ctx.site(i)
    if site.kind not in SATURATING:
        return None
    t = ctx.t
    frac = ctx.site_stat("fraction")[:, i]
    ok = np.isfinite(frac)
    if ok.sum() < MIN_MEASUREMENTS:
        return None
    values, steps = frac[ok], ctx.site_steps[ok]
    high = values >= t.saturation_fraction
    if not high[-1]:
        return None
    # Saturated on `persistence` of the measurements, or, where it set in gradually (a
    # decoder's sigmoid pushed to its ends by targets out of its reach), on `persistence`
    # of those since it began, over at least the last half of the run.
    since = int(np.argmax(high))
    if high.mean() < t.persistence and (high[since:].mean() < t.persistence or
                                        len(high) - since < len(high) / 2):
        return None
    typical = float(np.median(values))
    severity = "error" if typical >= t.saturation_fraction_error else "warning"
    name = ctx.site_name(i)
    label = ctx.site_label(i)
    first_step = int(steps[np.nonzero(high)[0][0]])

    first_layer = _first_layer(ctx, site.layer)
    inputs = C.unscaled_inputs(ctx) if first_layer else None
    init = None
    if site.layer is not None:
        scale = ctx.init_scale(site.layer)
        if scale and scale["ratio"] > t.init_scale_high:
            init = Cause("init_too_large",
                         f"{ctx.label(site.layer)} starts at {fmt(scale['ratio'])}x the "
                         f"{scale['family'].capitalize()} std for the {site.kind} that "
                         f"follows")
    grew = weights_grew(ctx, site.layer)
    output = _last_layer(ctx, site.layer)
    causes: list[Cause] = [c for c in (large_preactivations(ctx, i), inputs, init, grew,
                                       preactivation_offset(ctx, i)) if c]
    if output:
        causes.insert(0, Cause("output_activation_bound",
                               f"{label} is the model's output activation: training pushes "
                               f"its outputs to its bounds when the targets lie at or beyond "
                               f"its range (standardised targets under a {site.kind}), and "
                               f"the loss stays where the bounds allow"))
    ids = {c.id for c in causes}
    remedies: list[Remedy] = []
    if output:
        remedies.append(remedy("drop_output_activation", module=site.module if not
                               site.functional else "", activation=site.kind))
    scale = standardize(ctx, causes)
    if scale:
        remedies.append(scale)
    if "init_too_large" in ids or not remedies:
        remedies.append(remedy("xavier_init", nonlinearity=site.kind
                               if site.kind in ("sigmoid", "tanh") else "tanh"))
    if "weights_grew" in ids:
        lr = lower_lr(ctx)
        if lr is not None:
            remedies.append(lr)
    remedies.append(remedy("batch_norm"))

    pre_rms = ctx.site_stat("pre_rms")[ok, i]
    pre_mean = ctx.site_stat("pre_mean")[ok, i]
    stuck = ctx.site_stat("persistent")[ok, i]
    where = f", fed by {ctx.label(site.layer)}" if site.layer is not None else ""
    summary = (f"{ctx.subject}{fmt(100 * typical)}% of the outputs of {label} "
               f"({'functional ' if site.functional else ''}{site.kind}{where}) sit within "
               f"{fmt(100 * t.saturation_margin)}% of its bounds, on "
               f"{fmt(100 * float(high.mean()))}% of {len(values)} measurements from step "
               f"{first_step}: there its slope is nearly 0, so it passes almost no gradient "
               f"(pre-activation RMS {fmt(float(np.median(pre_rms)))}).")
    k = np.linspace(0, len(steps) - 1, min(len(steps), 32)).round().astype(int)
    evidence = {
        "site": name, "activation": site.kind, "functional": site.functional,
        "module": site.module, "bounds": list(site.bounds) if site.bounds else None,
        "saturated_fraction": typical,
        "saturated_fraction_first": float(values[0]),
        "saturated_fraction_last": float(values[-1]),
        "measurements_saturated": int(high.sum()), "measurements": len(values),
        "units_saturated_for_whole_batch": float(np.median(stuck)),
        "pre_activation_rms": {"first": float(pre_rms[0]), "last": float(pre_rms[-1])},
        "pre_activation_mean": {"first": float(pre_mean[0]), "last": float(pre_mean[-1])},
        "feeding_layer": ctx.name(site.layer) if site.layer is not None else None,
        "feeding_layer_is_first": first_layer,
        "saturated_fraction_series": {"steps": steps[k].tolist(), "values": values[k].tolist()},
    }
    layers = [ctx.name(site.layer)] if site.layer is not None else []
    return Finding(kind=KIND, severity=severity, first_step=first_step,
                   last_step=int(steps[-1]), layers=[*layers, name], summary=summary,
                   evidence=evidence, causes=causes, remedies=remedies)


# ------------------------------------------------------------ this kind's causes
_SATURATES_AT = {"sigmoid": 4.6, "tanh": 2.3, "softsign": 49.0, "hardsigmoid": 3.0}


def large_preactivations(ctx: Context, i: int) -> Cause | None:
    """Pre-activations whose typical size is beyond the activation's saturation point."""
    site = ctx.site(i)
    rms = ctx.site_stat("pre_rms")[:, i]
    rms = rms[np.isfinite(rms)]
    if not rms.size:
        return None
    typical = float(np.median(rms))
    edge = _SATURATES_AT.get(site.kind)
    if site.kind == "hardtanh" and site.bounds:
        edge = max(abs(site.bounds[0]), abs(site.bounds[1]))
    if edge is None or typical < edge:
        return None
    feed = f" from {ctx.label(site.layer)}" if site.layer is not None else ""
    return Cause("large_preactivations",
                 f"the pre-activations{feed} have RMS {fmt(typical)} (median over "
                 f"{rms.size} measurements; {fmt(float(rms[0]))} at the first), while "
                 f"{site.kind} is within 1% of its bounds beyond |x| = {fmt(edge)}")


def preactivation_offset(ctx: Context, i: int) -> Cause | None:
    """Pre-activations centred far from zero: most inputs sit on one side of the activation."""
    mean = ctx.site_stat("pre_mean")[:, i]
    std = ctx.site_stat("pre_std")[:, i]
    ok = np.isfinite(mean) & np.isfinite(std)
    if not ok.any():
        return None
    m, sd = float(np.median(mean[ok])), float(np.median(std[ok]))
    if abs(m) < max(sd, 1.0):
        return None
    site = ctx.site(i)
    return Cause("preactivation_offset",
                 f"the pre-activations of {ctx.site_name(i)} are centred at {fmt(m)} with a "
                 f"spread of only {fmt(sd)}: most inputs sit on the flat "
                 f"{'upper' if m > 0 else 'lower'} side of the {site.kind}")


def weights_grew(ctx: Context, layer: int | None) -> Cause | None:
    """The feeding layer's weight norm grew several-fold during the run."""
    if layer is None:
        return None
    w = ctx.detail("weight_norm")
    if w.shape[1] <= layer:
        return None
    col = w[:, layer]
    ok = np.isfinite(col) & (col > 0)
    if ok.sum() < 2:
        return None
    first, last = float(col[ok][0]), float(col[ok][-1])
    if last < 3 * first:
        return None
    return Cause("weights_grew",
                 f"the weights of {ctx.label(layer)} grew from norm {fmt(first)} to "
                 f"{fmt(last)} ({fmt(last / first)}x) during the run, scaling the "
                 f"pre-activations up with them")
