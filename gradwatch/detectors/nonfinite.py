"""nonfinite: the first step and place where a loss, gradient, weight or activation became
NaN/Inf, and whether the forward pass had already overflowed."""

from __future__ import annotations

from .. import causes as C
from ..findings import Finding
from ..remedies import remedy
from .advice import clip_threshold, depth_remedies, lower_lr
from .context import Context, fmt

KIND = "nonfinite"


def detect(ctx: Context) -> list[Finding]:
    ev = ctx.h.events
    firsts = {k: v for k, v in (("loss", ev.first_nonfinite_loss),
                                ("gradient", ev.first_nonfinite_grad),
                                ("weight", ev.first_nonfinite_weight),
                                ("activation", ev.first_nonfinite_act)) if v is not None}
    if not firsts:
        return []
    step = min(firsts.values())
    at_step = [k for k, v in firsts.items() if v == step]
    param_layer = {}
    for info in ctx.h.layers:
        for p in info.param_names:
            param_layer[p] = info
    if "activation" in at_step:
        origin = (f"the forward pass produced it: {ev.nonfinite_act_layers[0]} output "
                  f"non-finite values first")
        layers = list(ev.nonfinite_act_layers)
    elif "loss" in at_step:
        origin = "the forward pass produced it: the loss itself was non-finite"
        layers = _layers(ctx, ev.nonfinite_grad_params if ev.first_nonfinite_grad == step
                         else [])
    elif "gradient" in at_step:
        origin = (f"backward() produced it while the loss was finite "
                  f"({ev.nonfinite_grad_kind or 'nan'} in {ev.nonfinite_grad_params[0]})")
        layers = _layers(ctx, ev.nonfinite_grad_params)
    else:
        origin = (f"an update made the weights non-finite "
                  f"({ev.nonfinite_weight_params[0]})")
        layers = _layers(ctx, ev.nonfinite_weight_params)
    overflow = C.forward_overflow(ctx)
    before = ""
    if ev.first_loss is not None and ev.first_loss_step is not None and \
            ev.first_loss_step < step:
        before = f" The last finite loss was {fmt(ev.last_loss)} (step {ev.last_loss_step})."
    evidence = {
        "first_step": step,
        "first_nonfinite": at_step,
        "first_nonfinite_loss_step": ev.first_nonfinite_loss,
        "nonfinite_loss_steps": ev.nonfinite_loss_steps,
        "first_nonfinite_grad_step": ev.first_nonfinite_grad,
        "nonfinite_grad_params": ev.nonfinite_grad_params[:20],
        "nonfinite_grad_kind": ev.nonfinite_grad_kind,
        "first_nonfinite_weight_step": ev.first_nonfinite_weight,
        "nonfinite_weight_params": ev.nonfinite_weight_params[:20],
        "first_nonfinite_activation_step": ev.first_nonfinite_act,
        "forward_overflowed": overflow is not None or "loss" in at_step or
        "activation" in at_step,
        "last_finite_loss": ev.last_loss,
        "first_loss": ev.first_loss,
    }
    group = max(ctx.groups, key=lambda g: len(g.layers)) if ctx.groups else None
    causes = [c for c in (overflow, C.init_scale(ctx, group) if group else None,
                          None if overflow else C.learning_rate_too_high(ctx),
                          C.unscaled_inputs(ctx)) if c]
    remedies = depth_remedies(ctx, group, causes) if group else []
    lr = None if overflow else lower_lr(ctx)
    if lr:
        remedies.append(lr)
    if overflow is None and (threshold := clip_threshold(ctx)):
        remedies.append(remedy("clip_grad_norm", max_norm=threshold))
    remedies += [remedy("guard_nonfinite_loss"), remedy("detect_anomaly")]
    summary = (f"Non-finite values (NaN/Inf) from step {step} on: {origin}.{before}")
    if overflow is not None:
        summary += " The forward pass had already overflowed, so clipping cannot help."
    last = max(ev.first_nonfinite_loss or step, step)
    if ev.nonfinite_loss_steps and ctx.steps.size:
        last = int(ctx.steps[-1])
    return [Finding(KIND, "error", step, last, layers, summary, evidence, causes, remedies)]


def _layers(ctx: Context, params: list[str]) -> list[str]:
    names: list[str] = []
    for i, info in enumerate(ctx.h.layers):
        if any(p in info.param_names for p in params):
            names.append(ctx.name(i))
    order = {ctx.name(i): k for k, i in enumerate(ctx.h.layer_order())}
    return sorted(names, key=lambda n: order.get(n, 0))
