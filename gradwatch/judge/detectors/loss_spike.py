"""loss_spike: the loss jumps far above its recent window, LLM-style, and comes back.

Each step's loss is compared with the ``spike_window`` finite losses before it. A spike is a
loss at least ``spike_sigma`` standard deviations above their mean (the rule OLMo-core's
skip-step optimizer applies) and at least ``spike_min_rise`` of that mean above it (a nearly
constant loss has a tiny standard deviation, so a bump of a fraction of a percent is many
sigmas), or a loss ``spike_factor`` times the largest one seen so far (Megatron-LM's
check). The spike ends when the loss is back within two of the window's standard
deviations of its mean; a loss that never comes back before the run ends is a divergence,
reported as ``loss_divergence``, not here. A spike that threw the model off lasts
``spike_min_steps`` or more: a warning. A batch whose loss is far off while the loss is back
within a few steps is an outlier in the data (a bad or heavy-tailed batch, frequent near
convergence) that did not derail training: said as info, with its step.

Every spike of the run goes into one finding (their list in ``evidence["spikes"]``), since
they share their causes and remedies: the gradient norm at the spike against its usual size
says whether an oversized update came with it. A spike in the step where the schedule
raised the learning rate (a warm restart) is the schedule's doing: then the finding is info.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...findings import Cause, Finding, Remedy
from ..advice import clip_threshold, lower_lr, remedy
from ..context import Context, fmt

KIND = "loss_spike"
CAUSES = ("gradient_spike", "learning_rate_restart")
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""
MAX_LISTED = 20  # spikes listed in the evidence, the largest first
RECOVERED_SIGMA = 2.0  # back within this many window standard deviations: the spike is over
#: The schedule raised the rate in one step by this factor within this many steps up to the
#: spike: a warm restart.
RESTART_JUMP, RESTART_STEPS = 1.5, 25


def detect(ctx: Context) -> list[Finding]:
    ctx = ctx.dense()  # every step around each outlier, also in a downsampled long run
    t = ctx.t
    steps, loss = ctx.finite_loss()
    w = t.spike_window
    if loss.size <= w:
        return []
    spikes = _spikes(loss, w, t)
    if not spikes:
        return []
    total = ctx.total_grad
    lr = ctx.lr
    at_step = {int(s): k for k, s in enumerate(ctx.steps)}
    rows = []
    for k, mean, std, back in spikes:
        row: dict[str, Any] = {
            "step": int(steps[k]), "loss": float(loss[k]), "window_mean": mean,
            "window_std": std, "sigma": (float(loss[k]) - mean) / std if std > 0 else None,
            "factor": float(loss[k]) / mean if mean > 0 else None,
            "recovered": True, "recovered_step": int(steps[back]),
            "steps_to_recover": int(steps[back] - steps[k])}
        j = at_step.get(int(steps[k]))
        if j is not None:
            window = total[max(0, j - w):j]
            window = window[np.isfinite(window)]
            row["grad_norm"] = float(total[j]) if np.isfinite(total[j]) else None
            row["grad_norm_window_median"] = float(np.median(window)) if window.size else None
            recent = lr[max(0, j - RESTART_STEPS):j + 1]
            with np.errstate(divide="ignore", invalid="ignore"):
                jumps = recent[1:] / recent[:-1]
            row["lr_raised"] = bool(np.any(np.isfinite(jumps) & (jumps >= RESTART_JUMP)))
        rows.append(row)
    return [_finding(ctx, rows)]


def _spikes(loss: np.ndarray, w: int, t: Any) -> list[tuple[int, float, float, int]]:
    """(index, window mean, window std, index of recovery) of every spike that ended."""
    csum = np.concatenate([[0.0], np.cumsum(loss, dtype=np.float64)])
    csq = np.concatenate([[0.0], np.cumsum(np.square(loss, dtype=np.float64))])
    idx = np.arange(w, len(loss))
    mean = (csum[idx] - csum[idx - w]) / w
    std = np.sqrt(np.maximum((csq[idx] - csq[idx - w]) / w - mean ** 2, 0.0))
    top = np.maximum.accumulate(loss)[idx - 1]
    x = loss[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_hit = (x - mean >= t.spike_sigma * std) & (x - mean >= t.spike_min_rise *
                                                          np.abs(mean))
    # A jump: from a loss still within the window's band one step before (a loss that
    # climbs over several steps and comes back is an oscillation, not a spike).
    sudden = loss[idx - 1] <= mean + RECOVERED_SIGMA * std
    hit = (sigma_hit & sudden) | ((top > 0) & (x >= t.spike_factor * top))
    out = []
    k = 0
    candidates = idx[hit]
    while k < len(candidates):
        i = int(candidates[k])
        m, s = float(mean[i - w]), float(std[i - w])
        after = np.nonzero(loss[i + 1:] <= m + RECOVERED_SIGMA * s)[0]
        if not after.size:
            break  # up to the end of the run: a divergence, not a spike
        back = i + 1 + int(after[0])
        out.append((i, m, s, back))
        # The next spike is looked for once this one is over.
        k = int(np.searchsorted(candidates, back + 1))
    return out


def _finding(ctx: Context, rows: list[dict[str, Any]]) -> Finding:
    t = ctx.t
    lasting = [r for r in rows if r["steps_to_recover"] >= t.spike_min_steps
               and not r.get("lr_raised")]
    outliers = sum(r["steps_to_recover"] < t.spike_min_steps and not r.get("lr_raised")
                   for r in rows)
    if lasting:  # the spikes that derailed training; one-batch outliers only counted
        rows = lasting
    biggest = max(rows, key=lambda r: r["sigma"] if r["sigma"] is not None else np.inf)
    by_update = [r for r in rows if r.get("grad_norm") and r.get("grad_norm_window_median")
                 and r["grad_norm"] >= t.onset_factor * r["grad_norm_window_median"]]
    restarts = [r for r in rows if r.get("lr_raised")]
    causes: list[Cause] = []
    if by_update:
        r = max(by_update, key=lambda r: r["grad_norm"] / r["grad_norm_window_median"])
        causes.append(Cause(
            "gradient_spike",
            f"the gradient norm jumped with the loss: {fmt(r['grad_norm'])} at step "
            f"{r['step']}, {fmt(r['grad_norm'] / r['grad_norm_window_median'])}x its median "
            f"over the {t.spike_window} steps before ({len(by_update)} of {len(rows)} "
            f"spike(s)): an oversized update from a batch unlike the others, or a rate near "
            f"the edge of stability"))
    if restarts:
        causes.append(Cause(
            "learning_rate_restart",
            f"the learning rate was raised at the spike (step {restarts[0]['step']}): a "
            f"warm restart of the schedule, which spikes the loss by design"))
    remedies: list[Remedy] = []
    if lasting:
        if (threshold := clip_threshold(ctx)):
            remedies.append(remedy("clip_grad_norm", max_norm=threshold))
        if (lr := lower_lr(ctx, blow_up=True, anyway=True)):
            remedies.append(lr)
        if by_update:  # an oversized update came with the spike: skip such steps
            remedies.append(remedy("skip_spiking_steps", spike_factor=f"{t.spike_factor:g}",
                                   window=t.spike_window))
    severity = "warning" if lasting else "info"
    n = len(rows)
    grad = (f", gradient norm {fmt(biggest['grad_norm'])} (median before "
            f"{fmt(biggest['grad_norm_window_median'])})"
            if biggest.get("grad_norm") and biggest.get("grad_norm_window_median") else "")
    size = f"{fmt(biggest['sigma'])} sigma" if biggest["sigma"] is not None else \
        f"{fmt(biggest['factor'])}x"
    summary = (f"{ctx.subject}The loss spiked {n} time(s); the largest at step "
               f"{biggest['step']}: {fmt(biggest['loss'])}, {size} above the mean "
               f"{fmt(biggest['window_mean'])} of the {t.spike_window} steps before{grad}; it "
               f"was back within {RECOVERED_SIGMA:g} sigma after "
               f"{biggest['steps_to_recover']} step(s)."
               + ("" if lasting or restarts else f" Each time the loss was back within "
                  f"{t.spike_min_steps - 1} step(s): brief outliers in the minibatch losses "
                  f"(an odd batch), not a derailed run."))
    listed = sorted(rows, key=lambda r: -(r["sigma"] or 0.0))[:MAX_LISTED]
    evidence = {"spikes": sorted(listed, key=lambda r: r["step"]), "count": n,
                "one_batch_outliers": outliers,
                "window": t.spike_window, "sigma_threshold": t.spike_sigma,
                "batch_index": None,  # not exposed by a training loop gradwatch watches
                "outliers_not_kept": ctx.h.excerpts.dropped,
                "largest_step": biggest["step"]}
    return Finding(KIND, severity, rows[0]["step"], max(r["recovered_step"] for r in rows),
                   [], summary, evidence, causes, remedies)
