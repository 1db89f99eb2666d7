"""The measuring engine: step clock, device buffers, one host copy every ``sync_every`` steps.

Probes (``probes.py``) call the ``on_*`` methods; the monitor never registers a hook
itself. Everything measured on a step stays on the tensors' device in preallocated
buffers (one row per step); :meth:`Monitor.flush` copies all of them to the host in a
single transfer, aggregates parameters into layers and appends to :class:`History`.

A *step* is one ``optimizer.step()`` of a watched optimizer. Without optimizer it is one
``gw.step(loss)``, or, when the script updates parameters by hand, one ``backward()``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from ..history import History
from ..thresholds import Thresholds
from . import stats, structure
from .extension import Extension
from .layers import Watched

__all__ = ["Monitor", "Options"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Options:
    """How and how often to measure; see ``gradwatch.watch`` for the user-facing names."""

    sync_every: int = 64
    """Steps between host copies. One transfer per this many steps; 64 keeps the sync
    cost negligible on GPU and bounds the device buffers to 64 rows."""
    detail_every: int = 16
    """Weights, updates and activations are measured on steps 0-7 and every this many
    steps after (a snapshot of the weights costs a copy of them)."""
    every: int = 1
    """Gradient norms and loss are measured every this many steps."""
    capacity: int = 2048
    """Rows kept per series; longer runs are downsampled evenly."""
    strict: bool = False
    """Re-raise errors inside gradwatch instead of reporting them and going on."""
    probe_backwards: int = 64
    """Backward calls without any optimizer step and without any change of the weights
    before a run counts as hand-updated (a change of the weights decides at once)."""

    def __post_init__(self) -> None:
        for name in ("sync_every", "detail_every", "every", "probe_backwards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"option {name!r} must be an integer >= 1, got {value!r}")
        if not isinstance(self.capacity, int) or self.capacity < 16 or self.capacity % 2:
            raise ValueError(f"option 'capacity' must be an even integer >= 16, "
                             f"got {self.capacity!r}")
        if not isinstance(self.strict, bool):
            raise TypeError(f"option 'strict' must be True or False, got {self.strict!r}")


def guarded(method: F) -> F:
    """Run a hook body so that a failure inside gradwatch never breaks the user's run.

    Deaths of watched objects are handled first, so that no hook mistakes a new object
    for a dead one that had the same ``id``. Once measuring has stopped, only the step
    clock goes on (:meth:`Monitor.count_while_stopped`), so that the report still says
    how far the run went.
    """

    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Monitor, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            self.count_while_stopped(name)
            return None
        try:
            self.watched.reap()
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.fail(exc)
            if self.options.strict:
                raise
            return None

    return wrapper  # type: ignore[return-value]


class Monitor:
    """Accumulates per-step statistics on device and hands them to :class:`History`."""

    def __init__(self, options: Options | None = None,
                 thresholds: Thresholds | None = None, discover: bool = False,
                 extensions: Sequence[Extension] = ()) -> None:
        self.options = options or Options()
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
        self.error: str | None = None
        self.mode = "unknown"  # "optimizer" | "explicit" | "backward"
        self.step = 0  # the step being accumulated, not yet committed
        #: The thread that trains the watched model (where its forward or optimizer step
        #: last ran): a ``watch`` takes only the backward calls made in it.
        self.thread = threading.get_ident()
        self._graph_read = False
        self._graph_walks = (0, 0)  # (roots when last read, readings since a new root)
        self._graphed_roots: set[int] = set()
        self._forward_counter = 0
        self.root_forwards = 0  # forwards of the watched model seen by its own hook
        # device buffers
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_start = 0
        self._buf_p = 0
        self._buf_l = 0
        # per-step transient state
        self._losses: list[torch.Tensor] = []
        self._step_losses: list[torch.Tensor] = []  # losses of closures run inside step()
        self._in_step = 0
        self._grads_taken = False
        self._grad_mark: tuple[int, int, int] | None = None  # (slot, id, version) of a grad
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_idx: list[int] = []
        self._probe_norms: torch.Tensor | None = None
        self._probes = 0
        self._stepping = -1  # index of the optimizer whose step() is running
        self._step_lr = math.nan
        self._nan_grad = np.zeros((0, 0), dtype=bool)
        self._xshapes: dict[str, tuple[int, ...]] = {}  # extension buffers: per-row shape
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

    def count_while_stopped(self, event: str) -> None:
        """After an internal error: keep counting steps (nothing else) for the report."""
        if event == "on_step_begin":
            self._in_step += 1
        elif event == "on_step_end":
            self._in_step = max(0, self._in_step - 1)
            if not self._in_step:
                self.step += 1
        elif event == "on_explicit_step" and self.mode != "optimizer":
            self.step += 1
        elif event == "on_backward_end" and self.mode == "backward":
            self.step += 1

    @property
    def namer(self) -> Callable[[Any], str | None]:
        """Names roots and bare tensors (``gradwatch run``: the script's own variables)."""
        return self.watched.namer

    @namer.setter
    def namer(self, namer: Callable[[Any], str | None]) -> None:
        self.watched.namer = namer

    def add_root(self, module: nn.Module, name: str) -> None:
        """Track a top-level model: its parameter-owning modules become layers."""
        self.watched.reap()
        self.watched.add_root(module, name)

    def add_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Track parameters no tracked module owns: those of a model the script holds
        (``models_of``) are adopted with their model, the rest as bare tensors."""
        self.watched.reap()
        tensors = list(tensors)
        untracked = {id(t) for t in tensors if t.requires_grad and
                     not self.watched.tracks(t) and id(t) not in self.own_tensors}
        for name, module in self.models_of(untracked) if untracked else ():
            # Its forward was not seen, or it would be a root already: it runs compiled
            # (``model.compile()``) or only through its submodules.
            if self.watched.add_root(module, name) is not None:
                compiled = getattr(module, "_compiled_call_impl", None) is not None
                self._note_root(module, "compiled_roots" if compiled else "forward_unseen")
        self.watched.add_tensors(tensors, self.own_tensors)

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
        self._note_root(module, "compiled_roots")

    def _note_root(self, module: nn.Module, fact: str) -> None:
        index = self.watched.root_of_module(module)
        if index is not None:
            names = self.history.facts.setdefault(fact, [])
            if self.history.roots[index] not in names:
                names.append(self.history.roots[index])

    def _root_gone(self, root: int) -> None:
        for ext in self.extensions:
            try:
                ext.on_root_gone(root)
            except Exception as exc:
                self.fail(exc)
                if self.options.strict:
                    raise

    def module_name(self, module: nn.Module) -> str | None:
        """The module's path inside its root ("" for the root itself), None if not watched."""
        return self.watched.module_name(module)

    def layer_params(self, layer: int) -> list[torch.Tensor]:
        """The live parameters of one layer, in the order of its ``param_names``."""
        return self.watched.layer_params(layer)

    def root_of_module(self, module: nn.Module) -> int | None:
        return self.watched.root_of_module(module)

    def tracks(self, tensor: torch.Tensor) -> bool:
        return self.watched.tracks(tensor)

    def is_root(self, module: nn.Module) -> bool:
        return self.watched.is_root(module)

    @property
    def roots(self) -> list[nn.Module]:
        """The watched models that are still alive."""
        return [m for _, m in self.watched.live_roots()]

    def layer_of_module(self, module: nn.Module) -> int | None:
        return self.watched.layer_of_module(module)

    def owns_params_of(self, optimizer: torch.optim.Optimizer) -> bool:
        return self.watched.owns_params_of(optimizer)

    # ------------------------------------------------------------------ buffers
    def _ensure_buffers(self) -> None:
        n_p, n_l = self.watched.slots, len(self.history.layers)
        if self._buf and n_p == self._buf_p and n_l == self._buf_l:
            return
        device = self.device
        cap = self.options.sync_every
        carry = None
        if self._buf:
            # New parameters mid-run: flush committed rows, carry the current row over.
            r = self.step - self._buf_start
            carry = {k: v[r].clone() for k, v in self._buf.items()}
            carry_seen = self._loss_seen[r]
            self.flush()
        shapes = {"loss": (cap,), "grad": (cap, n_p),
                  "grad_applied": (cap, n_p), "weight": (cap, n_p), "update": (cap, n_p),
                  "act": (cap, n_l), "io": (cap, len(History.MODEL_IO))}
        shapes.update({k: (cap, *s) for k, s in self._xshapes.items()})
        self._buf = {k: torch.empty(s, dtype=torch.float64, device=device)
                     for k, s in shapes.items()}
        self._reset_buffers()
        self._buf_p, self._buf_l = n_p, n_l
        self._buf_start = self.step
        if carry is not None:
            for k, row in carry.items():
                if row.dim() == 0 or k in self._xshapes:
                    self._buf[k][0] = row
                else:
                    self._buf[k][0, : row.shape[0]] = row
            self._loss_seen[0] = carry_seen

    def _reset_buffers(self) -> None:
        for k, v in self._buf.items():
            v.fill_(_UNMEASURED if k in _NORM_KEYS else math.nan)
        # Host-side per-row facts (Python numbers already): no device work for them.
        self._loss_seen = [False] * self.options.sync_every
        self._row_optimizer = [-1] * self.options.sync_every
        self._row_lr = [math.nan] * self.options.sync_every

    def _row(self) -> int:
        self._ensure_buffers()
        return self.step - self._buf_start

    def row(self) -> int:
        """This step's row in every device buffer."""
        return self._row()

    def buffer(self, key: str) -> torch.Tensor:
        """A device buffer by key (look it up each time: buffers are re-allocated)."""
        self._ensure_buffers()
        return self._buf[key]

    def add_buffer(self, key: str, shape: tuple[int, ...]) -> None:
        """Register an extension's per-step device buffer: float64, NaN = not measured."""
        if key in self._xshapes:
            return
        self._xshapes[key] = tuple(shape)
        if self._buf:
            self._buf[key] = torch.full((self.options.sync_every, *shape), math.nan,
                                        dtype=torch.float64, device=self.device)

    @property
    def device(self) -> torch.device:
        """Where the statistics live: the device of the first watched parameter."""
        return self.watched.device or torch.device("cpu")

    def is_detail_step(self) -> bool:
        """Whether the step being accumulated measures weights and activations."""
        return self._is_detail(self.step)

    def _is_detail(self, step: int) -> bool:
        return step < 8 or step % self.options.detail_every == 0

    def _is_sampled(self, step: int) -> bool:
        return step % self.options.every == 0 or self._is_detail(step)

    # ------------------------------------------------------------------ measurements
    def _grad_row(self, key: str) -> None:
        """Write the norm of every tracked gradient into this step's row of ``key``."""
        grads = [None if p is None else p.grad for p in self.watched.params()]
        row = self._row()
        idx = [i for i, g in enumerate(grads) if g is None]
        if not idx:  # the common case: every parameter has a gradient
            self._buf[key][row].copy_(stats.norms(grads, self._buf[key].device))
            return
        idx = [i for i, g in enumerate(grads) if g is not None]
        if idx:
            values = stats.norms([grads[i] for i in idx], self._buf[key].device)
            self._buf[key][row].index_copy_(0, torch.tensor(idx, device=values.device), values)

    def _update_row(self) -> None:
        """Norm of each update, against the snapshot taken before the step."""
        if not self._snapshot:
            return
        row = self._row()
        device = self._buf["update"].device
        params = self.watched.params()
        current = [params[i] for i in self._snapshot_idx]
        if any(p is None for p in current):  # a model died within the step
            return
        # In place on the snapshot (old - new): no second copy of the weights.
        values = stats.norms(stats.subtract_(self._snapshot, [p.detach() for p in current]),
                             device)
        if len(self._snapshot_idx) == len(params):
            self._buf["update"][row].copy_(values)
        else:
            self._buf["update"][row].index_copy_(
                0, torch.tensor(self._snapshot_idx, device=device), values)

    def _take_snapshot(self) -> None:
        """Weight norms before the update, and a copy of the weights to diff against."""
        live = [(i, p) for i, p in enumerate(self.watched.params()) if p is not None]
        if not live:
            return
        row = self._row()
        params = [p.detach() for _, p in live]
        # Weights as they were for this step's forward/backward: the pair to its gradients.
        norms = stats.norms(params, self._buf["weight"].device)
        if len(live) == self.watched.slots:
            self._buf["weight"][row].copy_(norms)
        else:
            self._buf["weight"][row].index_copy_(
                0, torch.tensor([i for i, _ in live], device=norms.device), norms)
        chosen = [k for k, (_, p) in enumerate(live) if p.grad is not None] or \
            list(range(len(live)))
        idx = [live[k][0] for k in chosen]
        params = [params[k] for k in chosen]
        self._snapshot_idx = idx
        # One fused copy of the weights that are about to be updated (sampled steps only).
        self._snapshot = stats.copy(params)

    def _record_loss(self, losses: list[torch.Tensor]) -> None:
        if not losses:
            return
        row = self._row()
        vals = [loss.detach().reshape(()) if loss.numel() == 1 else
                loss.detach().float().mean() for loss in losses]
        value = vals[0] if len(vals) == 1 else torch.stack(
            [v.to(torch.float64) for v in vals]).mean()
        # copy_ converts dtype and device in one kernel, without a host sync.
        self._buf["loss"][row].copy_(value, non_blocking=True)
        self._loss_seen[row] = True

    # ------------------------------------------------------------------ events from probes
    @guarded
    def on_backward_begin(self, loss: torch.Tensor) -> None:
        """Before autograd runs: read the graph once; close a hand-made update."""
        # Read the graph once per model: at the first backward, and again when a model
        # appears that no graph has covered yet (scripts that train several in turn).
        if self._graph_pending() and isinstance(loss, torch.Tensor) and \
                loss.grad_fn is not None:
            self._graph_walks = (len(self.history.roots), self._graph_walks[1] + 1)
            graph = structure.walk_graph(loss)
            # Another watched model's loss says nothing about this model's structure.
            if graph is not None and (self.discover or any(
                    self.watched.tracks(p) for p in graph.leaves)):
                self._graph_read = True
                self._adopt_graph(graph)
        if self.mode == "backward" and self._losses:
            self._commit()
        elif self.mode == "unknown" and self._losses:
            self._probe_manual_update()
        elif self.mode == "optimizer" and self._losses and not self._in_step and \
                self._grads_reset():
            # The gradients of the losses taken so far were wiped (zero_grad) before any
            # step used them: they are not this step's losses. In a GAN loop, the
            # generator's loss flows back through the discriminator, whose optimizer then
            # zeroes it and steps on the discriminator's own loss.
            self._losses, self._grads_taken = [], False

    def _graph_pending(self) -> bool:
        """Whether to read this loss's graph: at the first backward, when a model has
        appeared since the last reading, and a few more times while a model is not yet
        covered (it may train later). Never every step: a model that is only evaluated
        (a teacher) would otherwise cost a graph walk per step."""
        if not self._graph_read:
            return True
        roots, walks = self._graph_walks
        if len(self.history.roots) > roots:
            self._graph_walks = (roots, 0)
            return True
        return len(self.history.roots) > len(self._graphed_roots) and walks < _GRAPH_RETRIES

    def _grads_reset(self) -> bool:
        """Whether the gradient seen at the last backward was set to None, replaced or
        changed in place (zeroed) since: host attributes only, no device work."""
        if self._grad_mark is None:
            return False
        slot, grad_id, version = self._grad_mark
        p = self.watched.param(slot)
        grad = p.grad if p is not None else None
        return grad is None or id(grad) != grad_id or grad._version != version

    def _mark_grads(self) -> None:
        """Remember one gradient as it stands after this backward (see _grads_reset)."""
        self._grad_mark = None
        for slot in range(self.watched.slots):
            p = self.watched.param(slot)
            if p is not None and p.grad is not None:
                self._grad_mark = (slot, id(p.grad), p.grad._version)
                return

    @guarded
    def on_backward_end(self, loss: torch.Tensor) -> None:
        """After autograd filled ``.grad``: raw (pre-clipping) gradient norms and the loss."""
        if self._in_step:
            # Closure inside optimizer.step() (LBFGS and friends): the first evaluation
            # is the loss and gradient at the step's starting point.
            if not self._grads_taken:
                self._step_losses.append(loss)
                if self._is_sampled(self.step):
                    self._grad_row("grad")
                self._grads_taken = True
            return
        if not self.discover and self.mode != "explicit":
            self._mark_grads()
            if self._grad_mark is None:
                # No watched parameter has a gradient: this backward trained another
                # model (one the watch cannot tell by its output), not this one.
                return
        self._losses.append(loss)
        if self._is_sampled(self.step):
            self._grad_row("grad")  # accumulation: the last call holds the summed gradients
        self._grads_taken = True
        if self.mode == "backward":
            if self._is_detail(self.step):
                self._take_snapshot()
        elif self.mode != "optimizer":
            self._probe_norms = self._weight_norms()
            if self._is_detail(self.step):
                self._take_snapshot()

    def _weight_norms(self) -> torch.Tensor | None:
        params = [p.detach() for p in self.watched.params() if p is not None]
        return stats.norms(params, self.device) if params else None

    def _probe_manual_update(self) -> None:
        """Second backward with no optimizer step in between: were weights changed by hand?"""
        before = self._probe_norms
        after = self._weight_norms()
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
        if self._is_detail(self.step):
            if self._grads_taken:
                # Gradients as the optimizer will apply them: after the user's clipping.
                self._grad_row("grad_applied")
            self._take_snapshot()

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
            self._losses = [loss]
        if self.mode == "optimizer":
            self._record_loss(self._losses)
            return
        self.mode = "explicit"
        if not self._grads_taken:
            self._grad_row("grad")
            self._grads_taken = True
        self._commit()
        if self._is_detail(self.step):
            self._take_snapshot()

    @guarded
    def on_root_forward_pre(self, module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any] | None = None) -> None:
        if self.suspended:
            return
        self.thread = threading.get_ident()
        for ext in self.extensions:
            ext.on_root_forward_pre(module, args, kwargs or {})
        if not torch.is_grad_enabled() or not self._is_detail(self.step):
            return
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or not x.is_floating_point() or x.numel() == 0:
            return
        xd = x.detach().to(torch.float64)
        row = self._row()
        io = self._buf["io"]
        io[row, 1] = xd.pow(2).mean().sqrt().to(io.device)
        io[row, 2] = xd.mean().to(io.device)
        io[row, 3] = (xd.std() if xd.numel() > 1 else torch.zeros((), dtype=xd.dtype)
                      ).to(io.device)

    @guarded
    def on_root_forward(self, module: nn.Module, output: Any,
                        args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                        ) -> None:
        if self.suspended:
            return
        for ext in self.extensions:
            ext.on_root_forward(module, args, kwargs or {}, output)
        if not torch.is_grad_enabled() or not self._is_detail(self.step):
            return
        out = _first_tensor(output)
        if out is None or not out.is_floating_point():
            return
        row = self._row()
        io = self._buf["io"]
        io[row, 0] = stats.output_spread(out).to(io.device)
        io[row, 4] = stats.rms(out).to(io.device)

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
        if not torch.is_grad_enabled() or not self._is_detail(self.step) or \
                self._act_step.get(layer) == self.step:
            return
        out = _first_tensor(output)
        if out is None or not out.is_floating_point():
            return
        # The layer's first call of the step: an RNN cell called once per timestep, or a
        # closure evaluated twenty times by LBFGS, is measured once, not per call.
        self._act_step[layer] = self.step
        row = self._row()
        self._buf["act"][row, layer] = stats.rms(out).to(self._buf["act"].device)

    def _adopt_graph(self, graph: structure.GraphFacts) -> None:
        """Use a loss's graph: bare parameters, activation after each layer, structure."""
        if self.discover:
            self.add_tensors(graph.leaves)
        n = len(graph.leaves)
        roots: set[int] = set()
        for k, p in enumerate(graph.leaves):
            i = self.watched.slot(p)
            if i is None:
                continue
            layer = self.history.layers[self.watched.slot_layer[i]]
            roots.add(layer.root)
            if p.dim() >= 2 or layer.activation is None:
                layer.activation = graph.act_after.get(id(p), "none")
            if layer.order is None and layer.type == "Tensor":
                layer.order = 10_000 + (n - k)  # graph order: output side first
            if layer.type == "Tensor" and id(p) in graph.in_out_weights:
                # Bare ``x @ W``: W is (in, out), the reverse of nn.Linear's layout.
                layer.fan_in, layer.fan_out = int(p.shape[0]), int(p.shape[1])
        facts = {"activations": dict(graph.activations), "norm_ops": graph.norm_ops,
                 "branch_merges": graph.branch_merges, "recurrent_ops": graph.recurrent_ops,
                 "graph_nodes": graph.nodes}
        per_root = self.history.facts.setdefault("graph", {})
        for r in roots - self._graphed_roots:
            per_root[str(r)] = facts
        self._graphed_roots |= roots

    # ------------------------------------------------------------------ step boundary
    def _commit(self) -> None:
        """Close the current step: its loss, then weights/updates on sampled steps."""
        self._ensure_buffers()
        losses = self._losses or self._step_losses
        self._record_loss(losses)
        row = self._row()
        # Which optimizer made this step: separates models trained in one run (GANs,
        # scripts that train one model after another). A host number, written on device.
        self._row_optimizer[row] = self._stepping
        self._row_lr[row] = self._step_lr
        self._stepping, self._step_lr = -1, math.nan
        if self._is_detail(self.step):
            self._update_row()
        self._snapshot = None
        self._losses, self._step_losses = [], []
        self._grads_taken = False
        self.own_tensors.clear()
        self.step += 1
        if self.step - self._buf_start >= self.options.sync_every:
            self.flush()
            if self.watched.compact() is not None:
                # Models died (a sweep): their parameters' columns are dropped. The rows
                # were just flushed, so the buffers start afresh at their new width.
                self._buf = {}
                self._snapshot, self._grad_mark = None, None
        for listener in self.step_listeners:
            listener(self)

    def flush(self) -> None:
        """Copy the committed rows to the host in one transfer and append them to History."""
        if not self._buf:
            return
        n = self.step - self._buf_start
        if n <= 0:
            return
        keys = list(self._buf)
        parts = [self._buf[k][:n].reshape(-1) for k in keys]
        # The one host synchronisation: all statistics of n steps in a single copy.
        host = torch.cat(parts).cpu().numpy()
        arrays: dict[str, np.ndarray] = {}
        offset = 0
        for k in keys:
            shape = (n, *tuple(self._buf[k].shape[1:]))
            size = int(np.prod(shape))
            arrays[k] = host[offset: offset + size].reshape(shape)
            offset += size
        steps = np.arange(self._buf_start, self._buf_start + n)
        self._append(steps, arrays)
        self._reset_buffers()
        self._buf_start = self.step

    def _append(self, steps: np.ndarray, a: dict[str, np.ndarray]) -> None:
        n_l = len(self.history.layers)
        owners = np.asarray(self.watched.slot_layer[: a["grad"].shape[1]], dtype=np.int64)
        self._nan_grad = np.isnan(a["grad"])
        bad = {k: _decode_norms(a, k) for k in _NORM_KEYS}
        bad_g, bad_w = bad["grad"], bad["weight"]
        grad_layer = _layer_norms(a["grad"], owners, n_l)
        nonfinite = np.zeros((len(steps), n_l))
        np.add.at(nonfinite.T, owners, (bad_g | bad_w).T.astype(float))
        self._note_nonfinite(steps, bad_g, bad_w, a)
        self.history.record_steps(steps, a["loss"], np.array(self._loss_seen[: len(steps)]),
                                  grad_layer, nonfinite,
                                  np.array(self._row_optimizer[: len(steps)], dtype=float),
                                  np.array(self._row_lr[: len(steps)], dtype=float))
        detail = np.array([self._is_detail(int(s)) for s in steps])
        if detail.any():
            d = np.nonzero(detail)[0]
            self.history.record_detail(steps[d], {
                "weight_norm": _layer_norms(a["weight"][d], owners, n_l),
                "update_norm": _layer_norms(a["update"][d], owners, n_l),
                "grad_norm_applied": _layer_norms(a["grad_applied"][d], owners, n_l),
                "act_rms": a["act"][d],
                "model_io": a["io"][d],
            })
        for ext in self.extensions:
            ext.on_flush(steps, a)

    def _note_nonfinite(self, steps: np.ndarray, bad_g: np.ndarray, bad_w: np.ndarray,
                        a: dict[str, np.ndarray]) -> None:
        ev = self.history.events
        names = self.param_names()
        if ev.first_nonfinite_grad is None and bad_g.any():
            r = int(np.nonzero(bad_g.any(axis=1))[0][0])
            ev.first_nonfinite_grad = int(steps[r])
            cols = np.nonzero(bad_g[r])[0]
            ev.nonfinite_grad_params = [names[c] for c in cols]
            ev.nonfinite_grad_kind = "nan" if self._nan_grad[r, cols].any() else "inf"
        if ev.first_nonfinite_weight is None and bad_w.any():
            r = int(np.nonzero(bad_w.any(axis=1))[0][0])
            ev.first_nonfinite_weight = int(steps[r])
            ev.nonfinite_weight_params = [names[c] for c in np.nonzero(bad_w[r])[0]]
        bad_a = np.isinf(a["act"])
        if ev.first_nonfinite_act is None and bad_a.any():
            r = int(np.nonzero(bad_a.any(axis=1))[0][0])
            ev.first_nonfinite_act = int(steps[r])
            ev.nonfinite_act_layers = [self.history.layers[c].name
                                       for c in np.nonzero(bad_a[r])[0]]

    def param_names(self) -> list[str]:
        """The name of each parameter slot (the columns of the gradient buffers)."""
        return self.watched.slot_name

    # ------------------------------------------------------------------ lifecycle
    def close(self, status: str = "completed", error: str | None = None) -> None:
        """Commit the last partial step, flush, and drop every reference to the model."""
        if self.finished is not None:
            return
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
        self._buf, self._snapshot, self._losses, self._step_losses = {}, None, [], []
        self._probe_norms, self._grad_mark = None, None

    @property
    def duration(self) -> float:
        return (self.finished or time.perf_counter()) - self.started


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(output, dict):
        for o in output.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


