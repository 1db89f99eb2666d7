"""The eval-mode re-run: the first no-grad forward of a model in training mode, run again in
eval mode on copies of its inputs and buffers, the RNG replayed and restored, the user's
model left bit-identical; then the two outputs and the BatchNorm statistics compared."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["MAX_BUFFER_BYTES", "Opaque", "Pending", "compare_outputs", "copy_inputs",
           "float_tensors", "get_rng", "lazy", "norm_buffers", "prepare", "relative_change",
           "rerun_in_eval", "rng_devices", "set_rng"]

_MAX_INPUT_ITEMS = 4096  # larger input containers are not copied for a re-run
MAX_BUFFER_BYTES = 1 << 28  # buffers beyond BatchNorm's are cloned for the re-run up to this


class Opaque(Exception):
    """An input the forward may change in place (a cache object): no re-run on it."""


def copy_inputs(obj: Any, budget: list[int]) -> Any:
    """A copy of plain-data inputs (tensors cloned); raises :class:`Opaque` on anything else."""
    budget[0] -= 1
    if budget[0] < 0:
        raise Opaque("very large input container")
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype,
                                       torch.device, slice, range, type(Ellipsis))):
        return obj
    if isinstance(obj, torch.Size):
        return obj
    if type(obj) is tuple or type(obj) is list:
        return type(obj)(copy_inputs(o, budget) for o in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(copy_inputs(o, budget) for o in obj))
    if type(obj) is dict or type(obj) is OrderedDict:
        return type(obj)((k, copy_inputs(v, budget)) for k, v in obj.items())
    raise Opaque(type(obj).__name__)


def float_tensors(obj: Any, out: list[torch.Tensor], depth: int = 0) -> list[torch.Tensor]:
    """Floating-point tensors of a forward's output, in a fixed order."""
    if depth > 8:
        return out
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            float_tensors(o, out, depth + 1)
    elif isinstance(obj, dict):
        for o in obj.values():
            float_tensors(o, out, depth + 1)
    return out


def rng_devices(tensors: list[torch.Tensor]) -> list[torch.device]:
    return sorted({t.device for t in tensors if t.device.type not in ("cpu", "meta")},
                  key=str)


def get_rng(devices: list[torch.device]) -> list[tuple[torch.device | None, torch.Tensor]]:
    """The CPU generator's state and that of each accelerator the model's tensors use."""
    states: list[tuple[torch.device | None, torch.Tensor]] = [(None, torch.get_rng_state())]
    for d in devices:
        mod = torch.get_device_module(d.type)
        states.append((d, mod.get_rng_state(d.index if d.index is not None else 0)))
    return states


def set_rng(states: list[tuple[torch.device | None, torch.Tensor]]) -> None:
    for d, state in states:
        if d is None:
            torch.set_rng_state(state)
        else:
            torch.get_device_module(d.type).set_rng_state(
                state, d.index if d.index is not None else 0)


class Pending:
    """What the first measured forward needs from before it ran."""

    def __init__(self, args: Any, kwargs: Any, opaque: str | None,
                 rng: list[tuple[torch.device | None, torch.Tensor]] | None) -> None:
        self.args, self.kwargs, self.opaque, self.rng = args, kwargs, opaque, rng


def lazy(norms: list[nn.Module]) -> bool:
    """Lazy norm layers not yet initialised (their first forward sizes the buffers)."""
    return any(is_lazy(b) for mod in norms for b in mod._buffers.values() if b is not None)


def norm_buffers(norms: list[nn.Module], clone: bool) -> list[torch.Tensor]:
    """running_mean, running_var, num_batches_tracked of every norm layer, in order."""
    out: list[torch.Tensor] = []
    for mod in norms:
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            buf = mod._buffers.get(key)
            if buf is not None:
                out.append(buf.detach().clone() if clone else buf)
    return out


def relative_change(before: list[torch.Tensor], norms: list[nn.Module]) -> float:
    """||running stats now - before|| / ||before|| over every norm layer's mean and var."""
    now = norm_buffers(norms, clone=False)
    diff = []
    ref = []
    for b, n in zip(before, now, strict=False):
        if not b.is_floating_point() or b.shape != n.shape:
            continue
        diff.append(torch.linalg.vector_norm((n.detach() - b).double()).to("cpu"))
        ref.append(torch.linalg.vector_norm(b.double()).to("cpu"))
    if not diff:
        return math.nan
    d, r = float(torch.stack(diff).norm()), float(torch.stack(ref).norm())
    return d / r if r > 0 else (0.0 if d == 0 else math.inf)


