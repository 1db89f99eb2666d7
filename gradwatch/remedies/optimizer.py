"""Remedies that change the optimizer: clipping, a lower rate, Adam, skipping bad or spiking
steps."""

from __future__ import annotations

import collections
import gc
import math
import statistics
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .base import NotApplicable, RemedyEntry, all_params, fmt, number

__all__ = ["ENTRIES"]


def _clip_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                    params: dict[str, Any], changes: list[str]) -> None:
    max_norm = number(params, "max_norm")
    if not max_norm > 0 or not math.isfinite(max_norm):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")

    def clip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p for p in all_params(opt) if p.grad is not None]
        if grads:
            torch.nn.utils.clip_grad_norm_(grads, max_norm)

    optimizer.register_step_pre_hook(clip)
    changes.append(f"clip the total gradient norm of {type(optimizer).__name__}'s "
                   f"{len(all_params(optimizer))} parameters at {fmt(max_norm)} before "
                   "each step")


def _schedulers(optimizer: torch.optim.Optimizer) -> list[Any]:
    """Learning-rate schedulers attached to ``optimizer`` (found through the objects that
    refer to it: the optimizer does not know its schedulers)."""

    found: list[Any] = []
    for ref in gc.get_referrers(optimizer):
        owners = [ref] if isinstance(ref, LRScheduler) else \
            [o for o in gc.get_referrers(ref) if isinstance(o, LRScheduler)] \
            if isinstance(ref, dict) else []
        for owner in owners:
            if getattr(owner, "optimizer", None) is optimizer and \
                    all(owner is not f for f in found):
                found.append(owner)
    return found


def _lr_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                  params: dict[str, Any], changes: list[str]) -> None:
    factor = number(params, "factor")
    if not 0 < factor < math.inf:
        raise ValueError(f"factor must be a positive number, got {factor}")
    old = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    new = [group["lr"] for group in optimizer.param_groups]
    if isinstance(optimizer.defaults.get("lr"), (int, float)):
        optimizer.defaults["lr"] *= factor
    said = (f"{fmt(old[0])} -> {fmt(new[0])}" if len(set(old)) == 1 else
            ", ".join(f"{fmt(a)} -> {fmt(b)}" for a, b in zip(old, new, strict=True)))
    changes.append(f"scaled the learning rate of {len(old)} param group(s) by {fmt(factor)}: "
                   f"{said}")
    for sched in _schedulers(optimizer):
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [b * factor for b in sched.base_lrs]
            changes.append(f"scaled the base rates of the {type(sched).__name__} schedule "
                           f"by {fmt(factor)}")


def _hold_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                    params: dict[str, Any], changes: list[str]) -> None:
    floor = number(params, "floor")
    if not 0 < floor < math.inf:
        raise ValueError(f"floor must be a positive number, got {floor}")
    # Each group keeps its proportion to the first group's starting rate (a backbone at
    # 1/10 of the head stays at 1/10 of the floor).
    starts = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    floors = [floor * start / starts[0] if starts[0] else floor for start in starts]

    def hold(opt: torch.optim.Optimizer, *_: Any) -> None:
        for group, low in zip(opt.param_groups, floors, strict=False):
            if isinstance(group["lr"], (int, float)) and group["lr"] < low:
                group["lr"] = low

    # Each scheduler's step holds the floor right after it moves the rate, so that the rate
    # the next step uses (and reads, and get_last_lr() says) is the held one; a step
    # pre-hook holds rates set by hand. The schedule's own recursion restarts from the
    # held rate after each step.
    schedulers = _schedulers(optimizer)
    for sched in schedulers:
        sched.step = _held_step(sched, optimizer, hold)
    optimizer.register_step_pre_hook(hold)
    kinds = sorted({type(s).__name__ for s in schedulers})
    changes.append(f"held the learning rate of {len(floors)} param group(s) at no less than "
                   f"{fmt(floors[0])}"
                   + (f" after each step of its schedule ({', '.join(kinds)}) and before "
                      f"each optimizer step" if kinds else " before each optimizer step"))


