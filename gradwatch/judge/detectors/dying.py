"""dying_relu: ReLU units that output 0 for every sample, persistently, per call site.

A unit is dead on a batch when its pre-activation is <= 0 for every sample: it outputs 0
and passes no gradient to the layer that feeds it, so nothing but a change elsewhere can
revive it. Transient zeros are common in healthy nets; only units dead on
``dying_persist_measurements`` consecutive measurements up to the end of the run count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...findings import Cause, Finding, Remedy
from .. import causes as C
from ..advice import lower_lr, remedy, standardize
from ..context import Context, Group, fmt
from . import vanishing

KIND = "dying_relu"
CAUSES = ("large_negative_bias", "weights_push_below_zero", "learning_rate_spike",
          "dead_at_init")
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""
RELU_KINDS = ("relu", "relu6")


def detect(ctx: Context) -> list[Finding]:
    """One finding per site with a defect; the sites whose units were merely dead from
    initialisation are summed up in one finding, so that ten narrow layers do not make ten."""
    found = ctx.per_site(_site_finding)
    defects = [f for f in found if f.severity != "info"]
    from_init = [f for f in found if f.severity == "info"]
    if len(from_init) > 1 or (from_init and _starved(ctx)):
        return [*defects, _combined(ctx, from_init)]
    return defects + from_init


def _starved(ctx: Context) -> Group | None:
    """The model (its depth-ordered layers) whose gradient vanishes towards the input."""
    for group in ctx.groups:
        if vanishing.starved(ctx, group) is not None:
            return group
    return None


def _combined(ctx: Context, found: list[Finding]) -> Finding:
    """Sites with units dead since initialisation, as one finding (warning when the model's
    gradient vanishes too: the dead units are then part of why it stalls)."""
    group = _starved(ctx)
    shares = [f.evidence["dead_fraction"] for f in found]
    names = [f.evidence["site"] for f in found]
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    summary = (f"{ctx.subject}Units dead since initialisation at {len(found)} ReLU "
               f"site{'s' if len(found) > 1 else ''} ({listed}): {fmt(100 * min(shares))}-"
               f"{fmt(100 * max(shares))}% of each site's units output 0 for every sample from "
               f"the first step on, and training did not revive them.")
    causes: list[Cause] = []
    seen: set[str] = set()
    for f in found:
        for c in f.causes:
            if c.id not in seen:
                seen.add(c.id)
                causes.append(c)
    remedies = [remedy("leaky_relu", site=names[0], old="(nn.ReLU, nn.ReLU6)")]
    if group is not None:
        summary += (" The gradient also vanishes towards the input (see "
                    "vanishing_gradient): these units are part of why the model stalls.")
        scale = C.init_scale(ctx, group, ("small",))
        if scale is not None and scale.id not in seen:
            causes.append(scale)
        remedies.insert(0, remedy("kaiming_init", nonlinearity="relu"))
    else:
        summary += " This costs capacity, but nothing shows it stops the model learning."
    layers = ctx.in_forward_order({layer for f in found for layer in f.layers
                                   if layer not in names}) + names
    evidence = {"sites": [f.evidence for f in found], "dead_fraction_min": min(shares),
                "dead_fraction_max": max(shares), "gradient_vanishes": group is not None}
    return Finding(kind=KIND, severity="warning" if group is not None else "info",
                   first_step=min(f.first_step for f in found),
                   last_step=max(f.last_step for f in found), layers=layers, summary=summary,
                   evidence=evidence, causes=causes, remedies=remedies)


def _downstream_of_dead_site(ctx: Context, i: int) -> bool:
    """Whether an earlier site of the same model is entirely dead: everything after it sees
    a constant, so this site's dead units are a consequence, reported with that site."""
    site = ctx.site(i)
    for j in ctx.sites:
        other = ctx.site(j)
        units = other.final.get("units")
        if other.root == site.root and other.order < site.order and \
                other.kind in RELU_KINDS and units and other.final.get("dead_units") == units:
            return True
    return False


def _dead_behind(ctx: Context, i: int) -> list[dict[str, Any]]:
    """The later ReLU sites of the same model with dead units, when site ``i`` is entirely
    dead: each reported with it, as its consequence, rather than as a finding of its own."""
    site = ctx.site(i)
    if not site.final.get("units") or site.final.get("dead_units") != site.final["units"]:
        return []
    out = []
    for j in _same_model_from(ctx, i)[1:]:
        final = ctx.site(j).final
        units, dead = final.get("units"), final.get("dead_units", 0)
        if units and dead and dead / units >= ctx.t.dying_fraction:
            out.append({"site": ctx.site_name(j), "label": ctx.site_label(j),
                        "dead_units": int(dead), "units": int(units),
                        "dead_since_step": final.get("dead_since_step_median")})
    return out


