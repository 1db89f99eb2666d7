"""vanishing_gradient: input-side layers persistently get a tiny fraction of the gradient."""

from __future__ import annotations

import numpy as np

from ...findings import Cause, Finding
from .. import causes as C
from ..advice import depth_remedies, remedy
from ..context import Context, Group, fmt
from . import through_time

KIND = "vanishing_gradient"
CAUSES = ("dead_units_block_gradient", *through_time.CAUSES)
"""The ids of the causes this detector names besides the shared ones of ``causes.py``
(through time too)."""


def starved(ctx: Context,
            group: Group) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """If the group's first layer is persistently starved: the starved steps, their depth
    ratios, and the ratios of every step checked.

    Persistent means: below the limit on most steps while the output side still gets a
    gradient, and on at least ``min_steps`` steps (or ``persistence`` of a shorter run), or
    on an unbroken stretch of at least ``min_steps`` sampled steps from the start. The
    second catches nets that starve at initialisation and then settle on a constant output,
    after which every layer's gradient is tiny and ratios mean nothing. The step count
    keeps a few blown-up steps (saturated units at the end of an explosion, which dwarf
    every earlier gradient) from counting as a vanishing run.
    """
    if len(group.layers) < ctx.t.min_layers:
        return None
    steps, ratio = ctx.depth_ratio(group)
    if steps.size < 2:
        return None
    g = ctx.grad[:, [group.layers[0], group.layers[-1]]]
    valid = np.isfinite(g).all(axis=1) & (g[:, 1] > 0)
    enough = min(ctx.t.min_steps, ctx.t.persistence * int(valid.sum()))
    below = ratio < ctx.t.vanishing_ratio
    from_start = int(np.argmin(below)) if not below.all() else below.size
    if below.mean() >= ctx.t.persistence and below.sum() >= enough:
        return steps[below], ratio[below], ratio
    starts_run = valid.any() and steps[0] == ctx.steps[valid][0]
    if starts_run and from_start >= enough:
        return steps[:from_start], ratio[:from_start], ratio
    # A net that settles within a few steps leaves few steps with an active gradient; if
    # every one of them (at least 3, from the start) is below the error limit, that is
    # vanishing too, however short.
    if starts_run and below.all() and steps.size >= 3 and \
            bool(np.all(ratio < ctx.t.vanishing_ratio_error)):
        return steps, ratio, ratio
    return None


@through_time.also(KIND)  # the same kind through time, for nn.RNN/LSTM/GRU
def detect(ctx: Context) -> list[Finding]:
    findings = []
    for group in ctx.groups:
        hit = starved(ctx, group)
        if hit is None:
            continue
        steps, starved_ratio, ratio = hit
        median = float(np.median(starved_ratio))
        profile = ctx.log_profile(group, steps)
        last = profile[-1]
        limit = np.log10(ctx.t.vanishing_ratio)
        starved_layers = [ctx.name(i) for i, p in zip(group.layers, profile, strict=True)
                          if np.isfinite(p) and p - last < limit]
        drops = profile[1:] - profile[:-1]  # log10 gain from layer k to k+1 (output side)
        finite = np.isfinite(drops)
        evidence = {
            "grad_norm_ratio_first_to_last": median,
            "grad_norm_ratio_at_first_step": float(starved_ratio[0]),
            "persistent_fraction": float((ratio < ctx.t.vanishing_ratio).mean()),
            "steps_checked": int(ratio.size),
            "per_layer_grad_norm": {ctx.name(i): float(10 ** p) if np.isfinite(p) else None
                                    for i, p in zip(group.layers, profile, strict=True)},
            "threshold": ctx.t.vanishing_ratio,
        }
        where = ""
        if finite.any():
            k = int(np.nanargmax(np.where(finite, drops, -np.inf)))
            mean_drop = float(np.nanmean(drops))
            evidence["largest_drop"] = {"from": ctx.name(group.layers[k + 1]),
                                        "to": ctx.name(group.layers[k]),
                                        "factor": float(10 ** drops[k])}
            evidence["mean_factor_per_layer"] = float(10 ** mean_drop)
            if drops[k] > 2 * mean_drop and drops[k] > np.log10(ctx.t.single_layer_drop):
                where = (f"; most of it is lost between {ctx.label(group.layers[k + 1])} and "
                         f"{ctx.label(group.layers[k])} ({fmt(10 ** drops[k])}x)")
            else:
                where = (f"; it is lost gradually, about {fmt(10 ** mean_drop)}x per layer "
                         f"over {len(group.layers)} layers")
        severity = "error" if median < ctx.t.vanishing_ratio_error else "warning"
        # Too large an init starves the input side only by saturating sigmoid/tanh units.
        saturating = C.saturating_activation(ctx, group)
        causes = [c for c in (saturating,
                              C.init_scale(ctx, group, ("small", "large") if saturating
                                           else ("small",)),
                              C.signal_shrinks_forward(ctx, group),
                              C.deep_plain_stack(ctx, group)) if c]
        remedies = depth_remedies(ctx, group, causes)
        blocked = dead_units_block(ctx, group)
        if blocked is not None:
            # Dead ReLU units pass no gradient at all: that, not the depth, is the cause.
            cause, site, how = blocked
            causes.insert(0, cause)
            where = f"; it is cut at {how} (see dying_relu)"
            remedies = [remedy("leaky_relu", site=site, old="(nn.ReLU, nn.ReLU6)"),
                        *remedies]
        summary = (f"{ctx.subject}Gradients vanish towards the input: "
                   f"{ctx.label(group.layers[0])} gets "
                   f"{fmt(median)} of the gradient norm of {ctx.label(group.layers[-1])}"
                   f"{where}, so the input-side layers barely learn.")
        findings.append(Finding(
            KIND, severity, int(steps[0]), int(steps[-1]), starved_layers or
            [ctx.name(group.layers[0])], summary, evidence, causes, remedies))
    return findings


# ------------------------------------------------------------ this kind's causes
def dead_units_block(ctx: Context, group: Group) -> tuple[Cause, str, str] | None:
    """A ReLU site inside the stack whose units are (nearly) all dead: no gradient passes it.

    Returns the cause, the site's name and a phrase saying how many of its units are dead.
    """
    for i in ctx.sites:
        site = ctx.site(i)
        units, dead = site.final.get("units"), site.final.get("dead_units", 0)
        if site.kind not in ("relu", "relu6") or not units or site.layer not in group.layers:
            continue
        if dead / units < ctx.t.dying_fraction_error:
            continue
        name = ctx.site_name(i)
        return (Cause("dead_units_block_gradient",
                      f"{dead} of {units} units at {name} (after {ctx.label(site.layer)}) "
                      f"output 0 for every sample: they pass no gradient back, so the "
                      f"layers before them get {'none' if dead == units else 'little'}"),
                name, f"{name}, where {'all ' if dead == units else ''}{dead} of {units} "
                f"units are dead")
    return None
