"""Where a NaN is born: the first op or module of the forward whose output turned NaN/Inf
while its inputs were finite, found by replaying the forward of the first non-finite loss.

A NaN that appears in the forward spreads into every layer after it, so the layers whose
output is non-finite say little about where it came from; ``torch.autograd.detect_anomaly``
covers only the backward. Checking every op of every forward would cost a reduction and a
host sync per op; this extension costs, per training forward, a reference to its inputs
(not a copy) and the generator state, and per backward one host read of a CPU loss (about
0.3 us). Nothing else runs until a loss is NaN/Inf.

On the first non-finite loss, before ``backward()`` runs and so before any optimizer has
used it, the latest forward with gradients of each watched model is replayed once, in
execution order of the models:

* on copies of its inputs and buffers (BatchNorm statistics, caches), with the generator
  state it started from (CPU and accelerators: Dropout draws the same mask), with gradients
  enabled as in the original forward (some kernels differ without them) but no backward,
  the monitor suspended (no hook measures it); afterwards every buffer, the
  RNG states (torch, Python, numpy) and the user's modules are as they were: the run's
  numbers do not change;
* under a ``TorchFunctionMode`` that sees every torch call (functional, tensor method,
  operator, ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``...) and
  forward hooks on every submodule, which say in whose forward each call runs. An op whose
  floating-point output holds NaN (Inf) while no input held NaN (Inf) is where a NaN (an
  Inf) is born; each non-finite output remembers where its NaN and its Inf were born, so
  that the model output's non-finite values are traced to their own birth, not to an
  intentional ``-inf`` mask elsewhere. A NaN made from an Inf born earlier from finite
  values (``exp`` overflow then ``inf - inf``, ``x / 0``) is traced to the Inf's birth, the
  op that turned it NaN being noted. A module whose output turned non-finite while no op
  inside it was seen doing so (a C++ extension) is the birth place at module level.

What is recorded (``history.events.nonfinite_origin``, a dict, judged by
``judge/detectors/nonfinite.py``): the step, the model, and ``status``: ``"producer"`` (the
birth place: module path, its type, the op, a site name ``Module.op@k`` as activation sites
are named, NaN or Inf, whether the op's inputs were finite or held Inf, born where, their
finite range), ``"input"`` (the model's input was already non-finite: the batch, not the
model), ``"weights"`` (a parameter was already non-finite), ``"output_finite"`` (the replay's
output was finite: the loss computation outside the model, or an op that does not repeat
itself, made the NaN), ``"skipped"`` or ``"failed"`` with the reason.

Not covered: a loss on an accelerator (reading it would cost a host sync per step: the
status ``"not_checked"`` says so when a NaN loss is found at a flush), a model run through
``torch.compile`` (never replayed: its forward is not seen), keyword arguments under
``gradwatch run`` (global hooks do not see them: the note says so), NaN born in
``backward()`` (``detect_anomaly`` covers that).
"""

from __future__ import annotations

import math
import random
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..extension import Extension
from .rerun import MAX_BUFFER_BYTES, Opaque, copy_inputs, float_tensors, get_rng, set_rng

__all__ = ["NanOrigin", "OriginTracer"]

OUTSIDE: dict[str, Any] = {"outside": True}
"""Where a non-finite value came from when no op or module of the forward made it: the
model's input, a buffer or a constant."""
_MAX_INPUT_ITEMS = 4096  # larger input containers are not copied for the replay
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


