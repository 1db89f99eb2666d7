"""loss_divergence: the loss grows an order of magnitude above its best and stays there.

An episode after which the loss is back for ``divergence_persistence`` steps in a row
within ``onset_factor`` of the best it had learned before (or below ``1 / onset_factor`` of
it, when that best was no better than the first loss) recovered: not a divergence (a
``loss_spike``, if brief)."""

from __future__ import annotations

import numpy as np

from ...findings import Finding
from .. import causes as C
from ..advice import clip_threshold, lower_lr, remedy, standardize
from ..context import Context, fmt

KIND = "loss_divergence"
CAUSES: tuple[str, ...] = ()
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""


def _back(loss: np.ndarray, level: float, persistence: int) -> int | None:
    """Index in ``loss`` of the last of the first ``persistence`` losses in a row at or
    below ``level``; None if the loss never gets back there."""
    run = 0
    for k, v in enumerate(loss):
        run = run + 1 if v <= level else 0
        if run >= persistence:
            return k
    return None


def detect(ctx: Context) -> list[Finding]:
    t = ctx.t
    steps, loss = ctx.finite_loss()
    if loss.size < max(3, t.divergence_persistence):
        return []
    best = np.minimum.accumulate(loss)
    # Above its best by the factor, and above where it started: noisy mini-batch losses
    # near zero swing by large factors without undoing any of the run's progress.
    diverged = (loss >= t.divergence_factor * np.maximum(best, 1e-30)) & (loss >= loss[0])
    bad = ctx.first_nonfinite_loss
    ends_nonfinite = bad is not None and bad > int(steps[0])
    # The loss must stay diverged: an episode after which the loss is back within
    # onset_factor of the best before it, for divergence_persistence steps in a row,
    # recovered (a loss_spike, if brief); a later episode may still stay.
    run, start, k = 0, None, 0
    while k < len(diverged):
        run = run + 1 if diverged[k] else 0
        if run >= t.divergence_persistence:
            first = k - run + 1
            # Back near a level the run had learned, or below it: recovered. Back near the
            # first loss after learning nothing (a net collapsed to a constant guess) is not.
            learned = best[first] * t.onset_factor <= loss[0]
            level = best[first] * (t.onset_factor if learned else 1 / t.onset_factor)
            back = _back(loss[k + 1:], level, t.divergence_persistence)
            if back is None:
                start = first
                break
            k, run = k + 1 + back, 0  # the steps after the recovery
        k += 1
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
