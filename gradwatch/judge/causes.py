"""Causes, each checked against the measured model and optimizer; one that does not hold
for this model returns ``None`` and is never listed.

Every check returns a :class:`~gradwatch.findings.Cause` whose text carries the numbers
that made it hold.
"""

from __future__ import annotations

import math

import numpy as np

from ..findings import Cause
from .context import Context, Group, fmt

__all__ = [
    "CAUSE_IDS",
    "clipping_to_zero",
    "deep_plain_stack",
    "forward_overflow",
    "init_scale",
    "input_stats",
    "learning_rate_too_high",
    "saturating_activation",
    "signal_shrinks_forward",
    "span",
    "unscaled_inputs",
]

CAUSE_IDS = ("sigmoid_in_deep_stack", "tanh_in_deep_stack", "init_too_small", "init_too_large",
             "deep_plain_stack", "learning_rate_too_high", "unscaled_inputs",
             "forward_overflow", "clipping_on_infinite_norm", "gradient_zeroed_before_step",
             "signal_shrinks_forward")
"""The ids of the causes shared by several detectors (checked here); each detector module
lists the ids of its own causes in ``CAUSES``."""


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


def init_scale(ctx: Context, group: Group,
               directions: tuple[str, ...] = ("small", "large")) -> Cause | None:
    """Initial weight std far from the Kaiming/Xavier std for the activation that follows.

    ``directions`` says which deviation can explain the finding at hand: a too-small init
    never makes values explode or overflow. A single layer has nothing to compound, so
    its init scale is never a cause.
    """
    if len(group.layers) < 2:
        return None
    scales = [(i, ctx.init_scale(i)) for i in group.layers]
    scales = [(i, s) for i, s in scales if s]
    if not scales:
        return None
    ratios = np.array([s["ratio"] for _, s in scales])
    for kind, mask in (("small", ratios < ctx.t.init_scale_low),
                       ("large", ratios > ctx.t.init_scale_high)):
        if kind not in directions or mask.sum() * 2 < len(scales):
            continue
        picked = [scales[k] for k in np.nonzero(mask)[0]]
        # One phrase per activation: the output layer (no activation) reads apart from
        # the ReLU layers before it.
        by_act: dict[str, list[tuple[int, dict]]] = {}
        for i, sc in picked:
            by_act.setdefault(sc["activation"], []).append((i, sc))
        parts = []
        for act, items in sorted(by_act.items(), key=lambda kv: -len(kv[1])):
            med = float(np.median([sc["ratio"] for _, sc in items]))
            fam = items[0][1]["family"].capitalize()
            after = "a layer without activation" if act in ("none", "unknown") else \
                f"the {act} that follows"
            parts.append(f"{fmt(med)}x the {fam} std for {after} "
                         f"({span([ctx.label(i) for i, _ in items])})")
        text = f"weights start at {'; and '.join(parts)}: "
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
    if factor > ctx.t.forward_shrink_per_layer:
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


def learning_rate_too_high(ctx: Context, since: int | None = None,
                           until: int | None = None) -> Cause | None:
    """Updates that are, typically (median over the sampled steps of ``[since, until]``), a
    large fraction of the weights they change.

    The median, not the peak: the first update of weights initialised near zero is large
    relative to them whatever the learning rate.
    """
    window = ctx.detail_window(since, until)
    per_step = ctx.step_update_ratio[window]
    ok = np.isfinite(per_step)
    if not ok.any():
        return None
    typical = float(np.median(per_step[ok]))
    if typical < ctx.t.large_update_ratio:
        return None
    r = np.where(np.isfinite(ctx.update_ratio[window]), ctx.update_ratio[window], -1)
    k = np.unravel_index(int(np.argmax(r)), r.shape)
    lrs = ", ".join(fmt(lr) for lr in ctx.learning_rates_between(since, until)) or "n/a"
    steps = ctx.detail_steps[window]
    return Cause("learning_rate_too_high",
                 f"each update changes the weights by {fmt(100 * typical)}% of their norm "
                 f"(median of {int(ok.sum())} measured steps from step {int(steps[ok][0])}; "
                 f"up to {fmt(100 * float(r[k]))}% in {ctx.label(int(k[1]))} at step "
                 f"{int(steps[k[0]])}; learning rate {lrs}); healthy updates are around "
                 f"{fmt(100 * ctx.t.target_update_ratio)}%")


def input_stats(ctx: Context, since: int | None = None) -> tuple[float, float, float] | None:
    """Median RMS, mean and std of the model's (finite) inputs on sampled steps from ``since``."""
    window = ctx.detail_window(since, None)
    rms, mean, std = (ctx.io(k)[window] for k in ("input_rms", "input_mean", "input_std"))
    ok = np.isfinite(rms)
    if not ok.any():
        return None
    return float(np.median(rms[ok])), float(np.median(mean[ok])), float(np.median(std[ok]))


def unscaled_inputs(ctx: Context, since: int | None = None) -> Cause | None:
    """Model inputs far from unit scale (on the sampled steps from ``since`` on)."""
    stats = input_stats(ctx, since)
    if stats is None:
        return None
    value, mean, std = stats
    hi = ctx.t.input_scale_high
    if 1 / hi <= value <= hi:
        return None
    whole = input_stats(ctx)
    changed = ""
    if since is not None and whole is not None and 1 / hi <= whole[0] <= hi:
        changed = f" from step {since} on (over the whole run: RMS {fmt(whole[0])})"
    return Cause("unscaled_inputs",
                 f"the model's inputs have RMS {fmt(value)} (mean {fmt(mean)}, std "
                 f"{fmt(std)}){changed}, far from the unit scale initialisations assume")


def forward_overflow(ctx: Context) -> Cause | None:
    """The very first forward pass, before any update, already produces astronomical values.

    Only then can one say that gradient clipping cannot help: a forward pass that
    overflows later, after updates made the weights huge, is the consequence of those
    updates (which clipping or a lower learning rate would have kept small).
    """
    if not len(ctx.steps):
        return None
    lim = ctx.t.forward_overflow
    first_step = int(ctx.steps[0])
    first = float(ctx.loss[0])  # +inf encodes a NaN/Inf loss
    out = ctx.io("output_rms")
    at_start = ctx.detail_steps == first_step
    out0 = float(out[at_start][0]) if at_start.any() else math.nan
    if math.isfinite(first) and first >= lim:
        what = f"the very first loss is {fmt(first)}"
    elif not math.isnan(out0) and out0 >= lim:
        what = f"the model's first output has RMS {fmt(out0)}"
    else:
        return None
    return Cause("forward_overflow",
                 f"{what} (step {first_step}, before any update): the initial weights make "
                 f"the forward pass blow up, and its gradients are too large to square in "
                 f"float32. Clipping limits the size of a step, not the scale of the weights, "
                 f"so it cannot help (in float32, clip_grad_norm_ even zeroes every "
                 f"gradient); the weights must be re-initialised")


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


# --- activation sites ---------------------------------------------------------------


"""|pre-activation| beyond which the activation is within 1% of its range from a bound."""


def span(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]}, {len(names)} layers"


# --- eval mode: no-grad forwards with mode-dependent layers in training mode ---------------


# --------------------------------------------------------------------------- through time