def compare_outputs(train_out: Any, eval_out: Any) -> dict[str, Any]:
    """Relative L2 and max abs difference of the outputs; argmax agreement for logits."""
    a, b = float_tensors(train_out, []), float_tensors(eval_out, [])
    if not a:
        return {"rerun": "incomparable",
                "reason": "the output holds no floating-point tensor (in a tuple, list or dict)"}
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return {"rerun": "incomparable",
                "reason": "the output in eval mode has another structure or shape"}
    device = a[0].device
    diff, ref, peak = [], [], []
    for x, y in zip(a, b, strict=True):
        # float32 (float64 stays float64): a relative difference needs no more, and a
        # float64 copy of a language model's logits would be a large allocation.
        wide = torch.promote_types(x.dtype, torch.float32)
        d = (x.detach().to(wide) - y.detach().to(wide)).abs()
        diff.append(torch.linalg.vector_norm(d).double().to(device))
        ref.append(torch.linalg.vector_norm(y.detach().to(wide)).double().to(device))
        peak.append(d.max().double().to(device) if d.numel() else
                    torch.zeros((), dtype=torch.float64, device=device))
    parts = [torch.stack(diff).square().sum(), torch.stack(ref).square().sum(),
             torch.stack(peak).max()]
    first_a, first_b = a[0], b[0]
    logits = first_a.dim() == 2 and first_a.shape[1] > 1 and not first_a.is_complex()
    if logits:
        parts.append((first_a.argmax(1) == first_b.argmax(1)).double().mean().to(device))
    # One host read, once per model and run.
    values = torch.stack(parts).cpu().tolist()
    d2, r2, peak_v = values[0], values[1], values[2]
    out: dict[str, Any] = {
        "output_rel_diff": math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf),
        "output_max_abs_diff": peak_v,
        "output_norm_eval": math.sqrt(r2),
    }
    if logits:
        out["argmax_agreement"] = values[3]
    return out


def prepare(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            discover: bool) -> Pending:
    """Before the first measured forward: copies of its inputs and the RNG state."""
    try:
        budget = [_MAX_INPUT_ITEMS]
        args_copy = copy_inputs(tuple(args), budget)
        kwargs_copy = copy_inputs(dict(kwargs), budget)
    except Opaque as exc:
        return Pending(None, None, str(exc), None)
    if discover and not args_copy:
        return Pending(None, None, "keyword-only call (gradwatch run cannot see "
                                    "keyword arguments)", None)
    tensors = float_tensors(args_copy, [])
    tensors += [p for p in module.parameters(recurse=True)][:1]
    devices = rng_devices(tensors)
    try:
        rng = get_rng(devices)
    except Exception:  # an accelerator without a readable generator state
        return Pending(None, None, f"generator state of {devices} that cannot be saved",
                        None)
    return Pending(args_copy, kwargs_copy, None, rng)


def rerun_in_eval(module: nn.Module, norms: list[nn.Module],
                  forward_snapshot: list[torch.Tensor] | None, pending: Pending,
                  monitor: Any) -> Any:
    """The same forward in eval mode, on copies; the user's model is left untouched."""
    m = monitor
    modules = list(module.modules())
    flags = [mod.training for mod in modules]
    pre_bn: dict[int, torch.Tensor] = {}
    if forward_snapshot is not None:
        for tensor, original in zip(forward_snapshot,
                                    norm_buffers(norms, clone=False), strict=True):
            pre_bn[id(original)] = tensor
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    budget = MAX_BUFFER_BYTES
    rng_now = get_rng([d for d, _ in (pending.rng or []) if d is not None])
    try:
        for mod in modules:
            for key, buf in mod._buffers.items():
                if buf is None:
                    continue
                replacement = pre_bn.get(id(buf))
                if replacement is None:
                    size = buf.numel() * buf.element_size()
                    if size > budget:
                        continue
                    budget -= size
                    replacement = buf.detach().clone()
                swapped.append((mod, key, buf))
                mod._buffers[key] = replacement
        for mod in modules:
            mod.training = False
        if pending.rng is not None:
            set_rng(pending.rng)  # replay: random ops see the same numbers
        m.suspended += 1
        try:
            with torch.no_grad():
                return module(*pending.args, **pending.kwargs)
        finally:
            m.suspended -= 1
    finally:
        set_rng(rng_now)
        for mod, flag in zip(modules, flags, strict=True):
            mod.training = flag
        for mod, key, buf in swapped:
            mod._buffers[key] = buf
