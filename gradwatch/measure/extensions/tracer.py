"""The tracer of ``nanorigin.py``'s replay: where each NaN and Inf of one forward is born.

Under :class:`TraceMode` (a ``TorchFunctionMode``) every torch call's floating-point output
is checked (one host read per op: the replay runs once per run). An op whose output holds NaN
(Inf) while no input held NaN (Inf) is a *birth*; every non-finite output remembers the
birth of its NaN and of its Inf (``carried``, by tensor id, the tensors kept alive for the
replay so that no id is reused), so that the model output's values are traced to their own
birth. An Inf the call was given as a number (``masked_fill(mask, -inf)``) is marked
``constant``: a mask written on purpose. A module whose output turned non-finite while no op
inside it was seen doing so is a birth at module level (:meth:`OriginTracer.module_done`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["OUTSIDE", "OriginTracer", "TraceMode", "flags", "op_name"]

OUTSIDE: dict[str, Any] = {"outside": True}
"""Where a non-finite value came from when no op or module of the forward made it: the
model's input, a buffer or a constant."""
_MAX_TRACKED = 100_000  # non-finite tensors remembered during one replay (ids stay unique)
_OP_NAMES = {"__truediv__": "div", "__rtruediv__": "div", "__mul__": "mul", "__rmul__": "mul",
             "__add__": "add", "__radd__": "add", "__sub__": "sub", "__rsub__": "sub",
             "__pow__": "pow", "__rpow__": "pow", "__matmul__": "matmul",
             "__rmatmul__": "matmul", "__neg__": "neg", "__getitem__": "getitem",
             "__setitem__": "setitem", "__itruediv__": "div_", "__imul__": "mul_",
             "__iadd__": "add_", "__isub__": "sub_"}


def op_name(func: Any) -> str:
    """A torch function's short name: ``log``, ``div`` (for ``/``), ``softmax``."""
    name = getattr(func, "__name__", None) or type(func).__name__
    return _OP_NAMES.get(name, name)


def _inplace(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether the call writes into its first argument (or ``out``)."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in (
        "__setitem__", "__itruediv__", "__imul__", "__iadd__", "__isub__") or \
        "out" in kwargs or kwargs.get("inplace") is True


