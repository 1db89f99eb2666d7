"""Where a NaN is born: the first op or module of the forward whose output turned NaN/Inf
while its inputs were finite, found by replaying the forward of the first non-finite loss.

A NaN that appears in the forward spreads into every layer after it, so the layers whose
output is non-finite say little about where it came from; ``torch.autograd.detect_anomaly``
covers only the backward. Checking every op of every forward would cost a reduction and a
host sync per op; this extension costs, per training forward, a reference to its inputs
(not a copy) and, for a model with random layers, the generator state (about 1 us), and per
backward one host read of a CPU loss (about 1 us). Nothing else runs until a loss is NaN/Inf.

On the first non-finite loss, before ``backward()`` runs and so before any optimizer has
used it, the latest forward with gradients of each watched model is replayed once, in
execution order of the models:

* on copies of its inputs and buffers (BatchNorm statistics, caches), with the generator
  state it started from when the model has random layers (saved at each forward of such
  a model only: Dropout draws the same mask), with gradients
  enabled as in the original forward (some kernels differ without them) but no backward,
  under the ``torch.autocast`` the forward ran in (fp16 overflow), the monitor suspended
  (no hook measures it); afterwards every buffer, every module attribute the forward
  rebinds (``self.hidden = ...``), the RNG states (torch, Python, numpy) are as they were:
  the run's numbers do not change (the user's own forward hooks do run again, as they do
  for the eval-mode check's re-run);
* under the tracer of ``tracer.py``: a ``TorchFunctionMode`` that sees every torch call
  (functional, tensor method, operator, ``F.scaled_dot_product_attention``,
  ``F.multi_head_attention_forward``...) and forward hooks on every submodule, which say
  in whose forward each call runs. An op whose floating-point output holds NaN (Inf) while
  no input held NaN (Inf) is where a NaN (an Inf) is born, and each non-finite value is
  traced to its own birth. The *producer* is the birth of the values the model's output
  holds (NaN first): a NaN made from an Inf born earlier from finite values (``exp``
  overflow then ``inf - inf``, ``x / 0``) is traced to that Inf's birth, the op that
  turned it NaN being noted; an Inf written on purpose (``masked_fill(mask, -inf)``) is a
  mask, not a producer: the NaN it became (a softmax over a fully masked row) is.

What is recorded (``history.events.nonfinite_origin``, a dict, judged by
``judge/detectors/nonfinite.py``): the step, the model, and ``status``: ``"producer"`` (the
birth place: module path, its type, the op, a site name ``Module.op@k`` as activation sites
are named, NaN or Inf, whether the op's inputs were finite or held a mask's Inf, their
finite range, where a NaN formed from its Inf), ``"input"`` (the model's input was already
non-finite: the batch, not the model), ``"weights"`` (a parameter was already non-finite),
``"buffers"`` (non-finite values from a buffer or constant), ``"output_finite"`` (the
replay's output was finite: the loss computation outside the model, or an op that does not
repeat itself, made the NaN), ``"skipped"``, ``"failed"`` or ``"not_checked"`` with the
reason.

Not covered: a model on an accelerator (its loss is not read, which would cost a host sync
per step, and nothing of its forwards is kept: when a flush finds a non-finite loss, the
status ``"not_checked"`` says so), a model run through ``torch.compile`` (its forward is
not seen), a forward that synchronises with other processes (SyncBatchNorm, FSDP: skipped;
DistributedDataParallel is replayed through the module it wraps), keyword arguments under
``gradwatch run`` (global hooks do not see them: the reason says so), NaN born in
``backward()`` (``detect_anomaly`` covers that), state a forward changes in place outside
buffers and attributes (a list it appends to).
"""

from __future__ import annotations

import contextlib
import math
import random
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from ..extension import Extension
from .evalmode import mode_dependent
from .rerun import MAX_BUFFER_BYTES, Opaque, copy_inputs, float_tensors, get_rng, set_rng
from .tracer import OUTSIDE, OriginTracer, TraceMode, flags

__all__ = ["NanOrigin"]

_MAX_INPUT_ITEMS = 4096  # larger input containers are not copied for the replay


def _autocast(device_type: str) -> torch.dtype | None:
    """The dtype of the ``torch.autocast`` region the forward runs in, None outside one."""
    try:
        if torch.is_autocast_enabled(device_type):  # type: ignore[call-arg]
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4: not replayed in it
        return None
    return None


class _Kept:
    """One watched model and its latest forward with gradients: references, not copies.
    Made once per model and updated in place at each forward (the hot path)."""

    __slots__ = ("args", "autocast", "index", "kwargs", "order", "random", "rng", "root", "seq",
                 "versions")

    def __init__(self, root: nn.Module, index: int, random: bool) -> None:
        self.root = weakref.ref(root)
        self.index, self.random = index, random
        self.autocast: torch.dtype | None = None  # the forward ran under torch.autocast
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.rng: Any = None
        self.seq = self.order = -1  # no forward kept yet
        self.versions: list[tuple[torch.Tensor, int]] = []

    def keep(self, args: tuple[Any, ...], kwargs: dict[str, Any], seq: int,
             order: int) -> None:
        self.args, self.kwargs, self.seq, self.order = args, kwargs, seq, order
        if self.random:
            # the generator state the forward starts from (CPU: a 5 KB copy, about 1 us),
            # for models with random layers only
            self.rng = [(None, torch.get_rng_state())]
        self.autocast = _autocast("cpu")
        # in-place changes to an input after the forward show in its version counter
        self.versions = [(t, t._version) for t in args if isinstance(t, torch.Tensor)]


