"""loss_plateau: the loss stops improving while the model shows it is stuck, not converged.

A flat loss alone is what a converged run looks like too; it becomes a warning only with a
measured sign of a stuck model: an output that is the same for every input, weights that do
not move, a learning rate a schedule has taken to almost nothing while the gradient is still
sizeable, or gradients that do not reach the input side. Flat without such a sign is info.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...findings import Cause, Finding
from .. import causes as C
from ..advice import depth_remedies, lower_lr, remedy
from ..context import Context, fmt
from . import through_time, vanishing

KIND = "loss_plateau"
CAUSES = ("constant_output", "weights_frozen", "learning_rate_collapsed", "gradient_vanishes")
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""


#: A head/tail difference within the noise counts as flat only up to this many times
#: ``plateau_rel_change``: beyond it the loss has moved, however noisy.
NOISE_CAP = 5


def within_noise(window: np.ndarray, head: float, t: Any) -> bool:
    """Is the loss over the window flat but for noise? Minibatch losses of a stuck model
    scatter far more than 1% around its level, so a change between the window's quarters
    can be noise: flat when the window's fitted trend is within ``plateau_noise_z``
    standard errors of zero (a run still learning, however noisily, has a trend the fit
    sees) and moves the loss by less than NOISE_CAP times ``plateau_rel_change``."""
    n = window.size
    if n < 8 or t.plateau_noise_z <= 0:
        return False
    x = np.arange(n, dtype=float) - (n - 1) / 2
    slope = float(np.dot(x, window - window.mean()) / np.dot(x, x))
    residual = window - window.mean() - slope * x
    sigma = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    error = sigma / np.sqrt(float(np.dot(x, x)))
    moved = abs(slope) * (n - 1)
    return abs(slope) <= t.plateau_noise_z * error and \
        moved < NOISE_CAP * t.plateau_rel_change * max(abs(head), 1e-12)


def flat_since(loss: np.ndarray, final: float, rel_change: float) -> int:
    """Index of the first step from which the loss stays at ``final``.

    Walks back over blocks of steps while each block's median is within the flat tolerance
    of ``final``; the tolerance is the larger of ``rel_change`` of the loss and the noise a
    block median of this run's per-batch losses carries, so that a noisy flat loss is not
    read as still moving at every step.
    """
    size = max(1, min(len(loss) // 20, 50))
    tail = loss[-max(size, len(loss) // 4):]
    mad = float(np.median(np.abs(tail - np.median(tail))))
    tol = max(abs(final) * rel_change, 3 * 1.4826 * mad / np.sqrt(size), 1e-12)
    start = len(loss) - size
    while start - size >= 0 and abs(float(np.median(loss[start - size:start])) - final) <= tol:
        start -= size
    while start > 0 and abs(float(loss[start - 1]) - final) <= tol:
        start -= 1  # into the block before, step by step
    return max(start, 0)


def lr_collapse(ctx: Context, window_start: int) -> tuple[Cause, dict] | None:
    """The learning rate over the window is a tiny fraction of the run's peak rate (a
    schedule stepped far more often than meant, or decayed to nothing)."""
    lr = ctx.lr
    ok = np.isfinite(lr)
    if not ok.any():
        return None
    steps, lr = ctx.steps[ok], lr[ok]
    peak_at = int(np.argmax(lr))
    peak = float(lr[peak_at])
    in_window = lr[steps >= window_start]
    if peak <= 0 or not in_window.size:
        return None
    top = float(np.max(in_window))
    if top > ctx.t.lr_collapse * peak:
        return None
    below = np.flatnonzero((lr <= ctx.t.lr_collapse * peak) & (steps > steps[peak_at]))
    fell_at = int(steps[below[0]]) if below.size else int(steps[-1])
    changes = int(np.count_nonzero(np.diff(lr) != 0))
    fell = f" ({peak / top:,.0f}x)" if top > 0 else " (to 0)"
    cause = Cause("learning_rate_collapsed",
                  f"the learning rate fell from {fmt(peak)} (step {int(steps[peak_at])}) to "
                  f"{fmt(top)} or less{fell} over the last part of the run, with the "
                  f"gradient still sizeable (not converged), below "
                  f"{fmt(ctx.t.lr_collapse)} of its peak from step {fell_at} on, changing "
                  f"{changes} times: a schedule meant per epoch stepped every batch, or one "
                  f"that decays too fast, leaves the weights almost still")
    return cause, {"lr_peak": peak, "lr_peak_step": int(steps[peak_at]),
                   "lr_max_in_window": top, "lr_collapsed_from_step": fell_at,
                   "lr_changes": changes}


def detect(ctx: Context) -> list[Finding]:
    t = ctx.t
    steps, loss = ctx.finite_loss()
    if loss.size < t.min_steps:
        return []
    start = min(int(len(loss) * (1 - t.plateau_window)), len(loss) - 2)  # 2 points at least
    window = loss[start:]
    q = max(1, len(window) // 4)
    head, tail = float(np.median(window[:q])), float(np.median(window[-q:]))
    change = (head - tail) / max(abs(head), 1e-12)
    # Flat only within the noise: said when the model shows it is stuck, not as a note.
    noisy = abs(change) >= t.plateau_rel_change
    if noisy and not within_noise(window, head, t):
        return []
    final = float(np.median(loss[-q:]))
    at_floor = float(np.max(np.abs(window))) <= t.converged_loss
    first_step = int(steps[flat_since(loss, final, t.plateau_rel_change)])

    if at_floor:
        # Zero loss (the model reproduces its targets exactly): nothing left to learn,
        # whatever the output spread or the (zero) updates say.
        return [Finding(KIND, "info", first_step, int(steps[-1]), [],
                        f"{ctx.subject}The loss has been at {fmt(final)} since step "
                        f"{first_step}: the model fits its targets exactly (converged).",
                        {"loss_first": float(loss[0]), "loss_last": float(loss[-1]),
                         "loss_max_in_window": float(np.max(np.abs(window))),
                         "threshold": t.converged_loss, "flat_since_step": first_step})]
    signs: list[Cause] = []
    evidence: dict = {"loss_first": float(loss[0]), "loss_best": ctx.best_loss,
                      "loss_last": float(loss[-1]), "relative_change": change,
                      "window_steps": [int(steps[start]), int(steps[-1])],
                      "flat_since_step": first_step}
    in_window = ctx.detail_steps >= steps[start]
    spread = ctx.io("output_spread")[in_window]
    spread = spread[np.isfinite(spread)]
    if spread.size:
        evidence["output_spread"] = float(np.median(spread))
        if np.median(spread) < t.collapsed_output_spread:
            signs.append(Cause("constant_output",
                               f"the model gives the same output for every input (between-"
                               f"sample spread {fmt(float(np.median(spread)))} of its scale): "
                               f"{fmt(final)} is the loss of a constant prediction"))
    ratio = ctx.update_ratio[in_window]
    frozen = False
    # Stuck rather than converged only while the gradient is still sizeable: a converged
    # run stops moving too, but because its gradient has fallen to a tiny fraction of its
    # peak. A zero gradient is nothing to move by: that is no frozen model either.
    total = ctx.total_grad
    ok = np.isfinite(total)
    window_grad = total[ok & (ctx.steps >= steps[start])]
    median = float(np.median(window_grad)) if window_grad.size else 0.0
    sizeable = median > 0 and median >= t.active_grad_fraction * float(np.max(total[ok]))
    collapsed = lr_collapse(ctx, int(steps[start])) if sizeable else None
    if collapsed:
        evidence.update(collapsed[1])
    if ratio.size and np.isfinite(ratio).any():
        peak = float(np.nanmax(ratio))
        evidence["update_ratio_max"] = peak
        if peak < t.frozen_update_ratio and sizeable:
            frozen = True
            signs.append(Cause("weights_frozen",
                               f"no layer's weights move although the gradient norm is still "
                               f"{fmt(float(np.median(window_grad)))}: the largest update is "
                               f"{fmt(peak)} of the weight norm"))
    if collapsed:
        signs.insert(0, collapsed[0])  # what stopped the weights: the first thing to say
    starved_layers: list[str] = []
    group = max(ctx.groups, key=lambda g: len(g.layers)) if ctx.groups else None
    for g in ctx.groups:
        hit = vanishing.starved(ctx, g)
        if hit is not None:
            starved_layers.append(ctx.name(g.layers[0]))
            evidence["grad_norm_ratio_first_to_last"] = float(np.median(hit[1]))
            signs.append(Cause("gradient_vanishes",
                               f"{ctx.label(g.layers[0])} gets {fmt(float(np.median(hit[1])))} "
                               f"of the output layer's gradient (see vanishing_gradient)"))
    recurrent_remedies = []
    for found in through_time.detect(ctx, "vanishing_gradient"):
        if found.severity != "info":
            ratio = found.evidence["grad_norm_ratio_first_to_last_timestep"]
            starved_layers.append(found.layers[0])
            signs.append(Cause("gradient_vanishes",
                               f"through time: the first timestep's input of "
                               f"{found.layers[0]} gets {fmt(ratio)} of the last one's "
                               f"gradient (see vanishing_gradient)"))
            recurrent_remedies += found.remedies
    if not signs:
        if noisy:
            return []
        return [Finding(KIND, "info", first_step, int(steps[-1]), [],
                        f"{ctx.subject}The loss has been flat at about {fmt(final)} since "
                        f"step {first_step} "
                        f"(changed {fmt(100 * change)}% over the last "
                        f"{int(100 * t.plateau_window)}% of the run); no sign of a stuck "
                        f"model, so it has likely converged.", evidence)]
    # Causes that explain the signs found: a frozen model is stopped by what zeroes its
    # updates; a starved one by what shrinks its gradient with depth.
    causes = list(signs)
    rate = None
    if any(c.id == "constant_output" for c in signs) and not collapsed:
        # A model that collapsed to one output after oversized updates: the rate wrecked
        # it before the loss went flat (Adam at an SGD rate).
        rate = C.learning_rate_too_high(ctx, until=first_step)
        causes += [rate] if rate else []
    if frozen and not collapsed:
        overflow = C.forward_overflow(ctx)
        causes += [c for c in (C.clipping_to_zero(ctx), overflow,
                               C.init_scale(ctx, group, ("large",)) if group and overflow
                               else None) if c]
    if starved_layers and group:
        saturating = C.saturating_activation(ctx, group)
        causes += [c for c in (saturating,
                               C.init_scale(ctx, group, ("small", "large") if saturating
                                            else ("small",)),
                               C.signal_shrinks_forward(ctx, group),
                               C.deep_plain_stack(ctx, group)) if c]
    remedies = depth_remedies(ctx, group, causes) if group else []
    remedies = recurrent_remedies + [r for r in remedies
                                     if r.id not in {x.id for x in recurrent_remedies}]
    if collapsed:
        # The constant rate: the run learned at its peak rate before the schedule took it
        # away (a rate too high there would have shown as a divergence, not a plateau).
        remedies.insert(0, remedy("hold_learning_rate", floor=fmt(collapsed[1]["lr_peak"]),
                                  since=collapsed[1]["lr_collapsed_from_step"],
                                  last=fmt(collapsed[1]["lr_max_in_window"])))
    if rate is not None and (lr := lower_lr(ctx, until=first_step, blow_up=True)):
        remedies.insert(0, lr)
    sgd = any(o["type"] == "SGD" for o in ctx.facts.get("optimizers", []))
    if sgd and not frozen and not collapsed:
        remedies.append(remedy("adaptive_optimizer"))
    severity = "error" if frozen else "warning"
    summary = (f"{ctx.subject}The loss is stuck at {fmt(final)} from step {first_step} on (best "
               f"{fmt(ctx.best_loss)}, first {fmt(float(loss[0]))}; changed "
               f"{fmt(100 * abs(change))}% over the last {len(window)} steps) and the model "
               f"is not converged: {signs[0].text}.")
    return [Finding(KIND, severity, first_step, int(steps[-1]), starved_layers, summary,
                    evidence, causes, remedies)]
