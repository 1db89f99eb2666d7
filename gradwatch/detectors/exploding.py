"""exploding_gradient: gradient norms grow by orders of magnitude, through depth or time,
or are huge relative to the weights they update."""

from __future__ import annotations

import numpy as np

from .. import causes as C
from ..findings import Finding, Remedy
from ..remedies import remedy
from .advice import clip_threshold, depth_remedies, lower_lr
from .context import Context, fmt

KIND = "exploding_gradient"


def _grad_to_weight(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """Sampled steps and whole-model raw gradient norm / weight norm."""
    w = ctx.detail("weight_norm")
    if not w.size:
        return np.array([], dtype=int), np.array([])
    total_w = np.sqrt(np.nansum(w ** 2, axis=1))
    idx = np.clip(np.searchsorted(ctx.steps, ctx.detail_steps), 0, max(0, len(ctx.steps) - 1))
    g = ctx.total_grad[idx] if len(ctx.steps) else np.full(len(total_w), np.nan)
    ok = np.isfinite(g) & np.isfinite(total_w) & (total_w > 0) & \
        (ctx.steps[idx] == ctx.detail_steps)
    return ctx.detail_steps[ok], g[ok] / total_w[ok]


def detect(ctx: Context) -> list[Finding]:
    t = ctx.t
    total = ctx.total_grad
    finite = np.isfinite(total) & (total > 0)
    reasons: list[str] = []
    evidence: dict = {}
    first: list[int] = []
    layers: set[str] = set()
    worst = 0.0  # how far past its limit the strongest signal is

    # 1. growth over time against the early-run baseline
    if finite.sum() > t.baseline_steps:
        steps_f, total_f = ctx.steps[finite], total[finite]
        base = float(np.median(total_f[: t.baseline_steps]))
        growth = total_f / base
        over = growth > t.exploding_growth
        if over.any():
            k = int(np.argmax(over))
            peak = int(np.argmax(growth))
            first.append(int(steps_f[k]))
            worst = max(worst, float(growth[peak]) / t.exploding_growth)
            evidence.update(grad_norm_baseline=base, grad_norm_peak=float(total_f[peak]),
                            grad_norm_peak_step=int(steps_f[peak]),
                            growth=float(growth[peak]))
            reasons.append(f"the total gradient norm grew {fmt(float(growth[peak]))}x from "
                           f"{fmt(base)} to {fmt(float(total_f[peak]))} (step "
                           f"{int(steps_f[peak])})")
            g = ctx.grad[np.searchsorted(ctx.steps, steps_f[peak])]
            order = np.argsort(np.where(np.isfinite(g), g, -1))[::-1]
            layers.update(ctx.name(int(i)) for i in order[:3] if np.isfinite(g[i]))

    # 2. gradient huge relative to the weights
    s, ratio = _grad_to_weight(ctx)
    if ratio.size and ratio.max() > t.exploding_grad_to_weight:
        k = int(np.argmax(ratio > t.exploding_grad_to_weight))
        peak = float(ratio.max())
        first.append(int(s[k]))
        worst = max(worst, peak / t.exploding_grad_to_weight)
        evidence.update(grad_to_weight_ratio=peak, grad_to_weight_step=int(s[k]))
        reasons.append(f"the gradient is {fmt(peak)}x the norm of the weights it updates "
                       f"(step {int(s[k])})")

    # 3. growth through depth: input side far larger than output side
    for group in ctx.groups:
        if len(group.layers) < t.min_layers:
            continue
        steps, r = ctx.depth_ratio(group)
        if r.size >= 2 and (r > t.exploding_depth_ratio).mean() >= t.persistence:
            med = float(np.median(r))
            first.append(int(steps[np.argmax(r > t.exploding_depth_ratio)]))
            worst = max(worst, med / t.exploding_depth_ratio)
            evidence["grad_norm_ratio_first_to_last"] = med
            layers.add(ctx.name(group.layers[0]))
            reasons.append(f"{ctx.label(group.layers[0])} gets {fmt(med)}x the gradient of "
                           f"{ctx.label(group.layers[-1])}")

    if not reasons:
        return []
    if not layers:
        g = np.nanmax(np.where(np.isfinite(ctx.grad), ctx.grad, np.nan), axis=0) \
            if ctx.grad.size else np.array([])
        order = np.argsort(np.where(np.isfinite(g), g, -1))[::-1]
        layers.update(ctx.name(int(i)) for i in order[:3] if np.isfinite(g[i]))
    start = min(first)
    ev = ctx.h.events
    fs, fl = ctx.finite_loss()
    if fl.size:
        evidence.update(loss_first=float(fl[0]), loss_best=ctx.best_loss,
                        loss_last=float(fl[-1]), loss_max=float(fl.max()))
    if ev.first_nonfinite_grad is not None:
        evidence["first_nonfinite_grad_step"] = ev.first_nonfinite_grad
    severity = "error" if worst >= t.exploding_error_factor or \
        ctx.first_nonfinite_loss is not None or ev.first_nonfinite_grad is not None else "warning"

    group = max(ctx.groups, key=lambda g: len(g.layers)) if ctx.groups else None
    overflow = C.forward_overflow(ctx)
    causes = [c for c in (overflow, C.clipping_to_zero(ctx),
                          C.init_scale(ctx, group) if group else None,
                          None if overflow else C.learning_rate_too_high(ctx),
                          C.unscaled_inputs(ctx),
                          C.deep_plain_stack(ctx, group) if group else None) if c]
    remedies: list[Remedy] = []
    remedies += depth_remedies(ctx, group, causes) if group else []
    if any(c.id == "unscaled_inputs" for c in causes):
        remedies.insert(0, remedy("standardize_inputs",
                                  mean=fmt(float(np.nanmedian(ctx.io("input_mean")))),
                                  std=fmt(float(np.nanmedian(ctx.io("input_std"))))))
    lr = None if overflow else lower_lr(ctx)
    if lr:
        remedies.append(lr)
    if overflow is None:
        threshold = clip_threshold(ctx)
        if threshold:
            remedies.append(remedy("clip_grad_norm", max_norm=threshold))
    tail = (" The forward pass already overflows, so gradient clipping cannot help."
            if overflow else "")
    if fl.size and float(fl[-1]) > ctx.best_loss * 2:
        loss_note = f"; the loss rose from its best {fmt(ctx.best_loss)} to {fmt(float(fl[-1]))}"
    elif fl.size > 2 and np.std(np.diff(np.log10(np.abs(fl) + 1e-30))) > 0.3:
        loss_note = "; the loss fluctuates by orders of magnitude"
    else:
        loss_note = ""
    summary = f"{ctx.subject}Gradients explode: {'; '.join(reasons)}{loss_note}.{tail}"
    return [Finding(KIND, severity, start, int(ctx.steps[-1]) if len(ctx.steps) else start,
                    sorted(layers), summary, evidence, causes, remedies)]
