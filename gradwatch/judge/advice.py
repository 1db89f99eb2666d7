"""Remedies that fit the causes found, with parameters measured on this run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..findings import Cause, Remedy
from .causes import input_stats
from .context import Context, Group, fmt

__all__ = ["clip_threshold", "depth_remedies", "lower_lr", "remedy", "round_sig",
           "standardize"]


def remedy(remedy_id: str, **params: Any) -> Remedy:
    """Remedy ``remedy_id`` with the parameters measured on this run. The judge says which
    remedy and with what numbers; its text, code and applier are ``gradwatch.remedies``',
    which fills them in when the report is built."""
    return Remedy(remedy_id, "", "", params=dict(params))


def round_sig(x: float, digits: int = 1) -> float:
    if x <= 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def _ratio(causes: list[Cause], cause_id: str) -> bool:
    return any(c.id == cause_id for c in causes)


def standardize(ctx: Context, causes: list[Cause]) -> Remedy | None:
    """Input standardisation where a cause found the inputs unscaled, with the inputs' mean
    and std measured over the whole run: every finding that offers it proposes the same
    numbers, so one ``--verify`` re-run answers for all of them."""
    stats = input_stats(ctx) if _ratio(causes, "unscaled_inputs") else None
    if stats is None:
        return None
    return remedy("standardize_inputs", mean=fmt(stats[1]), std=fmt(stats[2]))


RELU_LIKE = ("relu", "leaky_relu", "elu", "gelu", "silu", "prelu", "mish", "hardswish")


def depth_remedies(ctx: Context, group: Group | None, causes: list[Cause]) -> list[Remedy]:
    """Init, activation, normalisation and skip remedies for depth-related problems."""
    if group is None:
        return remedies_for_depth([], causes, None, 10)
    return remedies_for_depth([ctx.act_after(i) for i in group.layers], causes,
                              ctx.layer(group.layers[len(group.layers) // 2]).fan_in,
                              len(group.layers))


def remedies_for_depth(acts: list[str], causes: list[Cause], width: int | None, depth: int,
                       init_ratio: float | None = None) -> list[Remedy]:
    """The init (and activation, normalisation, skip) remedies that fit depth-related causes,
    given the activation after each weight layer (training runs and preflight alike)."""
    out: list[Remedy] = []
    saturating = _ratio(causes, "sigmoid_in_deep_stack") or _ratio(causes, "tanh_in_deep_stack")
    relu_like = sum(a in RELU_LIKE for a in acts) >= max(1, len(acts) // 2)
    init_bad = _ratio(causes, "init_too_small") or _ratio(causes, "init_too_large") or \
        _ratio(causes, "signal_shrinks_forward") or _ratio(causes, "forward_overflow")
    if relu_like and init_bad:
        out.append(remedy("kaiming_init", nonlinearity="relu",
                          **({"ratio": init_ratio} if init_ratio else {})))
    if saturating:
        out.append(remedy("leaky_relu", old="(nn.Sigmoid, nn.Tanh)"))
        out.append(remedy("kaiming_init", nonlinearity="leaky_relu"))
    elif init_bad and not relu_like:
        act = next((a for a in acts if a in ("tanh", "sigmoid")), "linear")
        out.append(remedy("xavier_init", nonlinearity=act))
    if _ratio(causes, "deep_plain_stack"):
        out.append(remedy("batch_norm"))
        out.append(remedy("residual_connections", width=width or "width",
                          depth=max(1, depth - 2)))
    # de-duplicate by id, keep order
    seen: set[str] = set()
    return [r for r in out if not (r.id in seen or seen.add(r.id))]  # type: ignore[func-returns-value]


#: A total gradient norm this many times the smallest one before it ends the healthy early
#: steps that a clipping threshold is measured on.
JUMP = 10.0


def clip_threshold(ctx: Context) -> float | None:
    """Median total gradient norm over the early steps: a clipping threshold, or None.

    None when the early steps were not healthy themselves (gradient already far larger
    than the weights): clipping at a norm measured on exploding steps changes nothing.
    """
    total = ctx.total_grad
    ok = np.isfinite(total) & (total > 0)
    if not ok.any():
        return None
    steps, finite = ctx.steps[ok], total[ok]
    n = max(ctx.t.baseline_steps, int(len(finite) * ctx.t.baseline_fraction))
    # Only the steps before the first jump: an explosion that starts within the early
    # steps must not set the threshold (the norm 10x the smallest one before it).
    jumps = np.nonzero(finite[1:n] > JUMP * np.minimum.accumulate(finite[:n])[:-1])[0]
    n = int(jumps[0]) + 1 if jumps.size else n
    early, early_steps = finite[:n], steps[:n]
    weight = np.sqrt(np.nansum(ctx.detail("weight_norm") ** 2, axis=1))
    rows = np.isin(ctx.detail_steps, early_steps) & np.isfinite(weight) & (weight > 0)
    if rows.any():
        measured = np.isin(early_steps, ctx.detail_steps[rows])
        ratio = early[measured] / weight[rows]
        if float(np.median(ratio)) > ctx.t.exploding_grad_to_weight:
            return None
    return round_sig(float(np.median(early)), 2)


def lower_lr(ctx: Context, since: int | None = None, until: int | None = None,
             blow_up: bool = False, peak: bool = False, anyway: bool = False
             ) -> Remedy | None:
    """A learning rate scaled so that the update ratio measured in ``[since, until]`` (median
    over sampled steps) meets the target; offered only where that ratio is too large
    (``large_update_ratio``, the same test as the learning_rate_too_high cause).

    ``blow_up``: the window is an explosion or divergence, whose updates are sized by the
    exploding gradients rather than by the rate, so the reduction is capped at
    ``explosion_lr_reduction``. ``peak``: size by the largest update of the window, not the
    median: at a blow-up's onset one or two oversized updates do the damage, and the weights
    they kill or freeze barely move afterwards. ``anyway``: offered whatever the ratio (the
    updates did the damage, as the measured cause says), cut as for a blow-up."""
    per_step = ctx.step_update_ratio[ctx.detail_window(since, until)]
    per_step = per_step[np.isfinite(per_step)]
    rates = ctx.learning_rates_between(since, until)
    if not rates or not per_step.size:
        return None
    measured = float(np.max(per_step) if peak else np.median(per_step))
    old = max(rates)
    target = ctx.t.target_update_ratio
    if measured < ctx.t.large_update_ratio and not anyway:
        return None
    # The code scales the optimizer's own learning rate, whatever it is by then (a
    # schedule may have moved it since it was recorded).
    floor = 1 / (ctx.t.explosion_lr_reduction if blow_up else ctx.t.max_lr_reduction)
    factor = round_sig(max(target / measured, floor))
    return remedy("lower_learning_rate", old_lr=fmt(old), lr=round_sig(old * factor),
                  factor=factor, measured=fmt(measured), target=fmt(target),
                  capped=blow_up and factor == round_sig(floor))
