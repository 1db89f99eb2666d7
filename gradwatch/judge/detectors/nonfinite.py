"""nonfinite: the first step and place where a loss, gradient, weight or activation became
NaN/Inf, where it came from (forward, backward or an update), where in the forward it was
born (the op or module a replay of the first non-finite loss's forward found,
``events.nonfinite_origin``), and whether clipping could have helped."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...findings import Cause, Finding, Remedy
from .. import causes as C
from ..advice import clip_threshold, depth_remedies, lower_lr, remedy
from ..context import Context, fmt

KIND = "nonfinite"
WHOLE_RUN = True  # one NaN is a fact of the process
CAUSES = ("nonfinite_input", "invalid_forward_op", "invalid_backward_op")
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""


def detect(ctx: Context) -> list[Finding]:
    ev = ctx.h.events
    firsts = {k: v for k, v in (("loss", ev.first_nonfinite_loss),
                                ("gradient", ev.first_nonfinite_grad),
                                ("weight", ev.first_nonfinite_weight),
                                ("activation", ev.first_nonfinite_act)) if v is not None}
    ranks = _first_rank(ctx, min(firsts.values()) if firsts else None)
    if not firsts and ranks is None:
        return []
    step = min(firsts.values()) if firsts else ranks["step"]  # type: ignore[index]
    at_step = [k for k, v in firsts.items() if v == step]
    if ranks is not None and ranks["rank"] != ranks["own"] and len(ranks["ranks"]) == 1:
        # Another rank's data made it: under DDP this rank's gradients turn non-finite at
        # the same step, through the gradient all-reduce, while its own loss is finite.
        step, origin = ranks["step"], "forward" if ranks["what"] == "loss" else "backward"
        got = "got them from the gradient all-reduce" if ev.first_nonfinite_grad == step \
            else "stayed finite at that step"
        how = (f"rank {ranks['rank']}'s {ranks['what']} was non-finite first, at step {step}; "
               f"this process (rank {ranks['own']}) {got}")
        layers = _layers(ctx, ev.nonfinite_grad_params if ev.first_nonfinite_grad == step
                         else [])
    elif "activation" in at_step:
        act_layers = _ordered(ctx, list(ev.nonfinite_act_layers))
        origin = "forward"
        how = (f"the forward pass produced them: {_label(act_layers[0])} output non-finite "
               f"values first")
        layers = act_layers
    elif "loss" in at_step:
        origin = "forward"
        how = "the forward pass produced them: the loss itself was non-finite"
        layers = _layers(ctx, ev.nonfinite_grad_params if ev.first_nonfinite_grad == step
                         else [])
    elif "gradient" in at_step:
        origin = "backward"
        how = (f"backward() produced them while the loss was finite "
               f"({ev.nonfinite_grad_kind or 'nan'} in {ev.nonfinite_grad_params[0]})")
        layers = _layers(ctx, ev.nonfinite_grad_params)
    else:
        origin = "update"
        how = f"an update made the weights non-finite ({ev.nonfinite_weight_params[0]})"
        layers = _layers(ctx, ev.nonfinite_weight_params)
    born = ev.nonfinite_origin or {}
    if ranks is not None and ranks["rank"] != ranks["own"] and len(ranks["ranks"]) == 1:
        born = {}  # this rank's replay saw its own (finite) batch, not the one that did it
    if origin == "forward" and born.get("step") == step:
        how, layers = _born(ctx, born, how, layers)
    elif born.get("status") == "producer":
        how += (f"; the first non-finite loss (step {born.get('step')}) was born in "
                f"{_producer(born)}")
    if ranks is not None and len(ranks["ranks"]) > 1:
        how = f"on ranks {', '.join(map(str, ranks['ranks']))} at the same step, {how}"
    elif ranks is not None and ranks["rank"] == ranks["own"]:
        how = f"on rank {ranks['rank']}, {how}"

    # A NaN gradient from a finite loss: that loss is the last finite one.
    finite_before = np.isfinite(ctx.loss) & ((ctx.steps < step) if origin != "backward"
                                             else (ctx.steps <= step))
    last_loss = float(ctx.loss[finite_before][-1]) if finite_before.any() else None
    last_step = int(ctx.steps[finite_before][-1]) if finite_before.any() else None
    overflow = C.forward_overflow(ctx)
    sudden = None if overflow else sudden_nonfinite(ctx, step, origin)
    group = max(ctx.groups, key=lambda g: len(g.layers)) if ctx.groups else None
    causes: list[Cause] = [c for c in (overflow, sudden) if c]
    remedies: list[Remedy] = []
    if overflow is not None:
        tail = (f" The very first forward pass had already blown up (loss {fmt(ctx.first_loss)}"
                f" before any update), so gradient clipping cannot help.")
        causes += [c for c in (C.init_scale(ctx, group, ("large",)) if group else None,
                               C.unscaled_inputs(ctx)) if c]
        remedies += depth_remedies(ctx, group, causes) if group else []
    elif sudden is not None:
        tail = (" Nothing grew towards it: this step's data or an undefined operation "
                "produced them, so clipping cannot help." if origin == "forward" else
                " Nothing grew towards it: an operation with an infinite derivative produced "
                "them, so clipping cannot help.")
        if sudden.id == "nonfinite_input":
            remedies.append(remedy("assert_finite_inputs"))
        else:  # an operation undefined at this input: its safe form, where it has one
            remedies.append(remedy("safe_ops"))
    else:
        # Values grew until they overflowed: the updates that made them grow are the cause.
        growth = grad_growth(ctx, step)
        grew = growth is not None and growth[0] > ctx.t.onset_factor
        tail = (f" From step {growth[1]} on, the gradient norm grew {fmt(growth[0])}x over its "
                f"early level: clipping it or a lower learning rate stops such growth."
                if growth is not None and grew else "")
        since = growth[1] if growth is not None and grew else None
        causes += [c for c in (C.init_scale(ctx, group, ("large",)) if group else None,
                               C.learning_rate_too_high(ctx, since=since, until=step - 1),
                               C.unscaled_inputs(ctx, since=since)) if c]
        remedies += depth_remedies(ctx, group, causes) if group else []
        if (lr := lower_lr(ctx, since=since, until=step - 1, blow_up=True)) is not None:
            remedies.append(lr)
        if (threshold := clip_threshold(ctx)) is not None:
            remedies.append(remedy("clip_grad_norm", max_norm=threshold))
    remedies += [remedy("guard_nonfinite_loss"), remedy("detect_anomaly")]
    before = f" The last finite loss was {fmt(last_loss)} (step {last_step})." \
        if last_loss is not None else ""
    evidence = {
        "first_step": step,
        "first_nonfinite": at_step,
        "origin": origin,
        "forward_produced_it": origin == "forward",
        "forward_overflowed": overflow is not None,
        "first_nonfinite_loss_step": ev.first_nonfinite_loss,
        "nonfinite_loss_steps": ev.nonfinite_loss_steps,
        "first_nonfinite_grad_step": ev.first_nonfinite_grad,
        "nonfinite_grad_params": ev.nonfinite_grad_params[:20],
        "nonfinite_grad_kind": ev.nonfinite_grad_kind,
        "first_nonfinite_weight_step": ev.first_nonfinite_weight,
        "nonfinite_weight_params": ev.nonfinite_weight_params[:20],
        "first_nonfinite_activation_step": ev.first_nonfinite_act,
        "nonfinite_activation_layers": list(ev.nonfinite_act_layers)[:20],
        "last_finite_loss": last_loss,
        "last_finite_loss_step": last_step,
        "first_loss": ev.first_loss,
        **_born_evidence(born),
        **({"rank": ranks["rank"] if len(ranks["ranks"]) == 1 else None,
            "rank_step": ranks["step"], "this_rank": ranks["own"],
            "ranks_at_first_step": ranks["ranks"], "world_size": ranks["world_size"]}
           if ranks is not None else {}),
    }
    summary = f"Non-finite values (NaN/Inf) from step {step} on: {how}.{before}{tail}"
    return [Finding(KIND, "error", step, max(_last_bad_step(ctx), step), layers, summary,
                    evidence, causes, remedies)]


def _first_rank(ctx: Context, local: int | None) -> dict[str, Any] | None:
    """In a distributed run whose ranks combined their facts: the rank (and step) where
    values turned non-finite first, when that is not later than this rank's own first."""
    d = ctx.h.facts.get("distributed") or {}
    first = d.get("first_nonfinite")
    if not first or (local is not None and first["step"] > local):
        return None
    return {**first, "own": d.get("rank"), "world_size": d.get("world_size")}


