"""Hook attachment only: every registration returns a handle kept in a :class:`Handles`.

Three kinds of probe feed a :class:`~gradwatch.measure.monitor.Monitor`:

* module forward hooks (per model for ``watch``, process-global for ``gradwatch run``):
  forward order, activation scale, model input/output;
* optimizer step pre/post hooks (per optimizer, or global): the step clock;
* the backward interceptor: the loss and raw gradients. PyTorch has no hook that sees
  the tensor ``backward()`` is called on, so while at least one monitor is active,
  ``torch.autograd.backward`` (which ``Tensor.backward`` calls) is wrapped; the original is
  restored when the last monitor closes, also on exceptions.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.optim import optimizer as optimizer_hooks

from . import frameworks
from .distributed import unwrap_parallel
from .monitor import Monitor

__all__ = ["INTERCEPTOR", "GlobalProbes", "Handles", "attach_model", "attach_optimizer",
           "compiling", "unwrap_compiled"]


def compiling() -> bool:
    """True while torch.compile traces: hooks then do nothing, so that they add no guards,
    graph breaks or recompilations to the user's compiled model. Its parameters' gradients,
    the loss and the optimizer steps are still measured, outside the compiled region."""
    return torch.compiler.is_compiling()


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiles (cheap check: this runs per call)."""
    if type(module).__name__ == "OptimizedModule":
        return module._orig_mod  # type: ignore[return-value]
    return module


class Handles:
    """Removable handles of one monitor; removal is idempotent and never raises."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, handle: Any) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            handle = self._handles.pop()
            try:
                handle.remove()
            except Exception:
                pass

    def __len__(self) -> int:
        return len(self._handles)


class _BackwardInterceptor:
    """Wraps ``torch.autograd.backward`` while monitors are active; dispatches to them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._monitors: list[Monitor] = []
        self._original: Callable[..., Any] | None = None
        self.flags: dict[int, bool] = {}
        self.armed: set[int] = set()  # monitors whose model output carries a flag hook

    @property
    def active(self) -> int:
        return len(self._monitors)

    def register(self, monitor: Monitor) -> _InterceptorHandle:
        with self._lock:
            if not self._monitors:
                self._original = torch.autograd.backward
                torch.autograd.backward = self._backward  # type: ignore[assignment]
            self._monitors.append(monitor)
        return _InterceptorHandle(self, monitor)

    def unregister(self, monitor: Monitor) -> None:
        with self._lock:
            self._monitors = [m for m in self._monitors if m is not monitor]
            self.flags.pop(id(monitor), None)
            self.armed.discard(id(monitor))
            if not self._monitors and self._original is not None:
                torch.autograd.backward = self._original  # type: ignore[assignment]
                self._original = None

    def _backward(self, tensors: Any, *args: Any, **kwargs: Any) -> Any:
        original = self._original or _ORIGINAL_BACKWARD
        loss = tensors if isinstance(tensors, torch.Tensor) else None
        if loss is None and isinstance(tensors, (tuple, list)) and len(tensors) == 1 \
                and isinstance(tensors[0], torch.Tensor):
            loss = tensors[0]
        monitors = self._for_this_thread()
        if loss is None or kwargs.get("create_graph") or (args and len(args) > 2 and args[2]):
            # Higher-order gradients (gradient penalties, meta-learning) are not a
            # training step's loss: let them through untouched.
            return original(tensors, *args, **kwargs)
        for m in monitors:
            self.flags[id(m)] = False
            m.on_backward_begin(loss)
        result = original(tensors, *args, **kwargs)
        for m in monitors:
            # A watch takes the loss only if the gradient went through its model's output
            # (flag set by a grad_fn pre-hook in forward): another model trained in the
            # same loop is not its business. Where no output could be hooked (the model
            # is only run through torch.compile, or through submodules), every backward
            # counts that reaches its parameters; `gradwatch run` watches the whole process.
            if m.discover or self.flags.get(id(m)) or id(m) not in self.armed or \
                    not m.root_forwards:
                m.on_backward_end(loss)
        return result


    def _for_this_thread(self) -> list[Monitor]:
        """The monitors a backward in this thread goes to. A watch takes the backward
        calls of the thread that trains its model (where its forward or step last ran), so
        that two threads training two watched models never see each other's steps; when no
        watch trains in this thread (a loop moved to another thread, DataParallel's replicas
        running the forward elsewhere), every watch takes it, as in a single thread.
        `gradwatch run` watches the whole process."""
        monitors = list(self._monitors)
        thread = threading.get_ident()
        mine = [m for m in monitors if not m.discover and m.thread == thread]
        return [m for m in monitors if m.discover or not mine or m.thread == thread]


_ORIGINAL_BACKWARD = torch.autograd.backward


class _InterceptorHandle:
    def __init__(self, interceptor: _BackwardInterceptor, monitor: Monitor) -> None:
        self._interceptor, self._monitor = interceptor, monitor

    def remove(self) -> None:
        self._interceptor.unregister(self._monitor)


INTERCEPTOR = _BackwardInterceptor()


def _flag_output(monitor: Monitor, output: Any) -> None:
    """Mark ``monitor`` when the gradient of a backward passes through this output.

    One ``register_prehook`` per forward (about 5 us) on outputs that require grad.
    """
    key = id(monitor)

    def mark(*_: Any) -> None:
        INTERCEPTOR.flags[key] = True

    stack = [output]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if o.grad_fn is not None:
                o.grad_fn.register_prehook(mark)
        elif isinstance(o, (tuple, list)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())


