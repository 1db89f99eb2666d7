"""The measuring engine: step clock, device buffers, one host copy every ``sync_every`` steps.

Probes (``probes.py``) call the ``on_*`` methods; the monitor never registers a hook
itself. Everything measured on a step stays on the tensors' device in preallocated
buffers (one row per step); :meth:`Monitor.flush` copies all of them to the host in a
single transfer, aggregates parameters into layers and appends to :class:`History`.

A *step* is one ``optimizer.step()`` of a watched optimizer. Without optimizer it is one
``gw.step(loss)``, or, when the script updates parameters by hand, one ``backward()``.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..history import History
from ..thresholds import Thresholds
from .buffers import StepBuffers
from .cadence import Cadence
from .extension import Extension
from .graph import GraphReader
from .guard import guarded
from .layers import Watched
from .measures import GradientMark, StepMeasures
from .options import Options
from .rows import record_rows

__all__ = ["Monitor", "Options"]

class Monitor:
    """Accumulates per-step statistics on device and hands them to :class:`History`."""

    def __init__(self, options: Options | None = None,
                 thresholds: Thresholds | None = None, discover: bool = False,
                 extensions: Sequence[Extension] = ()) -> None:
        self.options = options or Options()
        o = self.options
        self.cadence = Cadence(o.detail_every, o.overhead, o.sync_every)  # detail steps
        self.discover = discover  # adopt bare tensors found in the graph (gradwatch run)
        self.thresholds = thresholds or Thresholds()
        self.history = History(self.options.capacity)
        self.watched = Watched(self.history)
        #: Finds the models that own parameters (by id) whose model's forward was never
        #: seen (``gradwatch run``: the script's global models).
        self.models_of: Callable[[set[int]], list[tuple[str, nn.Module]]] = lambda ids: []
        self.watched.root_gone.append(self._root_gone)
        self.enabled = True
        self.errors: list[str] = []
        self.stopped_at: int | None = None  # the step at which measuring stopped
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.status = "running"
        self.ending: tuple[str, str | None] | None = None  # close()'s (status, error)
        self.error: str | None = None
        self.mode = "unknown"  # "optimizer" | "explicit" | "backward"
        self.step = 0  # the step being accumulated, not yet committed
        #: The thread that trains the watched model (where its forward or optimizer step
        #: last ran): a ``watch`` takes only the backward calls made in it.
        self.thread = threading.get_ident()
        self._forward_counter = 0
        self.root_forwards = 0  # forwards of the watched model seen by its own hook
        # device buffers
        self.buffers = StepBuffers(self.options.sync_every)
        self.measures = StepMeasures(self.buffers, self.watched)
        self.graph = GraphReader(self.history, self.watched)
        self._grad_mark = GradientMark(self.watched)  # the last backward's gradients
        # per-step transient state
        self._losses: list[torch.Tensor] = []
        self._step_losses: list[torch.Tensor] = []  # losses of closures run inside step()
        self._in_step = 0
        self._grads_taken = False
        self._probe_norms: torch.Tensor | None = None
        self._probes = 0
        self._stepping = -1  # index of the optimizer whose step() is running
        self._step_lr = math.nan
        self._wants_pre: dict[int, bool] = {}  # layer -> an extension pre-hooks it
        self._act_step: dict[int, int] = {}  # layer -> step whose output RMS it holds
        self.last_layer = -1  # the layer whose forward ran last (feeds the next activation)
        self.suspended = 0  # > 0 while gradwatch itself runs the model: hooks do nothing
        # ids of tensors gradwatch made this step (input probes): never adopted as bare
        # parameters when the graph is read; cleared at each step boundary
        self.own_tensors: set[int] = set()
        #: Called with the monitor after each step is closed (``--verify`` re-runs stop a
        #: script there after their step budget).
        self.step_listeners: list[Callable[[Monitor], None]] = []
        self.extensions: list[Extension] = []
        for ext in extensions:
            self.add_extension(ext)

    # ------------------------------------------------------------------ registration
    def fail(self, exc: BaseException) -> None:
        """Record an internal error and stop measuring; the user's run goes on."""
        self.errors.append("".join(traceback.format_exception_only(type(exc), exc)).strip())
        if self.enabled:
            self.stopped_at = self.step
        self.enabled = False

    def add_root(self, module: nn.Module, name: str, prefix: str = "") -> None:
        """Track a top-level model: its parameter-owning modules become layers."""
        self.watched.reap()
        self.watched.add_root(module, name, prefix)

    def add_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Track parameters no tracked module owns: those of a model the script holds
        (``models_of``) are adopted with their model, the rest as bare tensors."""
        self.watched.reap()
        self.watched.add_tensors(tensors, self.own_tensors, self.models_of)

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Track an optimizer's settings; True if it was not tracked before."""
        self.watched.reap()
        return self.watched.add_optimizer(optimizer)

    def add_extension(self, extension: Extension) -> None:
        extension.bind(self)
        self.extensions.append(extension)

    def reap(self) -> None:
        """Forget watched objects that died (call before looking one up by identity)."""
        self.watched.reap()

    def note_compiled(self, module: nn.Module) -> None:
        """This root's forward runs through ``torch.compile``: its forward is not measured."""
        self.watched.note_root(module, "compiled_roots")

    def _root_gone(self, root: int) -> None:
        self._each_extension(lambda ext: ext.on_root_gone(root))

    def _each_extension(self, call: Callable[[Extension], None]) -> None:
        for ext in self.extensions:
            try:
                call(ext)
            except Exception as exc:
                self.fail(exc)
                if self.options.strict:
                    raise

    # ------------------------------------------------------------------ buffers
    def _row(self) -> int:
        """This step's row, once the buffers have a column for every parameter and layer
        (new parameters mid-run: the committed rows are flushed, the current one moves)."""
        return self.buffers.row(self.step, self.watched.slots, len(self.history.layers),
                                self.device, self.flush)

    row = _row  # this step's row in every device buffer (extensions call it)

    def buffer(self, key: str) -> torch.Tensor:
        """A device buffer by key (look it up each time: buffers are re-allocated)."""
        self._row()
        return self.buffers.buf[key]

    def add_buffer(self, key: str, shape: tuple[int, ...]) -> None:
        """Register an extension's per-step device buffer: float64, NaN = not measured."""
        self.buffers.add(key, shape, self.device)

    @property
    def device(self) -> torch.device:
        """Where the statistics live: the device of the first watched parameter."""
        return self.watched.device or torch.device("cpu")

    def is_detail_step(self) -> bool:
        """Whether the step being accumulated measures weights and activations."""
        return self.cadence.is_detail(self.step)

    def _is_sampled(self, step: int) -> bool:
        return step % self.options.every == 0 or self.cadence.is_detail(step)

    # ------------------------------------------------------------------ events from probes
    @guarded
    def on_backward_begin(self, loss: torch.Tensor) -> None:
        """Before autograd runs: read the graph once; close a hand-made update."""
        self.measures.read_scale(loss)  # a GradScaler's factor, before backward() frees it
        # Read the graph once per model: at the first backward, and again when a model
        # appears that no graph has covered yet (scripts that train several in turn).
        graph = self.graph.walk(loss, self.discover) if isinstance(loss, torch.Tensor) else None
        if graph is not None:
            if self.discover:
                self.add_tensors(graph.leaves)
            self.graph.adopt(graph)
        if self.mode == "backward" and self._losses:
            self._commit()
        elif self.mode == "unknown" and self._losses:
            self._probe_manual_update()
        elif self.mode == "optimizer" and self._losses and not self._in_step and \
                self._grad_mark.reset_since():
            # The gradients of the losses taken so far were wiped (zero_grad) before any
            # step used them: they are not this step's losses. In a GAN loop, the
            # generator's loss flows back through the discriminator, whose optimizer then
            # zeroes it and steps on the discriminator's own loss.
            self._losses, self._grads_taken = [], False
        self._each_extension(lambda ext: ext.on_backward_begin(loss))

    @guarded
    def on_backward_end(self, loss: torch.Tensor) -> None:
        """After autograd filled ``.grad``: raw (pre-clipping) gradient norms and the loss."""
        if self._in_step:
            # Closure inside optimizer.step() (LBFGS, Lightning): its first evaluation is the
            # step's last backward, accumulated onto any before it, at its starting point.
            if not self._step_losses:
                self._step_losses.append(self.measures.unscaled(loss))
                if self._is_sampled(self.step):
                    self.measures.gradients(self._row(), "grad")
                self._grads_taken = True
            return
        if not self.discover and self.mode != "explicit":
            if not self._grad_mark.set():
                # No watched parameter has a gradient: this backward trained another
                # model (one the watch cannot tell by its output), not this one.
                return
        self._losses.append(self.measures.unscaled(loss))
        if self._is_sampled(self.step):
            # Accumulation: the last call holds the summed gradients.
            self.measures.gradients(self._row(), "grad")
        self._grads_taken = True
        if self.mode == "backward":
            if self.cadence.is_detail(self.step):
                self.measures.snapshot(self._row())
        elif self.mode != "optimizer":
            self._probe_norms = self.measures.weight_norms(self.device)
            if self.cadence.is_detail(self.step):
                self.measures.snapshot(self._row())

    def _probe_manual_update(self) -> None:
        """Second backward with no optimizer step in between: were weights changed by hand?"""
        before = self._probe_norms
        after = self.measures.weight_norms(self.device)
        self._probes += 1
        # One host sync, only during the first few backward calls of a run.
        changed = before is not None and after is not None and \
            before.shape == after.shape and bool((before != after).any())
        if (changed and not self.watched.optimizers) or \
                self._probes >= self.options.probe_backwards:
            self.mode = "backward"
            self._commit()

    @guarded
    def on_step_begin(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` starts: applied (post-clipping) gradients, weight snapshot."""
        self.mode = "optimizer"
        self.thread = threading.get_ident()
        self._in_step += 1
        if self._in_step > 1:
            return
        self._stepping = self.watched.optimizer_index(optimizer)
        # The rate this step really uses (schedulers change it): host floats, no sync. A
        # tensor learning rate (capturable optimizers) is not read, to avoid a sync.
        rates = [g.get("lr") for g in optimizer.param_groups]
        rates = [float(r) for r in rates if isinstance(r, (int, float))]
        self._step_lr = max(rates) if rates else math.nan
        if self.cadence.is_detail(self.step):
            if self._grads_taken:
                # Gradients as the optimizer will apply them: after the user's clipping.
                self.measures.gradients(self._row(), "grad_applied")
            self.measures.snapshot(self._row())

    @guarded
    def on_step_end(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` returned: the step is complete."""
        self._in_step = max(0, self._in_step - 1)
        if self._in_step:
            return
        if self.watched.optimizer_roots_unknown(optimizer):
            self.watched.note_optimizer_roots(optimizer)
        self._commit()

    @guarded
    def on_explicit_step(self, loss: torch.Tensor | None) -> None:
        """``gw.step(loss)``: the loss of this step; a step boundary when no optimizer runs."""
        if loss is not None:
            self._losses = [loss.detach() if isinstance(loss, torch.Tensor) else loss]
        if self.mode == "optimizer":
            self.measures.loss(self._row(), self._losses)
            return
        self.mode = "explicit"
        if not self._grads_taken:
            self.measures.gradients(self._row(), "grad")
            self._grads_taken = True
        self._commit()
        if self.cadence.is_detail(self.step):
            self.measures.snapshot(self._row())

    @guarded
    def on_root_forward_pre(self, module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any] | None = None) -> None:
        if self.suspended:
            return
        self.thread = threading.get_ident()
        for ext in self.extensions:
            ext.on_root_forward_pre(module, args, kwargs or {})
        if torch.is_grad_enabled() and self.cadence.is_detail(self.step):
            self.measures.inputs(self._row(), args)

    @guarded
    def on_root_forward(self, module: nn.Module, output: Any,
                        args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                        ) -> None:
        if self.suspended:
            return
        for ext in self.extensions:
            ext.on_root_forward(module, args, kwargs or {}, output)
        if torch.is_grad_enabled() and self.cadence.is_detail(self.step):
            self.measures.outputs(self._row(), output)

    def wants_layer_pre(self, module: nn.Module) -> bool:
        """Whether some extension needs a forward pre-hook on this watched layer (decided
        once per layer: ``gradwatch run`` asks on every module call)."""
        layer = self.watched.layer_of_module(module)
        if layer is None:
            return False
        wants = self._wants_pre.get(layer)
        if wants is None:
            wants = self._wants_pre[layer] = any(ext.wants_layer_pre(module)
                                                 for ext in self.extensions)
        return wants

    @guarded
    def on_layer_forward_pre(self, module: nn.Module, args: tuple[Any, ...]
                             ) -> tuple[Any, ...] | None:
        if self.suspended:
            return None
        replaced = None
        for ext in self.extensions:
            new = ext.on_layer_forward_pre(module, replaced or args)
            if new is not None:
                replaced = new
        return replaced

    @guarded
    def on_layer_forward(self, module: nn.Module, output: Any) -> None:
        layer = self.watched.layer_of_module(module)
        if layer is None or self.suspended:
            return
        self.last_layer = layer
        info = self.history.layers[layer]
        if info.order is None:
            info.order = self._forward_counter
            self._forward_counter += 1
        if not torch.is_grad_enabled() or not self.cadence.is_detail(self.step) or \
                self._act_step.get(layer) == self.step:
            return
        # The layer's first call of the step: an RNN cell called once per timestep, or a
        # closure evaluated twenty times by LBFGS, is measured once, not per call.
        if self.measures.activation(self._row(), layer, output):
            self._act_step[layer] = self.step

    # ------------------------------------------------------------------ step boundary
    def _commit(self) -> None:
        """Close the current step: its loss, then weights/updates on sampled steps."""
        row = self._row()
        self.measures.loss(row, self._losses + self._step_losses)
        # Which optimizer made this step: separates models trained in one run (GANs,
        # scripts that train one model after another). A host number, written on device.
        self.buffers.optimizer[row] = self._stepping
        self.buffers.lr[row] = self._step_lr
        self._stepping, self._step_lr = -1, math.nan
        if self.cadence.is_detail(self.step):
            self.measures.updates(row)
        self.measures.drop_snapshot()
        self._losses, self._step_losses = [], []
        self._grads_taken = False
        self.own_tensors.clear()
        self.cadence.end_step(self.step, self.cadence.is_detail(self.step))
        self.step += 1
        if self.step % self.options.sync_every == 0:  # the same steps on every rank
            self.cadence.device = self.device
            self.cadence.propose(self.step)  # (distributed.py: the ranks take the max)
            started = time.perf_counter()
            self.flush()
            self.cadence.flushed(time.perf_counter() - started)
            self.cadence.apply(self.step)
            if self.watched.compact() is not None:
                # Models died (a sweep): their parameters' columns are dropped. The rows
                # were just flushed, so the buffers start afresh at their new width.
                self.buffers.buf = {}
                self.measures.drop_snapshot()
                self._grad_mark.clear()
        for listener in self.step_listeners:
            listener(self)

    def flush(self) -> None:
        """Copy the committed rows to the host in one transfer and append them to History."""
        copied = self.buffers.host_copy(self.step)
        if copied is None:
            return
        steps, arrays = copied
        self._each_extension(lambda ext: ext.on_rows(steps, arrays))  # (distributed.py)
        record_rows(self.history, self.buffers, steps, arrays, self.watched.slot_layer,
                    self.watched.slot_name, self.cadence.is_detail)
        for ext in self.extensions:
            ext.on_flush(steps, arrays)
        self.buffers.reset()
        self.buffers.start = self.step

    def snapshot(self) -> None:
        """Flush; the extensions write their end-of-run facts as they stand, so that the
        detectors can judge the run so far (which goes on unchanged)."""
        if self.finished is None and self.enabled:
            self.flush()
            self.watched.init_scales()
            self._each_extension(lambda ext: ext.on_snapshot())

    # ------------------------------------------------------------------ lifecycle
    def close(self, status: str = "completed", error: str | None = None) -> None:
        """Commit the last partial step, flush, and drop every reference to the model."""
        if self.finished is not None:
            return
        self.ending = (status, error)  # no flush from here on is a cadence flush
        try:
            if self.enabled and (self._losses or self._grads_taken) and self.mode != \
                    "optimizer":
                self._commit()
            if self.enabled:
                self.flush()
        except Exception as exc:
            self.fail(exc)
        # Extensions turn what they kept about each live model into facts (on_root_gone),
        # then finish; every reference to the user's objects is dropped after.
        self.watched.init_scales()
        self.watched.close()
        for ext in self.extensions:
            try:
                ext.finish()
            except Exception as exc:
                self.fail(exc)
        self.finished = time.perf_counter()
        self.status, self.error = status, error
        self.buffers.buf, self._losses, self._step_losses = {}, [], []
        self.measures.drop_snapshot()
        self._grad_mark.clear()
        self._probe_norms = None

    @property
    def duration(self) -> float:
        return (self.finished or time.perf_counter()) - self.started