def _flags(t: torch.Tensor) -> tuple[bool, bool]:
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
        return [(t, *_flags(t)) for t in _tensors((args, kwargs), [])]

    def after(self, func: Any, k: int, args: tuple[Any, ...], kwargs: dict[str, Any],
              out: Any, pre: list[tuple[torch.Tensor, bool, bool]] | None) -> None:
        """The call returned ``out``: note where its non-finite values were born."""
        outs = _tensors(out, [])
        if not outs:
            return
        finite = torch.stack([torch.isfinite(o).all() for o in outs if o.numel()]).all() \
            if any(o.numel() for o in outs) else torch.tensor(True)
        if bool(finite):  # the common case: one host read per op
            return
        inputs = pre if pre is not None else \
            [(t, *_flags(t)) for t in _tensors((args, kwargs), [])]
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
        flags = [_flags(o) for o in outs]
        if not any(n or i for n, i in flags):
            return
        inputs = [(t, *_flags(t)) for t in _tensors(args, [])]
        params = [p for p in module.parameters(recurse=True)]
        inputs += [(p, *_flags(p)) for p in params]
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
            has_nan, has_inf = _flags(o)
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
        flags = [_flags(o) for o in outs]
        for which, want in ((0, "nan"), (1, "inf")):
            for o, f in zip(outs, flags, strict=True):
                if f[which]:
                    found = self.carried.get(id(o))
                    if found is not None and found[which] is not None:
                        return found[which]
                    # not traced through (an op outside the mode): the first such birth
                    first = next((b for b in self.births if b["kind"] == want), None)
                    return first if first is not None else OUTSIDE
        return None


class _Mode(TorchFunctionMode):
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


class _Kept:
    """The latest forward with gradients of one model: references, not copies."""

    __slots__ = ("args", "index", "kwargs", "order", "rng", "root", "seq", "versions")

    def __init__(self, root: nn.Module, index: int, args: tuple[Any, ...],
                 kwargs: dict[str, Any], rng: Any, seq: int, order: int) -> None:
        self.root = weakref.ref(root)
        self.index, self.args, self.kwargs, self.rng = index, args, kwargs, rng
        self.seq, self.order = seq, order
        # in-place changes to an input after the forward show in its version counter
        self.versions = [(t, t._version) for t in args if isinstance(t, torch.Tensor)]