def _held_step(sched: Any, optimizer: torch.optim.Optimizer,
               hold: Any) -> Any:
    """``sched.step`` followed by ``hold`` (and the held rates as its last rates)."""
    original = sched.step

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        hold(optimizer)
        if hasattr(sched, "_last_lr"):
            sched._last_lr = [group["lr"] for group in optimizer.param_groups]
        return out

    return step


def _adam_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                    params: dict[str, Any], changes: list[str]) -> None:
    adaptive = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                torch.optim.RAdam, torch.optim.Adagrad, torch.optim.Adadelta,
                torch.optim.RMSprop)
    if isinstance(optimizer, adaptive):
        raise NotApplicable(f"the optimizer is already adaptive ({type(optimizer).__name__})")
    if type(optimizer) is not torch.optim.SGD:
        raise NotApplicable(f"only an SGD optimizer is turned into Adam in place, not "
                            f"{type(optimizer).__name__}; create torch.optim.Adam instead")
    lr = number(params, "lr", 1e-3)
    old = optimizer.param_groups[0]["lr"]
    # Building one Adam installs the step wrapper that runs step hooks on the class.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    defaults = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                    maximize=False, foreach=None, capturable=False, differentiable=False,
                    fused=None, decoupled_weight_decay=False)
    for group in optimizer.param_groups:
        for key in ("momentum", "dampening", "nesterov"):
            group.pop(key, None)
        decay = group.get("weight_decay", 0.0)
        group.update({k: v for k, v in defaults.items() if k != "weight_decay"})
        group["weight_decay"] = decay
        if "initial_lr" in group:
            group["initial_lr"] = lr
    optimizer.defaults = dict(defaults)
    optimizer.state.clear()  # SGD's momentum buffers mean nothing to Adam
    optimizer.__class__ = torch.optim.Adam
    changes.append(f"turned the SGD optimizer (lr {fmt(old)}) into torch.optim.Adam with lr "
                   f"{fmt(lr)} in place: same object and param groups, momentum discarded")


def _guard_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                     params: dict[str, Any], changes: list[str]) -> None:
    def guard(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for p in all_params(opt) if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if not bool(finite):
            for p in all_params(opt):
                p.grad = None  # every optimizer skips a parameter without a gradient

    optimizer.register_step_pre_hook(guard)
    changes.append(f"skip {type(optimizer).__name__}.step() when any gradient is not finite "
                   "(the step's gradients are dropped: no update, no momentum or Adam state "
                   "change)")


def _skip_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                    params: dict[str, Any], changes: list[str]) -> None:
    factor, window = number(params, "spike_factor"), int(number(params, "window"))
    if not 1 < factor < math.inf or window < 1:
        raise ValueError(f"spike_factor must be > 1 and window >= 1, got {factor}, {window}")
    recent: collections.deque[float] = collections.deque(maxlen=window)
    raw: dict[int, torch.Tensor] = {}  # the norm of each gradient as backward() left it

    def record(p: torch.Tensor) -> None:
        raw[id(p)] = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)

    def skip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Judged on the raw norms: the script may clip between backward() and step().
        norms = [raw[id(p)] for p in all_params(opt) if p.grad is not None and id(p) in raw]
        raw.clear()
        if not norms:
            return
        norm = float(torch.linalg.vector_norm(torch.stack(norms)))
        if len(recent) == window and not norm <= factor * statistics.median(recent):
            for p in all_params(opt):
                p.grad = None  # every optimizer skips a parameter without a gradient
            return
        recent.append(norm)

    for p in all_params(optimizer):
        p.register_post_accumulate_grad_hook(record)
    optimizer.register_step_pre_hook(skip)
    changes.append(f"skip {type(optimizer).__name__}.step() when the gradient norm is above "
                   f"{fmt(factor)}x its median over the {window} steps before")