_GRAPH_RETRIES = 8
"""Graph readings, after a new model appeared, while some model is not yet covered."""
_NORM_KEYS = ("grad", "grad_applied", "weight", "update", "act")
_UNMEASURED = -1.0  # norms are >= 0, so -1 marks "not measured" on device, NaN stays NaN


def _decode_norms(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    """Turn device encoding into host encoding, in place; return the non-finite mask.

    On device a norm buffer holds -1 where nothing was measured, so that a measured NaN
    (a NaN in the tensor) stays distinguishable. On the host NaN means "not measured" and
    +inf means "measured, non-finite" (NaN or Inf in the tensor), which plots and
    reductions handle without a separate mask.
    """
    a = arrays[key]
    bad = ~np.isfinite(a)
    a[bad] = np.inf
    a[a == _UNMEASURED] = np.nan
    return bad


def _layer_norms(values: np.ndarray, owners: np.ndarray, n_layers: int) -> np.ndarray:
    """Per-parameter norms -> per-layer norms (root of the sum of squares); NaN if unmeasured."""
    out = np.zeros((values.shape[0], n_layers))
    seen = np.zeros((values.shape[0], n_layers), dtype=bool)
    finite = ~np.isnan(values)
    np.add.at(out.T, owners, np.where(finite, values, 0.0).T ** 2)
    np.logical_or.at(seen.T, owners, finite.T)
    out = np.sqrt(out)
    out[~seen] = np.nan
    return out
