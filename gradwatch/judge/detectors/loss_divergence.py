"""loss_divergence: the loss grows an order of magnitude above its best and stays there."""

from __future__ import annotations

import numpy as np

from ...findings import Finding
from .. import causes as C
from ..advice import clip_threshold, lower_lr, remedy, standardize
from ..context import Context, fmt

KIND = "loss_divergence"
CAUSES: tuple[str, ...] = ()
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""


def detect(ctx: Context) -> list[Finding]:
    t = ctx.t
    steps, loss = ctx.finite_loss()
    if loss.size < max(3, t.divergence_persistence):
        return []
    best = np.minimum.accumulate(loss)
    # Above its best by the factor, and above where it started: noisy mini-batch losses
    # near zero swing by large factors without undoing any of the run's progress.
    diverged = (loss >= t.divergence_factor * np.maximum(best, 1e-30)) & (loss >= loss[0])
    run, start = 0, None
    for k, d in enumerate(diverged):
        run = run + 1 if d else 0
        if run >= t.divergence_persistence:
            start = k - run + 1
            break
    bad = ctx.first_nonfinite_loss
    ends_nonfinite = bad is not None and bad > int(steps[0])
    if start is None:
        # Too few finite steps to persist, but the loss ran off to inf/NaN after growing.
        if not (ends_nonfinite and diverged[-1]):
            return []
        start = int(np.argmax(diverged))
    # Date the divergence from the start of the rise: the first step after the loss was
    # last near (within onset_factor of) the best it had reached.
    near = np.nonzero(loss[: start + 1] <= t.onset_factor * best[start])[0]
    onset = int(near[-1]) + 1 if near.size else start
    onset = min(onset, start)
    peak = int(start + np.argmax(loss[start:]))
    factor = float(loss[peak] / max(best[start], 1e-30))
    evidence = {"loss_best": float(best[start]),
                "loss_best_step": int(steps[int(np.argmin(loss[: start + 1]))]),
                "loss_peak": float(loss[peak]), "loss_peak_step": int(steps[peak]),
                "factor": factor, "loss_last": float(loss[-1]),
                "rise_step": int(steps[onset]), "diverged_step": int(steps[start]),
                "ends_nonfinite": bool(ends_nonfinite)}
    if ctx.learning_rates:
        evidence["learning_rates"] = sorted(set(ctx.learning_rates))
    since = int(steps[onset])
    until = since + t.blowup_window_steps
    causes = [c for c in (C.learning_rate_too_high(ctx, since=since, until=until),
                          C.unscaled_inputs(ctx, since=since)) if c]
    remedies = []
    scale = standardize(ctx, causes)
    if scale:
        remedies.append(scale)
    # From the update before the rise: the one that made the first risen loss.
    lr = lower_lr(ctx, since=since - 1, until=until, blow_up=True, peak=True)
    if lr:
        remedies.append(lr)
    if (threshold := clip_threshold(ctx)):
        remedies.append(remedy("clip_grad_norm", max_norm=threshold))
    severity = "error" if ends_nonfinite or factor >= t.divergence_error_factor else "warning"
    summary = (f"{ctx.subject}The loss diverges: from its best {fmt(float(best[start]))} (step "
               f"{evidence['loss_best_step']}) it rose from step {since} on and grew "
               f"{fmt(factor)}x to {fmt(float(loss[peak]))} (step {int(steps[peak])})"
               + (" and then became non-finite." if ends_nonfinite else "."))
    return [Finding(KIND, severity, since, int(steps[-1]), [], summary, evidence,
                    causes, remedies)]