def _fell(params: dict[str, Any]) -> str:
    """" (1/N of it)" for a rate that fell from ``floor`` to ``last``, where both are
    numbers."""
    try:
        ratio = float(params["floor"]) / float(params["last"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return ""
    return f" (1/{ratio:,.0f} of it)" if math.isfinite(ratio) and ratio > 1 else ""


ENTRIES = [
    RemedyEntry(
        "clip_grad_norm",
        lambda p: (f"clip the total gradient norm at {p['max_norm']}, the median norm of this "
                   f"run's healthy early steps, between backward() and step()"),
        lambda p: (f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={p['max_norm']})"
                   "  # after loss.backward(), before optimizer.step()"),
        to_optimizer=_clip_optimizer,
        needs_optimizer=True),
    RemedyEntry(
        "lower_learning_rate",
        lambda p: (f"lower the learning rate from {p['old_lr']} to {p['lr']}"
                   + (f" ({p['factor']}x; --verify tries lower rates in steps, 10x, 100x and "
                      f"the optimizer's default, from the mildest, when the rate the "
                      f"measured updates call for does not repair the run)" if p.get("ladder")
                      else f" ({p['factor']}x: the updates measured while the gradients blew "
                      f"up, {p['measured']} of the weights, are sized by the gradients, so "
                      f"the rate is cut by a fixed step, not to match them)" if p.get("capped")
                      else f": that brings the measured update size ({p['measured']} of the "
                      f"weights) near {p['target']} per step")),
        lambda p: ("for group in optimizer.param_groups:\n"
                   f"    group[\"lr\"] *= {p['factor']}  # {p['old_lr']} -> {p['lr']}"),
        to_optimizer=_lr_optimizer,
        needs_optimizer=True,
        applies=("factor",)),
    RemedyEntry(
        "hold_learning_rate",
        lambda p: (f"keep the learning rate at {p['floor']}, the rate the run learned with "
                   f"before its schedule took it down to {p['last']}{_fell(p)} from step "
                   f"{p['since']} on; if a scheduler meant per epoch is stepped every batch, "
                   f"call scheduler.step() once per epoch instead"),
        lambda p: ("# step the scheduler once per epoch, after the batch loop, or hold a "
                   "floor before each step:\n"
                   "for group in optimizer.param_groups:\n"
                   f"    group[\"lr\"] = max(group[\"lr\"], {p['floor']})"),
        to_optimizer=_hold_optimizer,
        needs_optimizer=True),
    RemedyEntry(
        "adaptive_optimizer",
        lambda p: ("use Adam, whose per-parameter step size does not shrink with the "
                   "gradient's scale, so starved layers still move"),
        lambda p: "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)",
        to_optimizer=_adam_optimizer,
        needs_optimizer=True,
        after_first_step=True),
    RemedyEntry(
        "guard_nonfinite_loss",
        lambda p: ("skip the update when the loss is not finite, so that one bad batch "
                   "cannot turn every weight into NaN"),
        lambda p: ("if torch.isfinite(loss):\n"
                   "    optimizer.step()\n"
                   "optimizer.zero_grad()"),
        to_optimizer=_guard_optimizer,
        needs_optimizer=True),
    RemedyEntry(
        "skip_spiking_steps",
        lambda p: (f"skip the update of a step whose gradient norm is above {p['spike_factor']}x "
                   f"its median over the {p['window']} steps before (OLMo-core's skip-step "
                   f"rule): one odd batch then changes nothing, and the rate can stay"),
        lambda p: ("import collections, statistics\n"
                   f"recent = collections.deque(maxlen={p['window']})  # before the loop\n"
                   "# each step, after loss.backward():\n"
                   "norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), "
                   "float(\"inf\")))\n"
                   f"if len(recent) == recent.maxlen and norm > {p['spike_factor']} * "
                   "statistics.median(recent):\n"
                   "    optimizer.zero_grad()  # a spike: skip this update\n"
                   "else:\n"
                   "    recent.append(norm)\n"
                   "    optimizer.step()\n"
                   "    optimizer.zero_grad()"),
        to_optimizer=_skip_optimizer,
        needs_optimizer=True,
        hides={"exploding_gradient": "it skips the update of a spiking step, not the spike: "
                                     "the raw gradient norm still jumps; the loss says "
                                     "whether the run stays on course"}),
]
