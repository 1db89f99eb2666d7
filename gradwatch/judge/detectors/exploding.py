"""exploding_gradient: gradient norms grow by orders of magnitude while the loss rises or
fluctuates, grow through depth, or stay huge relative to the weights they update."""

from __future__ import annotations

import dataclasses

import numpy as np

from ...findings import Finding, Remedy
from .. import causes as C
from ..advice import clip_threshold, depth_remedies, lower_lr, remedy, standardize
from ..context import Context, fmt
from . import through_time

KIND = "exploding_gradient"
CAUSES = (*through_time.CAUSES,)
"""The ids of the causes this detector names besides the shared ones of ``causes.py``
(through time too)."""


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


@dataclasses.dataclass
class Spike:
    """Steps whose raw gradient norm jumped far above its recent window."""

    steps: np.ndarray  # every such step
    step: int  # the largest jump's
    factor: float  # its norm / the window's median
    norm: float
    median: float
    applied: float | None  # the norm the optimizer applied there, when measured (clipping)


def grad_spike(ctx: Context) -> Spike | None:
    """The raw gradient norm's jumps to ``grad_spike_factor`` x the median of the
    ``spike_window`` measured steps before it and above ``onset_factor`` x the run's early
    level (a converged run's tiny gradients may jump 100x and still be small), or None."""
    t = ctx.t
    ctx = ctx.dense()  # every step around each outlier, also in a downsampled long run
    ok = np.isfinite(ctx.total_grad) & (ctx.total_grad > 0)
    steps, total = ctx.steps[ok], ctx.total_grad[ok]
    w = t.spike_window
    if total.size <= max(w, t.baseline_steps):
        return None
    median = np.median(np.lib.stride_tricks.sliding_window_view(total[:-1], w), axis=1)
    ratio = total[w:] / median
    over = (ratio > t.grad_spike_factor) & (total[w:] > t.onset_factor * ctx.early_level(total))
    if not over.any():
        return None
    k = int(np.argmax(np.where(over, ratio, 0)))
    step = int(steps[w + k])
    applied = ctx.detail("grad_norm_applied")[ctx.detail_steps == step]
    clipped = float(np.sqrt(np.nansum(applied[0] ** 2))) \
        if applied.size and np.isfinite(applied[0]).any() else None
    return Spike(steps[w:][over], step, float(ratio[k]), float(total[w + k]), float(median[k]),
                 clipped)


def _spike_reason(ctx: Context, spike: Spike) -> str:
    n = len(spike.steps)
    hid = (f"; clipping cut it to {fmt(spike.applied)} before the update, which hid it from "
           f"the loss" if spike.applied is not None and spike.applied < spike.norm / 2 else "")
    return (f"the raw gradient norm (before any clipping) jumped to {fmt(spike.norm)} at step "
            f"{spike.step}, {fmt(spike.factor)}x its median {fmt(spike.median)} over the "
            f"{ctx.t.spike_window} steps before ({n} such step{'s' if n > 1 else ''}){hid}")


def _spike_evidence(spike: Spike) -> dict:
    return {"grad_spike_step": spike.step, "grad_spike_norm": spike.norm,
            "grad_spike_window_median": spike.median, "grad_spike_factor": spike.factor,
            "grad_spike_steps": [int(s) for s in spike.steps[:20]],
            "grad_spike_applied_norm": spike.applied}


def _spike_finding(ctx: Context, spike: Spike) -> Finding:
    """Gradient spikes the run came back from: a warning, with a guard against them."""
    g = ctx.grad[np.searchsorted(ctx.steps, spike.step)]
    order = np.argsort(np.where(np.isfinite(g), g, -1))[::-1]
    layers = [ctx.name(int(i)) for i in order[:3] if np.isfinite(g[i])]
    clips = spike.applied is not None and spike.applied < spike.norm / 2
    remedies: list[Remedy] = [remedy("skip_spiking_steps",
                                     spike_factor=f"{ctx.t.grad_spike_factor:g}",
                                     window=ctx.t.spike_window)]
    if not clips and (threshold := clip_threshold(ctx)):
        remedies.append(remedy("clip_grad_norm", max_norm=threshold))
    summary = (f"{ctx.subject}Gradient spike: {_spike_reason(ctx, spike)}. The norm came back "
               f"to its level afterwards, but such a step is an explosion the run survived: "
               f"it sits at the edge of stability (an odd batch, too high a rate).")
    return Finding(KIND, "warning", int(spike.steps[0]), int(spike.steps[-1]),
                   ctx.in_forward_order(layers), summary, _spike_evidence(spike), [], remedies)


def loss_trouble(ctx: Context, since: int) -> str | None:
    """How the loss fails to improve from step ``since`` on, or None when it improves.

    Turning non-finite, rising past ``onset_factor`` x its best so far (a loss that
    fluctuates by orders of magnitude does), or not falling at all: large gradients with any
    of these are an explosion; with a loss that keeps falling they are not (a model leaving
    a flat start, or inputs on a large scale with a small enough learning rate).
    """
    t = ctx.t
    if np.isinf(ctx.loss[ctx.steps >= since]).any():
        return "the loss became non-finite"
    steps, loss = ctx.finite_loss()
    upto, tail = loss[steps <= since], loss[steps >= since]
    if tail.size < 2:
        return None  # nothing after the trigger to judge by
    best = float(upto.min()) if upto.size else float(loss[0])
    if best > 0 and float(tail.max()) >= t.onset_factor * best:
        return f"the loss rose from {fmt(best)} to {fmt(float(tail.max()))}"
    if float(tail[-1]) >= float(tail[0]) * (1 - t.plateau_rel_change):
        return f"the loss does not fall ({fmt(float(tail[0]))} then, {fmt(float(tail[-1]))} " \
            f"at the end)"
    return None