def _last_bad_step(ctx: Context) -> int:
    """Last step of the series with a non-finite loss or gradient (-1 if none is kept)."""
    bad = np.isinf(ctx.loss) | (np.nan_to_num(ctx.nonfinite) > 0).any(axis=1)
    return int(ctx.steps[bad][-1]) if bad.any() else -1


def _label(name: str) -> str:
    return f"layer {name}" if name.replace(".", "").isdigit() else name


def _ordered(ctx: Context, names: list[str]) -> list[str]:
    """Layer names sorted input side first."""
    order = {ctx.h.layers[i].name: k for k, i in enumerate(ctx.h.layer_order())}
    return sorted(names, key=lambda n: order.get(n, len(order)))


def _layers(ctx: Context, params: list[str]) -> list[str]:
    names: list[str] = []
    for i, info in enumerate(ctx.h.layers):
        if any(p in info.param_names for p in params):
            names.append(ctx.name(i))
    order = {ctx.name(i): k for k, i in enumerate(ctx.h.layer_order())}
    return sorted(names, key=lambda n: order.get(n, 0))


# ------------------------------------------------------------ where it was born
def _producer(born: dict[str, Any]) -> str:
    """``feat (log) output NaN from finite inputs (-300 to 3.36)``."""
    op = f" ({born['op']})" if born.get("op") else ""
    what = "NaN" if born.get("kind") == "nan" else "Inf"
    if born.get("inputs") == "finite":
        lo, hi = born.get("input_min"), born.get("input_max")
        src = "from finite inputs" + (f" (from {fmt(lo)} to {fmt(hi)})" if lo is not None
                                      else "")
    elif born.get("inf_from"):
        src = f"from finite inputs and a mask's Inf ({born['inf_from']})"
    else:
        src = "from inputs holding Inf from a buffer or constant"
    nan = f", which turned to NaN in {born['nan_module']} ({born.get('nan_op')})" \
        if born.get("nan_module") else ""
    return f"{born.get('module')}{op} output {what} {src}{nan}"