class NanOrigin(Extension):
    """On the first non-finite loss, replays the forward that made it to find the op or
    module where the NaN/Inf was born (see the module docstring)."""

    def __init__(self) -> None:
        self._kept: dict[int, _Kept] = {}  # id(root) -> its latest forward with grad
        self._devices: dict[int, list[torch.device]] = {}  # id(root) -> accelerators
        self._seq = 0  # backward calls so far: forwards kept since the last one count
        self._order = 0
        self.done = False

    # ------------------------------------------------------------------ hot path
    def on_root_forward_pre(self, module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> None:
        if self.done or not torch.is_grad_enabled():
            return
        key = id(module)
        devices = self._devices.get(key)
        if devices is None:
            if getattr(module, "_compiled_call_impl", None) is not None:
                devices = self._devices[key] = [torch.device("meta")]  # never replayed
            else:
                first = next(module.parameters(), None)
                devices = self._devices[key] = [] if first is None or \
                    first.device.type == "cpu" else [first.device]
        if devices and devices[0].type == "meta":
            return
        index = self.monitor.watched.root_of_module(module)
        if index is None:
            return
        self._order += 1
        self._kept[key] = _Kept(module, index, args, kwargs, get_rng(devices), self._seq,
                                self._order)

    def on_backward_begin(self, loss: torch.Tensor) -> None:
        if self.done or not self._kept:
            self._seq += 1
            return
        kept = [k for k in self._kept.values() if k.seq == self._seq]
        self._seq += 1
        if not kept or loss.device.type != "cpu":
            return  # another model's loss; an accelerator's loss is not read (no sync)
        # One host read of a CPU scalar: no synchronisation with any device.
        value = loss.detach().item() if loss.numel() == 1 else \
            (math.nan if not bool(torch.isfinite(loss.detach()).all()) else 0.0)
        if math.isfinite(value):
            return
        self.done = True
        try:
            origin = self._trace(sorted(kept, key=lambda k: k.order), value)
        except Exception as exc:  # gradwatch's own failure: recorded, the run goes on
            origin = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}
        origin.setdefault("step", self.monitor.step)
        self.monitor.history.events.nonfinite_origin = origin
        self._kept = {}

    def on_flush(self, steps: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """A NaN loss that was not checked (it lives on an accelerator): say so."""
        ev = self.monitor.history.events
        if ev.nonfinite_origin is None and ev.first_nonfinite_loss is not None:
            self.done, self._kept = True, {}
            ev.nonfinite_origin = {
                "status": "not_checked", "step": ev.first_nonfinite_loss,
                "reason": "the loss lives on an accelerator, where reading it at every step "
                          "would cost a synchronisation; the forward was not replayed"}

    def on_root_gone(self, root: int) -> None:
        for key, k in list(self._kept.items()):
            if k.index == root:
                del self._kept[key]

    def finish(self) -> None:
        self._kept, self._devices = {}, {}

    # ------------------------------------------------------------------ the replay
    def _trace(self, kept: list[_Kept], loss: float) -> dict[str, Any]:
        """Replay each model's forward in turn; the first that shows something says it."""
        m = self.monitor
        loss_kind = "nan" if math.isnan(loss) else ("inf" if loss > 0 else "-inf")
        last: dict[str, Any] = {}
        for k in kept:
            root = k.root()
            if root is None:
                continue
            name = m.history.roots[k.index] if k.index < len(m.history.roots) else \
                type(root).__name__
            origin = {"step": m.step, "root": name, "loss": loss_kind}
            origin.update(self._replay_one(root, k, name))
            if origin["status"] != "output_finite":
                return origin
            last = origin
        return last or {"status": "skipped", "reason": "the model that made the loss is gone"}

    def _replay_one(self, root: nn.Module, k: _Kept, name: str) -> dict[str, Any]:
        m = self.monitor
        if any(type(mod).__name__ == "OptimizedModule" or
               getattr(mod, "_compiled_call_impl", None) is not None for mod in root.modules()):
            return {"status": "skipped", "reason": "the model holds torch.compile'd modules"}
        try:
            args = copy_inputs(tuple(k.args), [_MAX_INPUT_ITEMS])
            kwargs = copy_inputs(dict(k.kwargs), [_MAX_INPUT_ITEMS])
        except Opaque as exc:
            return {"status": "skipped", "reason": f"the inputs hold a {exc}, which the "
                                                   f"forward may change in place"}
        note = None
        if m.discover and not args:
            return {"status": "skipped", "reason": "keyword-only call (gradwatch run cannot "
                                                   "see keyword arguments)"}
        if any(t._version != v for t, v in k.versions):
            note = "an input was changed in place after the forward: replayed on its new values"
        flags = [_flags(t) for t in float_tensors((args, kwargs), [])]
        nan_in = next((i for i, f in enumerate(flags) if f[0]), None)
        if nan_in is not None:  # NaN is never meant: the batch is bad, not the model
            return {"status": "input", "kind": "nan", "input_index": nan_in, "note": note}
        inf_in = next((i for i, f in enumerate(flags) if f[1]), None)
        params = [(n, p) for n, p in root.named_parameters()]
        bad = [n for n, p in params if any(_flags(p.detach()))]
        if bad:
            return {"status": "weights", "params": bad[:20], "note": note}
        names = {id(mod): path for path, mod in root.named_modules()}
        tracer = OriginTracer(names, name)
        try:
            output = self._replay(root, k, args, kwargs, tracer)
        except Exception as exc:  # the user's model failed on the replay: recorded
            return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}
        if tracer.error is not None:
            return {"status": "failed", "reason": tracer.error}
        found = tracer.output_origin(output)
        if found is None:
            out: dict[str, Any] = {
                "status": "output_finite", "note": note, "births": len(tracer.births),
                "reason": "the replayed forward's output was finite: the loss computation "
                          "outside the model, or an op that does not repeat itself, made "
                          "the non-finite value"}
            if m.discover:
                out["reason"] += " (gradwatch run does not see keyword arguments)"
            return out
        # Inf that came in from outside (a -inf mask, an Inf in the data) and turned NaN
        from_outside = found is OUTSIDE or (found.get("inputs") == "inf" and
                                            found.get("inf_birth") is None)
        if from_outside and inf_in is not None:
            out = {"status": "input", "kind": "inf", "input_index": inf_in, "note": note}
            if found is not OUTSIDE:
                out["nan_site"], out["nan_op"] = found["site"], found["op"]
            return out
        if found is OUTSIDE:
            return {"status": "buffers", "note": note,
                    "reason": "the non-finite values came from a buffer or constant of the "
                              "model, not from an op of this forward"}
        extra: dict[str, Any] = {}
        inf_birth = found.get("inf_birth")
        if inf_birth is not None and inf_birth.get("constant"):
            # NaN from an Inf written on purpose (a -inf mask): born here, the mask noted
            extra = {"inf_from": inf_birth["site"]}
        elif inf_birth is not None:
            # NaN from an Inf born earlier from finite values (exp overflow, x / 0, a -inf
            # mask): the producer is where the Inf was born; where it turned NaN is noted.
            extra = {"nan_site": found["site"], "nan_module": found["module"],
                     "nan_op": found["op"]}
            found = found["inf_birth"]
        module = found.get("module_ref")
        layer = m.watched.layer_of_module(module) if module is not None else None
        birth = {key: v for key, v in found.items() if key not in ("module_ref", "inf_birth")}
        return {"status": "producer", **birth, **extra, "layer_index": layer, "note": note,
                "births": len(tracer.births), "ops": tracer.ops}

    def _replay(self, root: nn.Module, k: _Kept, args: Any, kwargs: Any,
                tracer: OriginTracer) -> Any:
        """The kept forward once more, traced; the user's model and RNG left as they were."""
        m = self.monitor
        modules = list(root.modules())
        swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
        budget = MAX_BUFFER_BYTES
        rng_now = get_rng([d for d, _ in k.rng if d is not None])
        py_state, np_state = random.getstate(), np.random.get_state()
        handles: list[Any] = []
        births_at: dict[int, list[int]] = {}

        def pre(mod: nn.Module, _: Any) -> None:
            tracer.stack.append(mod)
            births_at.setdefault(id(mod), []).append(len(tracer.births))

        def post(mod: nn.Module, a: Any, output: Any) -> None:
            if tracer.stack and tracer.stack[-1] is mod:
                tracer.stack.pop()
            opened = births_at.get(id(mod))
            before = opened.pop() if opened else 0
            if tracer.paused:
                return
            tracer.paused = True  # the checks below are gradwatch's, not the model's ops
            try:
                tracer.module_done(mod, a, output, before)
            except Exception as exc:
                tracer.error = f"{type(exc).__name__}: {exc}"[:300]
                return
            tracer.paused = False

        try:
            for mod in modules:
                for key, buf in mod._buffers.items():
                    if buf is None:
                        continue
                    size = buf.numel() * buf.element_size()
                    if size > budget:
                        continue
                    budget -= size
                    swapped.append((mod, key, buf))
                    mod._buffers[key] = buf.detach().clone()
            for mod in modules:
                handles.append(mod.register_forward_pre_hook(pre))
                handles.append(mod.register_forward_hook(post, always_call=True))
            set_rng(k.rng)  # replay: random ops draw the same numbers as the forward did
            m.suspended += 1
            try:
                # With gradients, as the forward ran: some kernels differ without them
                # (attention's fully masked rows); no backward ever runs on this graph.
                with torch.enable_grad(), _Mode(tracer):
                    return root(*args, **kwargs)
            finally:
                m.suspended -= 1
        finally:
            for h in handles:
                h.remove()
            set_rng(rng_now)
            random.setstate(py_state)
            np.random.set_state(np_state)
            for mod, key, buf in swapped:
                mod._buffers[key] = buf