def _tensors(obj: Any, out: list[torch.Tensor], depth: int = 0) -> list[torch.Tensor]:
    """Floating-point tensors of a call's arguments or output (nested up to three levels)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            out.append(obj)
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for o in obj:
            _tensors(o, out, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out, depth + 1)
    return out


def flags(t: torch.Tensor) -> tuple[bool, bool]:
    """(holds NaN, holds Inf): one host read."""
    if t.numel() == 0 or (not t.is_floating_point() and not t.is_complex()):
        return False, False
    both = torch.stack([torch.isnan(t).any(), torch.isinf(t).any()]).tolist()
    return bool(both[0]), bool(both[1])


def _finite_range(tensors: list[torch.Tensor]) -> tuple[float | None, float | None]:
    """Smallest and largest finite value of the first real tensor (the op's operand)."""
    for t in tensors:
        if t.is_complex() or t.numel() == 0:
            continue
        finite = t.detach()[torch.isfinite(t.detach())]
        if finite.numel():
            lo_hi = torch.stack([finite.min(), finite.max()]).double().tolist()
            return float(lo_hi[0]), float(lo_hi[1])
        return None, None
    return None, None


class OriginTracer:
    """Follows one forward: where each NaN and Inf is born, and which values carry them."""

    def __init__(self, names: dict[int, str], root_name: str) -> None:
        self.names, self.root_name = names, root_name
        self.stack: list[nn.Module] = []
        self.counts: dict[tuple[int, str], int] = {}
        self.births: list[dict[str, Any]] = []  # every birth, in execution order
        # id -> (NaN birth, Inf birth) of every non-finite tensor seen; the tensors are
        # kept alive for the replay so that no id is reused
        self.carried: dict[int, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {}
        self._alive: list[torch.Tensor] = []
        self.ops = 0
        self.paused = False
        self.error: str | None = None

    # ------------------------------------------------------------------ naming
    def _module(self) -> nn.Module | None:
        return self.stack[-1] if self.stack else None

    def _path(self, module: nn.Module | None) -> str:
        if module is None:
            return self.root_name
        path = self.names.get(id(module))
        return path if path else self.root_name

    def count(self, op: str) -> int:
        key = (id(self._module()), op)
        k = self.counts[key] = self.counts.get(key, 0) + 1
        return k

    # ------------------------------------------------------------------ one op
    def pre(self, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> list[tuple[torch.Tensor, bool, bool]]:
        """Inputs and their NaN/Inf flags before an in-place call overwrites them."""
        return [(t, *flags(t)) for t in _tensors((args, kwargs), [])]

    def after(self, func: Any, k: int, args: tuple[Any, ...], kwargs: dict[str, Any],
              out: Any, pre: list[tuple[torch.Tensor, bool, bool]] | None) -> None:
        """The call returned ``out``: note where its non-finite values were born."""
        outs = _tensors(out, [])
        if not outs and pre is not None and args and isinstance(args[0], torch.Tensor):
            outs = _tensors(args[0], [])  # x[mask] = -inf returns None: x is the output
        if not outs:
            return
        finite = torch.stack([torch.isfinite(o).all() for o in outs if o.numel()]).all() \
            if any(o.numel() for o in outs) else torch.tensor(True)
        if bool(finite):  # the common case: one host read per op
            return
        inputs = pre if pre is not None else \
            [(t, *flags(t)) for t in _tensors((args, kwargs), [])]
        self._note(func, k, [t for t, _, _ in inputs], inputs, outs, None, args, kwargs)

    def module_done(self, module: nn.Module, args: tuple[Any, ...], output: Any,
                    births_before: int) -> None:
        """A module returned: a birth at module level if no op inside it was seen making
        its non-finite output (a C++ extension, an op outside torch)."""
        if len(self.births) > births_before:
            return
        outs = [o for o in _tensors(output, []) if id(o) not in self.carried]
        if not outs:
            return
        seen = [flags(o) for o in outs]
        if not any(n or i for n, i in seen):
            return
        inputs = [(t, *flags(t)) for t in _tensors(args, [])]
        params = [p for p in module.parameters(recurse=True)]
        inputs += [(p, *flags(p)) for p in params]
        self._note(None, 1, [t for t, _, _ in inputs], inputs, outs, module)

    def _note(self, func: Any, k: int, tensors: list[torch.Tensor],
              inputs: list[tuple[torch.Tensor, bool, bool]], outs: list[torch.Tensor],
              module: nn.Module | None, args: tuple[Any, ...] = (),
              kwargs: dict[str, Any] | None = None) -> None:
        kwargs = kwargs or {}
        in_nan = [t for t, n, _ in inputs if n]
        in_inf = [t for t, _, i in inputs if i]
        here = module if module is not None else self._module()
        op = op_name(func) if func is not None else None
        # an Inf the call was given as a number (masked_fill(mask, -inf), full(..., -inf)):
        # a mask, written on purpose, not an Inf the arithmetic made
        constant = any(isinstance(a, float) and math.isinf(a) for a in (*args, *kwargs.values()))
        for o in outs:
            has_nan, has_inf = flags(o)
            if not (has_nan or has_inf):
                continue
            nan_birth = inf_birth = None
            if has_inf:
                inf_birth = self._carried(in_inf, 1) if in_inf else \
                    self._birth("inf", op, k, here, inputs, tensors, module is not None,
                                constant)
            if has_nan:
                nan_birth = self._carried(in_nan, 0) if in_nan else \
                    self._birth("nan", op, k, here, inputs, tensors, module is not None)
            if len(self._alive) < _MAX_TRACKED:
                self._alive.append(o)
                self.carried[id(o)] = (nan_birth, inf_birth)

    def _carried(self, tensors: list[torch.Tensor], which: int) -> dict[str, Any]:
        """Where the NaN (0) or Inf (1) of the first input that carries one was born;
        :data:`OUTSIDE` when it came from no op seen (an input, a buffer, a constant)."""
        for t in tensors:
            found = self.carried.get(id(t))
            if found is not None and found[which] is not None:
                return found[which]
        return OUTSIDE

    def _birth(self, kind: str, op: str | None, k: int, module: nn.Module | None,
               inputs: list[tuple[torch.Tensor, bool, bool]], tensors: list[torch.Tensor],
               module_level: bool, constant: bool = False) -> dict[str, Any]:
        path = self._path(module)
        site = path if op is None else f"{path}.{op}@{k}"
        inf_inputs = [t for t, _, i in inputs if i]
        lo, hi = _finite_range(tensors)
        birth: dict[str, Any] = {
            "site": site, "module": path,
            "module_type": type(module).__name__ if module is not None else None,
            "op": op, "kind": kind, "module_level": module_level, "op_index": self.ops,
            "inputs": "finite" if not inf_inputs else "inf",
            "input_min": lo, "input_max": hi, "module_ref": module, "constant": constant,
        }
        if inf_inputs:
            origin = self._carried(inf_inputs, 1)
            birth["inf_birth"] = None if origin is OUTSIDE else origin
        self.births.append(birth)
        return birth

    def output_origin(self, output: Any) -> dict[str, Any] | None:
        """The birth of the non-finite values the model's output holds, NaN first;
        :data:`OUTSIDE` if they came from outside, None if the output is finite."""
        outs = _tensors(output, [])
        seen = [flags(o) for o in outs]
        for which, want in ((0, "nan"), (1, "inf")):
            for o, f in zip(outs, seen, strict=True):
                if f[which]:
                    found = self.carried.get(id(o))
                    if found is not None and found[which] is not None:
                        return found[which]
                    # not traced through (an op outside the mode): the first such birth
                    first = next((b for b in self.births if b["kind"] == want), None)
                    return first if first is not None else OUTSIDE
        return None


class TraceMode(TorchFunctionMode):
    """Passes every torch call through and hands its result to the tracer."""

    def __init__(self, tracer: OriginTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        tr = self.tracer
        if tr.paused:
            return func(*args, **kwargs)
        try:
            tr.ops += 1
            k = tr.count(op_name(func))
            pre = tr.pre(args, kwargs) if _inplace(func, kwargs) else None
        except Exception as exc:  # tracing must never break the replayed forward
            tr.paused, tr.error = True, f"{type(exc).__name__}: {exc}"[:300]
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        try:
            tr.after(func, k, args, kwargs, out, pre)
        except Exception as exc:
            tr.paused, tr.error = True, f"{type(exc).__name__}: {exc}"[:300]
        return out