class NanOrigin(Extension):
    """On the first non-finite loss, replays the forward that made it to find the op or
    module where the NaN/Inf was born (see the module docstring)."""

    def __init__(self) -> None:
        self._kept: dict[int, _Kept | None] = {}  # id(root) -> it (None: never replayed)
        self._seq = 0  # backward calls so far: forwards kept since the last one count
        self._order = 0
        self._device: str | None = None  # an accelerator a loss lived on (never read)
        self.done = False

    # ------------------------------------------------------------------ hot path
    def on_root_forward_pre(self, module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> None:
        if self.done or not torch.is_grad_enabled():
            return
        key = id(module)
        kept = self._kept.get(key, False)
        if kept is False:
            kept = self._kept[key] = self._new(module)
        if kept is not None:
            self._order += 1
            kept.keep(args, kwargs, self._seq, self._order)

    def _new(self, module: nn.Module) -> _Kept | None:
        """A model's first forward: its record, or None if it is never replayed."""
        index = self.monitor.watched.root_of_module(module)
        if index is None or getattr(module, "_compiled_call_impl", None) is not None:
            return None
        first = next(module.parameters(), None)
        if first is not None and first.device.type != "cpu":
            return None  # its loss is not read on an accelerator (a sync): nothing to keep
        # Dropout of every kind, RReLU...: their draws are replayed from the saved state;
        # a model without them (or with only a functional F.dropout) saves none per step
        random = any((found := mode_dependent(mod)) is not None and found[0] != "batchnorm"
                     for mod in module.modules())
        return _Kept(module, index, random)

    def on_backward_begin(self, loss: torch.Tensor) -> None:
        seq = self._seq
        self._seq = seq + 1
        if self.done or not isinstance(loss, torch.Tensor):
            return
        if not loss.is_cpu:
            self._device = loss.device.type  # not read: that would be a sync per step
            return
        kept = [k for k in self._kept.values() if k is not None and k.seq == seq]
        if not kept:
            return  # no forward of a watched model since the last backward: not its loss
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
        """A NaN loss that was not checked (on an accelerator, or without a forward of a
        watched model): say so, and check no later one."""
        ev = self.monitor.history.events
        if ev.nonfinite_origin is None and ev.first_nonfinite_loss is not None:
            self.done, self._kept = True, {}
            reason = (f"the loss lives on {self._device}, where reading it at every step "
                      f"would cost a synchronisation" if self._device else
                      "no forward of a watched model with gradients was seen before its "
                      "backward (a torch.compile'd model, one run only through its "
                      "submodules)")
            ev.nonfinite_origin = {"status": "not_checked", "step": ev.first_nonfinite_loss,
                                   "reason": f"{reason}: the forward was not replayed"}

    def on_root_gone(self, root: int) -> None:
        """Drop what was kept of a model that died (its id may be reused)."""
        for key, k in list(self._kept.items()):
            if k is None or k.index == root:
                del self._kept[key]

    def finish(self) -> None:
        self._kept = {}

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
        if any(isinstance(mod, nn.SyncBatchNorm) or "FullyShard" in type(mod).__name__ or
               any(c.__name__ == "FSDPModule" for c in type(mod).__mro__)  # FSDP2: FSDPLinear
               for mod in root.modules()):
            # their forward talks to the other processes, which do not replay: a hang
            return {"status": "skipped", "reason": "the forward synchronises across processes "
                                                   "(SyncBatchNorm, FSDP)"}
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
        seen = [flags(t) for t in float_tensors((args, kwargs), [])]
        nan_in = next((i for i, f in enumerate(seen) if f[0]), None)
        if nan_in is not None:  # NaN is never meant: the batch is bad, not the model
            return {"status": "input", "kind": "nan", "input_index": nan_in, "note": note}
        inf_in = next((i for i, f in enumerate(seen) if f[1]), None)
        params = [(n, p) for n, p in root.named_parameters()]
        bad = [n for n, p in params if any(flags(p.detach()))]
        if bad:
            return {"status": "weights", "params": bad[:20], "note": note}
        names = {id(mod): path for path, mod in root.named_modules()}
        tracer = OriginTracer(names, name)
        try:
            output = self._replay(root, k, args, kwargs, tracer)
        except Exception as exc:  # the user's model failed on the replay: recorded
            why = " (gradwatch run does not see keyword arguments)" if m.discover else ""
            return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300] + why}
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
                out["reason"] += (", or keyword arguments of the call, which gradwatch run "
                                  "does not see")
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
            # NaN from an Inf born earlier from finite values (exp overflow, x / 0): the
            # producer is where the Inf was born; where it turned NaN is noted.
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
        rng_now = get_rng([])
        py_state, np_state = random.getstate(), np.random.get_state()
        # attributes the forward rebinds (self.hidden = ...) are put back after it
        attrs = [(mod, dict(mod.__dict__)) for mod in modules]
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
            if k.rng is not None:
                set_rng(k.rng)  # replay: random ops draw the same numbers as the forward did
            m.suspended += 1
            try:
                # With gradients, as the forward ran: some kernels differ without them
                # (attention's fully masked rows); no backward ever runs on this graph.
                amp = torch.autocast("cpu", dtype=k.autocast) \
                    if k.autocast is not None else contextlib.nullcontext()
                # DistributedDataParallel's own forward broadcasts buffers to the other
                # processes, which do not replay: the module it wraps is run instead
                call = root.module if isinstance(
                    root, nn.parallel.DistributedDataParallel) else root
                with torch.enable_grad(), amp, TraceMode(tracer):
                    return call(*args, **kwargs)
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
            for mod, saved in attrs:
                now = mod.__dict__
                if now.keys() != saved.keys() or any(now[n] is not v for n, v in saved.items()):
                    now.clear()
                    now.update(saved)
