"""Causes, each checked against the measured model and optimizer; one that does not hold
for this model returns ``None`` and is never listed.

Every check returns a :class:`~gradwatch.findings.Cause` whose text carries the numbers
that made it hold.
"""

from __future__ import annotations

import math

import numpy as np

from .detectors.context import Context, Group, fmt
from .findings import Cause

__all__ = ["CAUSE_IDS", "saturating_activation", "init_scale", "deep_plain_stack",
           "learning_rate_too_high", "unscaled_inputs", "forward_overflow",
           "clipping_to_zero", "signal_shrinks_forward"]

CAUSE_IDS = ("sigmoid_in_deep_stack", "tanh_in_deep_stack", "init_too_small", "init_too_large",
             "deep_plain_stack", "learning_rate_too_high", "unscaled_inputs",
             "forward_overflow", "clipping_on_infinite_norm", "gradient_zeroed_before_step",
             "signal_shrinks_forward")


def saturating_activation(ctx: Context, group: Group) -> Cause | None:
    """Sigmoid/tanh after most layers of a deep stack."""
    acts = [ctx.act_after(i) for i in group.layers]
    for act in ("sigmoid", "tanh"):
        n = sum(a == act for a in acts)
        if n >= max(2, ctx.t.deep_stack_layers - 1) or (n >= 2 and n >= len(acts) // 2):
            bound = "0.25" if act == "sigmoid" else "1 (and far less off-centre)"
            return Cause(f"{act}_in_deep_stack",
                         f"{n} of the {len(acts)} layers feed a {act}; its derivative is at "
                         f"most {bound}, so every layer multiplies the backward signal by "
                         f"that factor times its weights")
    return None


def init_scale(ctx: Context, group: Group) -> Cause | None:
    """Initial weight std far from the Kaiming/Xavier std for the activation that follows."""
    scales = [(i, ctx.init_scale(i)) for i in group.layers]
    scales = [(i, s) for i, s in scales if s]
    if not scales:
        return None
    ratios = np.array([s["ratio"] for _, s in scales])
    for kind, mask in (("small", ratios < ctx.t.init_scale_low),
                       ("large", ratios > ctx.t.init_scale_high)):
        if mask.sum() * 2 < len(scales):
            continue
        picked = [scales[k] for k in np.nonzero(mask)[0]]
        med = float(np.median([s["ratio"] for _, s in picked]))
        fam = picked[0][1]["family"]
        act = picked[0][1]["activation"]
        names = _span([ctx.label(i) for i, _ in picked])
        text = (f"weights start at {fmt(med)}x the {fam.capitalize()} std for the "
                f"{act} that follows ({names}); ")
        text += ("each layer shrinks the signal, forward and backward" if kind == "small"
                 else "each layer multiplies the signal, forward and backward")
        return Cause(f"init_too_{kind}", text)
    return None


def signal_shrinks_forward(ctx: Context, group: Group) -> Cause | None:
    """Activation RMS falls layer after layer at initialisation (measured, forward)."""
    if len(group.layers) < ctx.t.min_layers:
        return None
    act = ctx.detail("act_rms")
    rows = [r for r in range(act.shape[0]) if np.isfinite(act[r, group.layers]).all()]
    if not rows:
        return None
    rms = act[rows[0], group.layers]  # the model's first measured forward
    if rms[0] <= 0 or rms[-2] <= 0:
        return None
    factor = (rms[-2] / rms[0]) ** (1 / max(1, len(rms) - 2))
    if factor > 0.7:
        return None
    return Cause("signal_shrinks_forward",
                 f"the forward signal shrinks {fmt(1 / factor)}x per layer at the first step "
                 f"(activation RMS {fmt(rms[0])} after {ctx.label(group.layers[0])}, "
                 f"{fmt(rms[-2])} after {ctx.label(group.layers[-2])}): the backward "
                 f"signal shrinks with it")


def deep_plain_stack(ctx: Context, group: Group) -> Cause | None:
    """Many layers with no skip connection and no normalisation in the graph."""
    n = len(group.layers)
    facts = ctx.structure(group.root)
    has_norm = bool(facts.get("norm_ops")) or bool(facts.get("norm_modules"))
    if n < ctx.t.deep_stack_layers or has_norm or facts.get("branch_merges", 1):
        return None
    return Cause("deep_plain_stack",
                 f"{n} layers in a plain chain: the autograd graph has no skip connection "
                 f"and no normalisation layer to keep the gradient scale from compounding")


def learning_rate_too_high(ctx: Context) -> Cause | None:
    """Measured updates that are a large fraction of the weights they change."""
    r = ctx.update_ratio
    if r.size == 0 or not np.isfinite(r).any():
        return None
    finite = np.where(np.isfinite(r), r, -1)
    k = np.unravel_index(int(np.argmax(finite)), finite.shape)
    peak = float(finite[k])
    if peak < ctx.t.large_update_ratio:
        return None
    lrs = ", ".join(fmt(lr) for lr in sorted(set(ctx.learning_rates))) or "n/a"
    return Cause("learning_rate_too_high",
                 f"one update changed {ctx.label(int(k[1]))} by {fmt(100 * peak)}% of its norm "
                 f"(step {int(ctx.detail_steps[k[0]])}; learning rate {lrs}); healthy "
                 f"updates are around {fmt(100 * ctx.t.target_update_ratio)}%")


def unscaled_inputs(ctx: Context) -> Cause | None:
    """Model inputs far from unit scale."""
    x = ctx.io("input_rms")
    x = x[np.isfinite(x)]
    if not x.size:
        return None
    value = float(np.median(x))
    hi = ctx.t.input_scale_high
    if 1 / hi <= value <= hi:
        return None
    mean = np.nanmedian(ctx.io("input_mean"))
    std = np.nanmedian(ctx.io("input_std"))
    return Cause("unscaled_inputs",
                 f"the model's inputs have RMS {fmt(value)} (mean {fmt(float(mean))}, std "
                 f"{fmt(float(std))}), far from the unit scale initialisations assume")


def forward_overflow(ctx: Context) -> Cause | None:
    """The forward pass already produces astronomically large values."""
    _, loss = ctx.finite_loss()
    out = ctx.io("output_rms")
    peak_out = float(np.nanmax(out)) if np.isfinite(out).any() else 0.0
    first_loss = ctx.first_loss
    lim = ctx.t.forward_overflow
    if (first_loss is None or first_loss < lim) and peak_out < lim and \
            ctx.first_nonfinite_loss is None:
        return None
    if first_loss is not None and first_loss >= lim:
        what = f"the very first loss is {fmt(first_loss)}"
    elif peak_out >= lim:
        what = f"the model's output reaches RMS {fmt(peak_out)}"
    else:
        what = f"the loss itself became non-finite at step {ctx.first_nonfinite_loss}"
    return Cause("forward_overflow",
                 f"{what}: the forward pass overflows before any gradient is applied, so "
                 f"gradient clipping cannot help; the weights themselves must change scale")


def clipping_to_zero(ctx: Context) -> Cause | None:
    """Gradients applied by the optimizer are zero although backward produced non-zero ones."""
    raw = ctx.detail("grad_norm_applied")
    if raw.size == 0:
        return None
    applied = np.sqrt(np.nansum(raw ** 2, axis=1))
    measured = np.isfinite(raw).any(axis=1)
    idx = np.searchsorted(ctx.steps, ctx.detail_steps)
    idx = np.clip(idx, 0, len(ctx.steps) - 1)
    before = ctx.total_grad[idx] if len(ctx.steps) else np.array([])
    zeroed = measured & (applied == 0) & (before > 0)
    if not zeroed.any():
        return None
    k = int(np.nonzero(zeroed)[0][0])
    raw_total = float(before[k])
    f32_max = math.sqrt(np.finfo(np.float32).max)
    if raw_total > f32_max or not math.isfinite(raw_total):
        return Cause("clipping_on_infinite_norm",
                     f"the raw gradient norm is {fmt(raw_total)}; its square overflows "
                     f"float32, so clip_grad_norm_ computes an infinite total norm and "
                     f"multiplies every gradient by max_norm/inf = 0: no weight moves "
                     f"(from step {int(ctx.detail_steps[k])})")
    return Cause("gradient_zeroed_before_step",
                 f"backward() produced a gradient of norm {fmt(raw_total)} but the optimizer "
                 f"received all-zero gradients (step {int(ctx.detail_steps[k])}): something "
                 f"between backward() and step() zeroes them")


def _span(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]}, {len(names)} layers"