def _same_model_from(ctx: Context, i: int) -> list[int]:
    """Site ``i`` and the ReLU sites after it in the same model, in forward order."""
    site = ctx.site(i)
    later = [j for j in ctx.sites if ctx.site(j).root == site.root and
             ctx.site(j).kind in RELU_KINDS and ctx.site(j).order > site.order]
    return [i, *sorted(later, key=lambda j: ctx.site(j).order)]


def _bias_set_negative(ctx: Context, j: int) -> bool:
    """Was the bias feeding site ``j`` set, at the start, below anything PyTorch's default
    init draws (U(-1/sqrt(fan_in), 1/sqrt(fan_in)))?"""
    site = ctx.site(j)
    if site.layer is None or site.bias_init is None:
        return False
    fan_in = ctx.layer(site.layer).fan_in
    return site.bias_init < -(1 / math.sqrt(fan_in) if fan_in else 0.0)


def _site_finding(ctx: Context, i: int) -> Finding | None:
    site = ctx.site(i)
    if site.kind not in RELU_KINDS or not site.final:
        return None
    t = ctx.t
    frac = ctx.site_stat("fraction")[:, i]
    ok = np.isfinite(frac)
    if ok.sum() < t.dying_persist_measurements:
        return None
    units, dead = site.final["units"], site.final["dead_units"]
    share = dead / units if units else 0.0
    if share < t.dying_fraction:
        return None
    steps = ctx.site_steps[ok]
    if _downstream_of_dead_site(ctx, i):
        return None
    persistent = ctx.site_stat("persistent")[ok, i]
    above = np.nonzero(persistent >= t.dying_fraction)[0]
    since = int(site.final.get("dead_since_step_median", steps[0]))
    first_step = min(since, int(steps[above[0]])) if above.size else since
    name = ctx.site_name(i)
    label = ctx.site_label(i)
    feed = ctx.label(site.layer) if site.layer is not None else None
    first_frac = float(frac[ok][0])
    # Training killed a sizeable share on top of those dead at the first measurement.
    grew = share - first_frac >= t.dying_fraction / 2
    killed = first_frac < t.dying_fraction or grew

    causes: list[Cause] = [c for c in (
        negative_bias(ctx, i), dead_at_init(ctx, i),
        learning_rate_spike(ctx, since, site.layer) if killed else None,
        C.learning_rate_too_high(ctx, until=since) if killed else None,
        weights_push_down(ctx, i) if killed else None,
        C.unscaled_inputs(ctx)) if c]
    ids = {c.id for c in causes}
    # Units killed by training, or by a bias set far below zero, are the classic dying
    # ReLU. Units that were dead from initialisation in a narrow layer, in a run where
    # nothing else is wrong, are a fact about the model's capacity: reported as info.
    if dead == units:
        severity = "error"
    elif grew or "large_negative_bias" in ids:
        severity = "error" if share >= t.dying_fraction_error else "warning"
    else:
        severity = "info"
    learns = ctx.learns_after(since) if severity == "error" and dead < units else None
    if learns is not None:
        severity = "warning"  # capacity lost, training not stopped
    remedies: list[Remedy] = [remedy("leaky_relu", site=name, old="(nn.ReLU, nn.ReLU6)")]
    bias = site.final.get("bias_dead_mean")
    # A bias re-init helps where the bias was set negative; where updates drove a positive
    # one negative, a new positive start is pushed down again. Dead sites further down the
    # model are reported with this one, so their set biases are reset with it.
    set_low = [j for j in _same_model_from(ctx, i) if _bias_set_negative(ctx, j)]
    if bias is not None and bias < 0 and set_low and set_low[0] == i:
        layers = list(dict.fromkeys(ctx.name(ctx.site(j).layer) for j in set_low))
        remedies.append(remedy("positive_bias_init", layer=layers[0], layers=layers,
                               bias=fmt(bias)))
    # Updates drove the dead units below zero (their bias, or their weights): smaller ones.
    driven = (site.bias_init is not None and bias is not None and
              site.bias_init > bias / 2 and "large_negative_bias" in ids) or \
        "weights_push_below_zero" in ids
    if ids & {"learning_rate_spike", "learning_rate_too_high"} or driven:
        # The ratio measured is that of the updates that killed the units, not of training
        # at a sane rate: cut by at most explosion_lr_reduction, as for a blow-up.
        lr = lower_lr(ctx, until=since, blow_up=True, anyway=driven)
        if lr is not None:
            remedies.insert(0, lr)  # the updates killed them: smaller updates first
    scale = standardize(ctx, causes)
    if scale:  # raw feature scales made the first updates oversized: fix the inputs first
        remedies.insert(0, scale)
    if "dead_at_init" in ids and "large_negative_bias" not in ids:
        remedies.append(remedy("kaiming_init", nonlinearity="relu"))

    where = f"fed by {feed}" if feed else "in the model's forward"
    how = f"{'module' if not site.functional else 'functional call'}"
    summary = (f"{ctx.subject}{dead} of {units} units at {label} ({how} {site.kind}, {where}) "
               f"output 0 for every sample from step {since} to the end "
               f"({fmt(100 * share)}% dead; {fmt(100 * first_frac)}% at the first "
               f"measurement): they pass no gradient back, so they cannot recover by "
               f"themselves.")
    if severity == "info":
        summary += " They were dead from initialisation and training did not kill more."
    if learns is not None:
        summary += (f" The model still learns with the units left (the loss went from "
                    f"{fmt(learns[0])} when they died to {fmt(learns[1])}): capacity is lost, "
                    f"training is not stopped.")
    behind = _dead_behind(ctx, i)
    if behind:
        summary += " Behind it, fed only a constant, " + ", ".join(
            f"{b['label']} ({b['dead_units']} of {b['units']} units from step "
            f"{b['dead_since_step']})"
            for b in behind) + " are dead too."
    pre_mean = ctx.site_stat("pre_mean")[ok, i]
    pre_std = ctx.site_stat("pre_std")[ok, i]
    dead_max = ctx.site_stat("dead_pre_max")[ok, i]
    k = np.linspace(0, len(steps) - 1, min(len(steps), 32)).round().astype(int)
    evidence = {
        "site": name, "activation": site.kind, "functional": site.functional,
        "module": site.module, "units": units, "dead_units": dead,
        "dead_fraction": share, "dead_fraction_first_measurement": first_frac,
        "dead_since_step": since, "dead_unit_indices": site.final.get("dead_indices", []),
        "consecutive_dead_measurements": site.final.get("dead_measurements_median"),
        "feeding_layer": ctx.name(site.layer) if site.layer is not None else None,
        "bias_init_mean": site.bias_init, "bias_dead_mean": bias,
        "bias_alive_mean": site.final.get("bias_alive_mean"),
        "pre_activation_mean": {"first": float(pre_mean[0]), "last": float(pre_mean[-1])},
        "pre_activation_std": {"first": float(pre_std[0]), "last": float(pre_std[-1])},
        "dead_units_max_pre_activation": float(dead_max[-1]),
        "dead_fraction_series": {"steps": steps[k].tolist(), "values": frac[ok][k].tolist()},
        "still_learning": None if learns is None else {"loss_when_dead": learns[0],
                                                       "loss_last": learns[1]},
    }
    if behind:
        evidence["dead_behind"] = [{k: v for k, v in b.items() if k != "label"}
                                   for b in behind]
    layers = [ctx.name(site.layer)] if site.layer is not None else []
    layers += [b["site"] for b in behind]
    return Finding(kind=KIND, severity=severity, first_step=first_step,
                   last_step=int(steps[-1]), layers=list(dict.fromkeys([*layers, name])),
                   summary=summary,
                   evidence=evidence, causes=causes, remedies=remedies)