def _born(ctx: Context, born: dict[str, Any], how: str, layers: list[str]
          ) -> tuple[str, list[str]]:
    """The sentence and the layers, once a replay of the forward found where it was born."""
    status, step = born.get("status"), born.get("step")
    if status == "producer":
        index = born.get("layer_index")
        if isinstance(index, int) and 0 <= index < len(ctx.h.layers):
            lead = ctx.name(index)  # a parameterised layer: it leads the finding's layers
            layers = [lead, *(name for name in layers if name != lead)]
        return f"the forward pass produced them at step {step}: {_producer(born)}", layers
    if status == "input":
        what = "NaN" if born.get("kind") == "nan" else "Inf"
        return (f"the model's input at step {step} already held {what}: no layer of the "
                f"model produced it"), layers
    if status == "weights":
        return (f"the forward pass of step {step} read non-finite weights "
                f"({', '.join(born.get('params', [])[:3])})"), layers
    if status == "buffers":
        return (f"the forward pass of step {step} carried non-finite values from a buffer "
                f"or constant of the model, not produced by any of its ops"), layers
    if status == "output_finite":
        return (f"{how}; a replay of step {step}'s forward gave a finite model output, so "
                f"the loss computation outside the model (or an op that does not repeat "
                f"itself) produced them"), layers
    return how, layers


def _born_evidence(born: dict[str, Any]) -> dict[str, Any]:
    """The replay's findings as evidence keys (none when no replay was recorded)."""
    if not born:
        return {}
    out: dict[str, Any] = {"producer_status": born.get("status"),
                           "producer_step": born.get("step")}
    if born.get("status") == "producer":
        out.update({
            "producer": born.get("module"), "producer_op": born.get("op"),
            "producer_site": born.get("site"), "producer_type": born.get("module_type"),
            "producer_kind": born.get("kind"), "producer_inputs": born.get("inputs"),
            "producer_input_range": [born.get("input_min"), born.get("input_max")],
            "producer_nan_at": born.get("nan_site"), "producer_inf_from": born.get("inf_from"),
        })
    elif born.get("status") == "input":
        out.update({"producer": None, "producer_kind": born.get("kind"),
                    "producer_input_index": born.get("input_index")})
    else:
        out["producer"] = None
    if born.get("reason"):
        out["producer_reason"] = born["reason"]
    if born.get("note"):
        out["producer_note"] = born["note"]
    return out