def attach_model(monitor: Monitor, model: nn.Module, handles: Handles) -> None:
    """Forward hooks on the model and on each of its parameter-owning modules."""

    def root_pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not compiling():
            monitor.on_root_forward_pre(module, args, kwargs)

    def root_post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                  output: Any) -> None:
        if not compiling():
            monitor.root_forwards += 1
            monitor.on_root_forward(module, output, args, kwargs)
            _flag_output(monitor, output)

    def layer_pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return None if compiling() else monitor.on_layer_forward_pre(module, args)

    def layer_post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # Layer outputs are read on detail steps only (0-7 included, when the layers'
        # order is learnt): on the others return before the guard (~0.2 ms a step on a
        # model of 40 small layers).
        if not compiling() and monitor.is_detail_step():
            monitor.on_layer_forward(module, output)

    handles.add(model.register_forward_pre_hook(root_pre, with_kwargs=True))
    for module in model.modules():
        if monitor.watched.layer_of_module(module) is not None:
            if monitor.wants_layer_pre(module):
                handles.add(module.register_forward_pre_hook(layer_pre))
            handles.add(module.register_forward_hook(layer_post))
    # always_call: extensions that scope something to the forward (a TorchFunctionMode)
    # must close it also when the forward raises.
    handles.add(model.register_forward_hook(root_post, with_kwargs=True, always_call=True))


def attach_optimizer(monitor: Monitor, optimizer: torch.optim.Optimizer,
                     handles: Handles) -> None:
    """Step pre/post hooks: the step clock and the weight update."""
    monitor.add_optimizer(optimizer)

    def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if monitor.root_forwards == 0:
            # The model's own forward was never seen (it runs compiled, or only through
            # its submodules): output flags cannot tell its losses, so take them all.
            INTERCEPTOR.armed.discard(id(monitor))
        monitor.on_step_end(opt)

    handles.add(optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: monitor.on_step_begin(opt)))
    handles.add(optimizer.register_step_post_hook(post))


class GlobalProbes:
    """Process-wide hooks for ``gradwatch run``: discover models and optimizers as they run.

    A *root* is a module with parameters called while no other module is running; its
    parameter-owning submodules become layers. ``name_of`` names roots and bare tensors
    after the script's own variables where it can.
    """

    def __init__(self, monitor: Monitor, handles: Handles,
                 name_of: Callable[[Any], str | None]) -> None:
        self.monitor, self.name_of = monitor, name_of
        self._depth = 0
        handles.add(module_hooks.register_module_forward_pre_hook(self._pre))
        # always_call: the depth count must unwind even when a forward raises.
        handles.add(module_hooks.register_module_forward_hook(self._post, always_call=True))
        handles.add(optimizer_hooks.register_optimizer_step_pre_hook(self._step_pre))
        handles.add(optimizer_hooks.register_optimizer_step_post_hook(self._step_post))

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if compiling() or module is not unwrap_parallel(module):
            return None  # a DDP wrapper is transparent: the module it trains is the root
        monitor = self.monitor
        monitor.reap()
        if self._depth == 0 and monitor.enabled:
            compiled = module is not unwrap_compiled(module)
            # A torch.compile wrapper is watched through the module it compiles, but its
            # forward is not measured: a function mode or hook inside it while Dynamo
            # traces would break the graph and change the compiled numbers.
            module = unwrap_compiled(module)
            if not monitor.watched.is_root(module) and any(
                    p.requires_grad for p in module.parameters()):
                self._adopt(module)
            if monitor.watched.is_root(module):
                if compiled:
                    monitor.note_compiled(module)
                else:
                    monitor.on_root_forward_pre(module, args)
        self._depth += 1
        if monitor.enabled and monitor.wants_layer_pre(module):
            return monitor.on_layer_forward_pre(module, args)
        return None

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if compiling() or module is not unwrap_parallel(module):
            return
        self._depth = max(0, self._depth - 1)
        monitor = self.monitor
        if not monitor.enabled:
            return
        if monitor.is_detail_step() and monitor.watched.layer_of_module(module) is not None:
            monitor.on_layer_forward(module, output)
        if self._depth == 0 and module is unwrap_compiled(module) and \
                monitor.watched.is_root(module):
            monitor.on_root_forward(module, output, args)

    def _adopt(self, module: nn.Module) -> None:
        """A new root: named after the script's variable that holds it. A submodule that a
        LightningModule's training_step calls is named as a part of the LightningModule:
        its layers by their path in it (``net.3``), the root after the LightningModule."""
        try:
            caller = sys._getframe(1)
            owner = frameworks.lightning_owner(module, caller)
            holder, prefix = owner if owner is not None else (module, "")
            name = self.name_of(holder) or type(holder).__name__.lower()
            self.monitor.add_root(module, name, prefix)
            frameworks.note(self.monitor.history.facts, caller)
        except Exception as exc:  # never break the user's forward
            self.monitor.fail(exc)
            if self.monitor.options.strict:
                raise

    def _step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.monitor.enabled and self.monitor.add_optimizer(optimizer):
            # The framework stepping it, read again now that its optimizer exists.
            frameworks.note(self.monitor.history.facts, sys._getframe(1))
        self.monitor.on_step_begin(optimizer)

    def _step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        monitor = self.monitor
        monitor.on_step_end(optimizer)
        if monitor.enabled:
            # Parameters the optimizer updates that no model call has shown: tracked from
            # now on. Done after the step, because a closure (LBFGS) runs the model only
            # inside step().
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if any(not monitor.watched.tracks(p) for p in params):
                monitor.add_tensors(params)