# ------------------------------------------------------------ this kind's causes
def _site_first_last(ctx: Context, i: int, stat: str) -> tuple[float, float] | None:
    """A site's statistic at its first and last measurement in this view."""
    v = ctx.site_stat(stat)[:, i]
    v = v[np.isfinite(v)]
    return (float(v[0]), float(v[-1])) if v.size else None


def _weights_push_down(ctx: Context, i: int) -> float | None:
    """The site's mean pre-activation at the end, where it is negative and the dead units'
    bias is less than half of it: the weights, not the bias, put the units below zero."""
    b_dead = ctx.site(i).final.get("bias_dead_mean")
    mean = _site_first_last(ctx, i, "pre_mean")
    if mean is None or not mean[1] < 0:
        return None
    if b_dead is not None and -b_dead >= 0.5 * -mean[1]:
        return None
    return mean[1]


def weights_push_down(ctx: Context, i: int) -> Cause | None:
    """Units below zero because of what their weights make of the inputs, the bias being
    a small part of it."""
    site = ctx.site(i)
    mean = _weights_push_down(ctx, i)
    if mean is None or site.layer is None:
        return None
    b_dead = site.final.get("bias_dead_mean")
    bias = f" (the bias on the dead units is {fmt(b_dead)})" if b_dead is not None else ""
    return Cause("weights_push_below_zero",
                 f"the pre-activations of {ctx.site_label(i)} average {fmt(mean)} at the end"
                 f"{bias}: the weights of {ctx.label(site.layer)}, not its bias, put the units "
                 f"below zero")