# ------------------------------------------------------------ this kind's causes
def grad_growth(ctx: Context, until: int) -> tuple[float, int] | None:
    """Largest finite total gradient norm before step ``until`` / its early baseline, and the
    step its rise began (the step after it was last within ``onset_factor`` of baseline).

    None with too few measured steps to have a baseline (``baseline_steps``).
    """
    before = ctx.steps < until
    total = ctx.total_grad[before]
    ok = np.isfinite(total) & (total > 0)
    total, steps = total[ok], ctx.steps[before][ok]
    if total.size <= ctx.t.baseline_steps:
        return None
    growth = total / ctx.early_level(total)
    peak = int(np.argmax(growth))
    near = np.nonzero(growth[: peak + 1] <= ctx.t.onset_factor)[0]
    onset = int(near[-1]) + 1 if near.size else 0
    return float(growth[peak]), int(steps[min(onset, peak)])


def sudden_nonfinite(ctx: Context, step: int, origin: str) -> Cause | None:
    """A NaN/Inf that appeared in one step from a normal-sized run: data or an invalid op.

    Holds when, before ``step``, the loss stayed below the overflow level, the gradient
    norm was measured on more than ``baseline_steps`` steps (or ``step`` is the first, where
    nothing can have grown yet) and never grew
    ``exploding_growth``-fold over its baseline, and the weights were still finite at
    ``step``: nothing grew towards the overflow, so the value came from this step's batch
    or from an operation that is undefined at this input.
    """
    if origin not in ("forward", "backward"):
        return None
    ev = ctx.h.events
    if ev.first_nonfinite_weight is not None and ev.first_nonfinite_weight <= step:
        return None
    before = ctx.steps < step
    loss = ctx.loss[before]
    loss = loss[np.isfinite(loss)]
    if loss.size and float(np.max(np.abs(loss))) >= ctx.t.forward_overflow:
        return None
    growth = grad_growth(ctx, step)
    # At the first step nothing can have grown: no history is needed to call it sudden.
    if (growth is None and step > 0) or (growth is not None and
                                         growth[0] > ctx.t.exploding_growth):
        return None  # too short a history to call it normal, or the gradient grew
    last = f"the loss was {fmt(float(loss[-1]))} the step before and " if loss.size else ""
    if origin == "backward":
        return Cause("invalid_backward_op",
                     f"the loss was finite at step {step} but backward() produced NaN/Inf "
                     f"while no gradient had grown before: an operation whose derivative is "
                     f"infinite at this input (sqrt or norm at 0, log of 0, pow with a "
                     f"fractional exponent at 0, division by a zero std); clipping cannot "
                     f"repair a NaN gradient")
    rows = ctx.detail_steps == step
    x = ctx.io("input_rms")[rows]
    born = ev.nonfinite_origin or {}
    if born.get("step") == step and born.get("status") == "input":
        return Cause("nonfinite_input",
                     f"the model's input at step {step} already contains "
                     f"{'NaN' if born.get('kind') == 'nan' else 'Inf'} (a replay of that "
                     f"step's forward found input {born.get('input_index')} non-finite); "
                     f"{last}every weight was finite: the batch is bad, not the model")
    if x.size and not np.isfinite(x).all():
        return Cause("nonfinite_input",
                     f"the model's input at step {step} already contains NaN/Inf (input RMS "
                     f"{fmt(float(x[0]))}); {last}every weight was finite: the batch is bad, "
                     f"not the model")
    if born.get("step") == step and born.get("status") == "producer":
        return Cause("invalid_forward_op",
                     f"{last}every weight was finite and no gradient had grown, yet in the "
                     f"forward pass of step {step} {_producer(born)}: an operation undefined "
                     f"at this input (log or sqrt of a negative number, division by zero, "
                     f"a softmax over only -inf); clipping cannot help, skipping the step "
                     f"can")
    return Cause("invalid_forward_op",
                 f"{last}every weight was finite and no gradient had grown, yet the forward "
                 f"pass of step {step} produced NaN/Inf: a NaN/Inf in this batch's data or an "
                 f"operation undefined at this input (log or sqrt of a negative number, "
                 f"division by zero); clipping cannot help, skipping the step can")
