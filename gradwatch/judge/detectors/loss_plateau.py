"""loss_plateau: the loss stops improving while the model shows it is stuck, not converged.

A flat loss alone is what a converged run looks like too; it becomes a warning only with a
measured sign of a stuck model: an output that is the same for every input, weights that do
not move, or gradients that do not reach the input side. Flat without such a sign is info.
"""

from __future__ import annotations

import numpy as np

from ...findings import Cause, Finding
from .. import causes as C
from ..advice import depth_remedies, remedy
from ..context import Context, fmt
from . import through_time, vanishing

KIND = "loss_plateau"
CAUSES = ("constant_output", "weights_frozen", "gradient_vanishes")
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""


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
    if abs(change) >= t.plateau_rel_change:
        return []
    final = float(np.median(loss[-q:]))
    at_floor = float(np.max(np.abs(window))) <= t.converged_loss
    since = len(loss) - 1
    tol = max(abs(final) * t.plateau_rel_change, 1e-12)
    while since > 0 and abs(loss[since - 1] - final) <= tol:
        since -= 1
    first_step = int(steps[since])

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
    if ratio.size and np.isfinite(ratio).any():
        peak = float(np.nanmax(ratio))
        evidence["update_ratio_max"] = peak
        # Frozen only while the gradient is still sizeable: a converged run stops moving
        # too, but because its gradient has fallen to a tiny fraction of its peak.
        total = ctx.total_grad
        ok = np.isfinite(total)
        window_grad = total[ok & (ctx.steps >= steps[start])]
        median = float(np.median(window_grad)) if window_grad.size else 0.0
        # A zero gradient is nothing to move by: that is no frozen model.
        sizeable = median > 0 and median >= t.active_grad_fraction * float(np.max(total[ok]))
        if peak < t.frozen_update_ratio and sizeable:
            frozen = True
            signs.append(Cause("weights_frozen",
                               f"no layer's weights move although the gradient norm is still "
                               f"{fmt(float(np.median(window_grad)))}: the largest update is "
                               f"{fmt(peak)} of the weight norm"))
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
        return [Finding(KIND, "info", first_step, int(steps[-1]), [],
                        f"{ctx.subject}The loss has been flat at about {fmt(final)} since "
                        f"step {first_step} "
                        f"(changed {fmt(100 * change)}% over the last "
                        f"{int(100 * t.plateau_window)}% of the run); no sign of a stuck "
                        f"model, so it has likely converged.", evidence)]
    # Causes that explain the signs found: a frozen model is stopped by what zeroes its
    # updates; a starved one by what shrinks its gradient with depth.
    causes = list(signs)
    if frozen:
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
    sgd = any(o["type"] == "SGD" for o in ctx.facts.get("optimizers", []))
    if sgd and not frozen:
        remedies.append(remedy("adaptive_optimizer"))
    severity = "error" if frozen else "warning"
    summary = (f"{ctx.subject}The loss is stuck at {fmt(final)} from step {first_step} on (best "
               f"{fmt(ctx.best_loss)}, first {fmt(float(loss[0]))}; changed "
               f"{fmt(100 * abs(change))}% over the last {len(window)} steps) and the model "
               f"is not converged: {signs[0].text}.")
    return [Finding(KIND, severity, first_step, int(steps[-1]), starved_layers, summary,
                    evidence, causes, remedies)]