@through_time.also(KIND)  # the same kind through time, for nn.RNN/LSTM/GRU
def detect(ctx: Context) -> list[Finding]:
    t = ctx.t
    total = ctx.total_grad
    finite = np.isfinite(total) & (total > 0)
    reasons: list[str] = []
    evidence: dict = {}
    first: list[int] = []
    layers: set[str] = set()
    worst = 0.0  # how far past its limit the strongest signal is
    notes: list[str] = []
    spike = grad_spike(ctx)

    # 1. growth over time against the early-run baseline, with a loss that suffers from it
    if finite.sum() > t.baseline_steps:
        steps_f, total_f = ctx.steps[finite], total[finite]
        base = ctx.early_level(total_f)
        growth = total_f / base
        # Spikes the norm came back from are judged as spikes, not as growth.
        over = (growth > t.exploding_growth) & \
            ~np.isin(steps_f, spike.steps if spike else [])
        note = loss_trouble(ctx, int(steps_f[np.argmax(over)])) if over.any() else None
        if note is not None:
            notes.append(note)
            k = int(np.argmax(over))
            peak = int(np.argmax(growth))
            # Date it from the start of the rise: the step after the norm was last within
            # onset_factor of its baseline.
            near = np.nonzero(growth[: k + 1] <= t.onset_factor)[0]
            onset = int(near[-1]) + 1 if near.size else k
            first.append(int(steps_f[onset]))
            worst = max(worst, float(growth[peak]) / t.exploding_growth)
            evidence.update(grad_norm_baseline=base, grad_norm_peak=float(total_f[peak]),
                            grad_norm_peak_step=int(steps_f[peak]),
                            growth=float(growth[peak]), growth_onset_step=int(steps_f[onset]),
                            growth_past_limit_step=int(steps_f[k]))
            reasons.append(f"the total gradient norm grew {fmt(float(growth[peak]))}x from "
                           f"{fmt(base)} to {fmt(float(total_f[peak]))} (step "
                           f"{int(steps_f[peak])})")
            g = ctx.grad[np.searchsorted(ctx.steps, steps_f[peak])]
            order = np.argsort(np.where(np.isfinite(g), g, -1))[::-1]
            layers.update(ctx.name(int(i)) for i in order[:3] if np.isfinite(g[i]))

    # 2. gradient persistently huge relative to the weights while the loss does not
    # improve. Persistent: weights that start near zero get a large relative gradient on
    # their first steps in any run.
    s, ratio = _grad_to_weight(ctx)
    above = ratio > t.exploding_grad_to_weight
    note = loss_trouble(ctx, int(s[np.argmax(above)])) if above.any() else None
    if ratio.size and above.mean() >= t.persistence and note is not None:
        notes.append(note)
        k = int(np.argmax(above))
        peak = float(ratio.max())
        first.append(int(s[k]))
        worst = max(worst, peak / t.exploding_grad_to_weight)
        evidence.update(grad_to_weight_ratio=peak, grad_to_weight_step=int(s[k]),
                        grad_to_weight_persistent_fraction=float(above.mean()))
        reasons.append(f"the raw gradient (as backward() made it, before any clipping) is "
                       f"{fmt(peak)}x the norm of the weights it is for "
                       f"(from step {int(s[k])}, on {fmt(100 * float(above.mean()))}% of the "
                       f"measured steps)")

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
        return [_spike_finding(ctx, spike)] if spike else []
    if spike is not None:
        reasons.append(_spike_reason(ctx, spike))
        evidence.update(_spike_evidence(spike))
    if not layers:
        g = np.nanmax(np.where(np.isfinite(ctx.grad), ctx.grad, np.nan), axis=0) \
            if ctx.grad.size else np.array([])
        order = np.argsort(np.where(np.isfinite(g), g, -1))[::-1]
        layers.update(ctx.name(int(i)) for i in order[:3] if np.isfinite(g[i]))
    start = min(first)
    ev = ctx.h.events
    _, fl = ctx.finite_loss()
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
                          C.init_scale(ctx, group, ("large",)) if group else None,
                          None if overflow else C.learning_rate_too_high(
                              ctx, since=start, until=start + t.blowup_window_steps),
                          C.unscaled_inputs(ctx, since=start),
                          C.deep_plain_stack(ctx, group) if group else None) if c]
    remedies: list[Remedy] = []
    remedies += depth_remedies(ctx, group, causes) if group else []
    scale = standardize(ctx, causes)
    if scale:
        remedies.insert(0, scale)
    # From the update before the onset: the one that made the first exploding step.
    lr = None if overflow else lower_lr(ctx, since=start - 1, until=start + t.blowup_window_steps,
                                        blow_up=True, peak=True)
    if lr:
        remedies.append(lr)
    if overflow is None:
        threshold = clip_threshold(ctx)
        if threshold:
            remedies.append(remedy("clip_grad_norm", max_norm=threshold))
    tail = (f" The very first forward pass already blows up (loss {fmt(ctx.first_loss)} before "
            f"any update), so gradient clipping cannot help." if overflow else "")
    loss_note = notes[0] if notes else loss_trouble(ctx, start)
    if loss_note:
        evidence["loss_behaviour"] = loss_note
    summary = (f"{ctx.subject}Gradients explode: {'; '.join(reasons)}"
               f"{'; ' + loss_note if loss_note else ''}.{tail}")
    return [Finding(KIND, severity, start, int(ctx.steps[-1]) if len(ctx.steps) else start,
                    ctx.in_forward_order(layers), summary, evidence, causes, remedies)]