def negative_bias(ctx: Context, i: int) -> Cause | None:
    """The bias feeding a ReLU site's dead units is more negative than the pre-activation
    spread: no input of the batch lifts those units above zero."""
    site = ctx.site(i)
    b_dead = site.final.get("bias_dead_mean")
    spread = _site_first_last(ctx, i, "pre_std")
    if b_dead is None or spread is None or site.layer is None or b_dead >= 0:
        return None
    fan_in = ctx.layer(site.layer).fan_in
    default = 1 / math.sqrt(fan_in) if fan_in else 0.0
    # Both beyond the spread of the pre-activations and beyond anything PyTorch's default
    # init draws (U(-1/sqrt(fan_in), 1/sqrt(fan_in))): a bias someone or something set.
    if -b_dead < spread[0] or -b_dead <= default or _weights_push_down(ctx, i) is not None:
        return None
    alive = site.final.get("bias_alive_mean")
    origin = ("it was set so at initialisation" if site.bias_init is not None
              and site.bias_init <= b_dead / 2 else
              f"updates drove it there (mean bias {fmt(site.bias_init)} when first seen)")
    return Cause("large_negative_bias",
                 f"the bias of {ctx.label(site.layer)} on the dead units is {fmt(b_dead)} "
                 f"(mean; {fmt(alive)} on the live ones), larger in magnitude than the "
                 f"pre-activation spread at the first measurement (std {fmt(spread[0])}): no "
                 f"input lifts them above 0; {origin}")


def learning_rate_spike(ctx: Context, since: int, layer: int | None) -> Cause | None:
    """Units died right after the learning rate rose, or after an update far larger than
    the weights' own scale (measured at the layer feeding them)."""
    lr = ctx.h.steps.block("lr")[:, 0]
    steps = ctx.h.steps.steps
    # The units died between the measurement before ``since`` and ``since``.
    earlier = ctx.site_steps[ctx.site_steps < since]
    prev = int(earlier[-1]) if earlier.size else since - 1
    ok = np.isfinite(lr)
    before = ok & (steps <= prev)
    near = ok & (steps > prev) & (steps <= since)
    if before.any() and near.any():
        base, peak = float(np.median(lr[before])), float(np.max(lr[near]))
        if base > 0 and peak >= 2 * base:
            k = int(steps[near][int(np.argmax(lr[near]))])
            return Cause("learning_rate_spike",
                         f"the learning rate rose to {fmt(peak)} at step {k} (from "
                         f"{fmt(base)} before), and the units died from step {since} on: one "
                         f"large update pushed their pre-activations below 0 for every input")
    if layer is None:
        return None
    ratio = ctx.update_ratio[:, layer] if ctx.update_ratio.shape[1] > layer else None
    if ratio is None:
        return None
    window = ctx.detail_window(prev, since)
    r = ratio[window]
    r = r[np.isfinite(r)]
    if r.size and float(r.max()) >= ctx.t.large_update_ratio:
        return Cause("learning_rate_spike",
                     f"an update around step {since}, when the units died, changed "
                     f"{ctx.label(layer)} by {fmt(100 * float(r.max()))}% of its norm "
                     f"(healthy: about {fmt(100 * ctx.t.target_update_ratio)}%): such a step "
                     f"can push a unit's pre-activation below 0 for every input")
    return None


def dead_at_init(ctx: Context, i: int) -> Cause | None:
    """A ReLU site was already mostly dead at the first measurement, before updates mattered."""
    first = _site_first_last(ctx, i, "fraction")
    steps = ctx.site_steps[np.isfinite(ctx.site_stat("fraction")[:, i])]
    if first is None or not steps.size or steps[0] > 0 or first[0] < ctx.t.dying_fraction:
        return None
    site = ctx.site(i)
    scale = ctx.init_scale(site.layer) if site.layer is not None else None
    how = (f"; {ctx.label(site.layer)} starts at {fmt(scale['ratio'])}x the "
           f"{scale['family'].capitalize()} std" if scale and
           not ctx.t.init_scale_low <= scale["ratio"] <= ctx.t.init_scale_high else "")
    return Cause("dead_at_init",
                 f"{fmt(100 * first[0])}% of the units were already dead at the first forward "
                 f"pass (step 0), before any update: the initialisation put them there{how}")
