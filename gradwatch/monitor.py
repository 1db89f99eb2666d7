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
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from . import stats, structure
from .history import History, LayerInfo
from .thresholds import Thresholds

__all__ = ["Extension", "Monitor", "Options"]

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


class Extension:
    """A measurement that plugs into the monitor's forward events, step clock and flush.

    Forward-side statistics (activation sites, recurrent gradients through time, eval-mode
    checks) are extensions, so that the monitor stays one engine with one host copy: an
    extension registers per-step device buffers with :meth:`Monitor.add_buffer`, writes its
    row (``monitor.row()``) on device, and reads the rows back in :meth:`on_flush`. Every
    method is called inside the monitor's guard: an exception disables measuring, never
    the user's run. The base class does nothing, so an extension overrides only what it
    needs.
    """

    monitor: Monitor

    def bind(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def on_root_forward_pre(self, module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> None:
        """A watched model's forward starts (with or without grad)."""

    def on_root_forward(self, module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any], output: Any) -> None:
        """A watched model's forward returned (``output`` is None when it raised)."""

    def wants_layer_pre(self, module: nn.Module) -> bool:
        """Whether :meth:`on_layer_forward_pre` must see this layer's forward."""
        return False

    def on_layer_forward_pre(self, module: nn.Module, args: tuple[Any, ...]
                             ) -> tuple[Any, ...] | None:
        """A layer's forward starts; may return replacement positional arguments."""
        return None

    def on_flush(self, steps: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Committed rows of every buffer, on the host (extension buffers included)."""

    def finish(self) -> None:
        """The watch closes; model references are still alive here, gone after."""


def guarded(method: F) -> F:
    """Run a hook body so that a failure inside gradwatch never breaks the user's run."""

    @functools.wraps(method)
    def wrapper(self: Monitor, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        try:
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
                 thresholds: Thresholds | None = None, discover: bool = False) -> None:
        self.options = options or Options()
        self.discover = discover  # adopt bare tensors found in the graph (gradwatch run)
        self.namer: Callable[[Any], str | None] = lambda obj: None
        self.thresholds = thresholds or Thresholds()
        self.history = History(self.options.capacity)
        self.enabled = True
        self.errors: list[str] = []
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.status = "running"
        self.error: str | None = None
        self.mode = "unknown"  # "optimizer" | "explicit" | "backward"
        self.step = 0  # the step being accumulated, not yet committed
        self.optimizers: list[torch.optim.Optimizer] = []
        self.graph: structure.GraphFacts | None = None
        self._graphed_roots: set[int] = set()
        # parameters, layers and roots (strong references only while watching)
        self._params: list[torch.Tensor] = []
        self._param_index: dict[int, int] = {}
        self._param_layer: list[int] = []
        self._module_layer: dict[int, int] = {}
        self._roots: list[nn.Module] = []
        self._root_index: dict[int, int] = {}
        self._forward_counter = 0
        self.root_forwards = 0  # forwards of the watched model seen by its own hook
        # device buffers
        self._device: torch.device | None = None
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_start = 0
        self._buf_p = 0
        self._buf_l = 0
        # per-step transient state
        self._losses: list[torch.Tensor] = []
        self._step_losses: list[torch.Tensor] = []  # losses of closures run inside step()
        self._in_step = 0
        self._grads_taken = False
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_idx: list[int] = []
        self._probe_norms: torch.Tensor | None = None
        self._probes = 0
        self._stepping = -1  # index of the optimizer whose step() is running
        self._step_lr = math.nan
        self._nan_grad = np.zeros((0, 0), dtype=bool)
        self._xshapes: dict[str, tuple[int, ...]] = {}  # extension buffers: per-row shape
        self._module_names: dict[int, str] = {}  # every module of every root -> its path
        self.last_layer = -1  # the layer whose forward ran last (feeds the next activation)
        self.suspended = 0  # > 0 while gradwatch itself runs the model: hooks do nothing
        # ids of tensors gradwatch made this step (input probes): never adopted as bare
        # parameters when the graph is read; cleared at each step boundary
        self.own_tensors: set[int] = set()
        #: Called with the monitor after each step is closed (``--verify`` re-runs stop a
        #: script there after their step budget).
        self.step_listeners: list[Callable[[Monitor], None]] = []
        self.extensions: list[Extension] = []
        # forward-side extensions (they import this module)
        from . import activations, evalmode, recurrent

        for ext in (activations.ActivationSites(), evalmode.EvalModeCheck(),
                    recurrent.RecurrentGradients()):
            self.add_extension(ext)

    # ------------------------------------------------------------------ registration
    def fail(self, exc: BaseException) -> None:
        """Record an internal error and stop measuring; the user's run goes on."""
        self.errors.append("".join(traceback.format_exception_only(type(exc), exc)).strip())
        self.enabled = False

    def add_root(self, module: nn.Module, name: str) -> None:
        """Track a top-level model: its parameter-owning modules become layers."""
        if id(module) in self._root_index:
            return
        root = len(self._roots)
        self._root_index[id(module)] = root
        self._roots.append(module)
        self.history.roots.append(name)
        for mod_name, mod in module.named_modules():
            self._module_names.setdefault(id(mod), mod_name)
            # Lazy modules' parameters have no shape until their first forward: not tracked.
            own = [(n, p) for n, p in mod.named_parameters(recurse=False)
                   if p.requires_grad and not nn.parameter.is_lazy(p)]
            own = [(n, p) for n, p in own if id(p) not in self._param_index]
            if not own:
                continue
            self._add_layer(mod_name, type(mod).__name__, root, own, id(mod))

    def add_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Track parameters that no tracked module owns (bare tensors, optimizer-only)."""
        for t in tensors:
            if not t.requires_grad or id(t) in self._param_index or \
                    id(t) in self.own_tensors or nn.parameter.is_lazy(t):
                continue
            name = self.namer(t) or f"tensor{len(self._params)}"
            self._add_layer(name, "Tensor", -1, [("", t)], None)

    def _add_layer(self, name: str, type_name: str, root: int,
                   params: list[tuple[str, torch.Tensor]], module_id: int | None) -> None:
        weight = next((p for _, p in params if p.dim() >= 2), None)
        info = LayerInfo(name=name, type=type_name, root=root,
                         params=sum(p.numel() for _, p in params),
                         param_names=[f"{name}.{n}" if name and n else (name or n)
                                      for n, _ in params])
        if weight is not None:
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
            info.fan_in, info.fan_out = fan_in, fan_out
            with torch.no_grad():
                info.init_weight_std = float(weight.detach().float().std()) \
                    if weight.numel() > 1 else None
        layer = self.history.add_layer(info)
        if module_id is not None:
            self._module_layer[module_id] = layer
        for _, p in params:
            self._param_index[id(p)] = len(self._params)
            self._params.append(p)
            self._param_layer.append(layer)
            if self._device is None:
                self._device = p.device

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Track an optimizer's settings; True if it was not tracked before."""
        if any(o is optimizer for o in self.optimizers):
            return False
        self.optimizers.append(optimizer)
        self.history.facts.setdefault("optimizers", []).append(_optimizer_facts(optimizer))
        return True

    def add_extension(self, extension: Extension) -> None:
        extension.bind(self)
        self.extensions.append(extension)

    def module_name(self, module: nn.Module) -> str | None:
        """The module's path inside its root ("" for the root itself), None if not watched."""
        return self._module_names.get(id(module))

    def layer_params(self, layer: int) -> list[torch.Tensor]:
        """The tracked parameters of one layer, in the order of its ``param_names``."""
        return [p for p, owner in zip(self._params, self._param_layer, strict=True)
                if owner == layer]

    def root_of_module(self, module: nn.Module) -> int | None:
        return self._root_index.get(id(module))

    def tracks(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._param_index

    def is_root(self, module: nn.Module) -> bool:
        return id(module) in self._root_index

    @property
    def roots(self) -> list[nn.Module]:
        return list(self._roots)

    def layer_of_module(self, module: nn.Module) -> int | None:
        return self._module_layer.get(id(module))

    def owns_params_of(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self._param_index
                   for g in optimizer.param_groups for p in g["params"])

    # ------------------------------------------------------------------ buffers
    def _ensure_buffers(self) -> None:
        n_p, n_l = len(self._params), len(self.history.layers)
        if self._buf and n_p == self._buf_p and n_l == self._buf_l:
            return
        device = self._device or torch.device("cpu")
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
        return self._device or torch.device("cpu")

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
        grads = [p.grad for p in self._params]
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
        current = [self._params[i].detach() for i in self._snapshot_idx]
        # In place on the snapshot (old - new): no second copy of the weights.
        values = stats.norms(stats.subtract_(self._snapshot, current), device)
        if len(self._snapshot_idx) == len(self._params):
            self._buf["update"][row].copy_(values)
        else:
            self._buf["update"][row].index_copy_(
                0, torch.tensor(self._snapshot_idx, device=device), values)

    def _take_snapshot(self) -> None:
        """Weight norms before the update, and a copy of the weights to diff against."""
        if not self._params:
            return
        row = self._row()
        params = [p.detach() for p in self._params]
        # Weights as they were for this step's forward/backward: the pair to its gradients.
        self._buf["weight"][row].copy_(stats.norms(params, self._buf["weight"].device))
        idx = [i for i, p in enumerate(self._params) if p.grad is not None] or \
            list(range(len(self._params)))
        self._snapshot_idx = idx
        # One fused copy of the weights that are about to be updated (sampled steps only).
        self._snapshot = stats.copy([params[i] for i in idx])

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
        pending = len(self._roots) > len(self._graphed_roots) or self.graph is None
        if pending and isinstance(loss, torch.Tensor) and loss.grad_fn is not None:
            graph = structure.walk_graph(loss)
            # Another watched model's loss says nothing about this model's structure.
            if graph is not None and (self.discover or any(
                    id(p) in self._param_index for p in graph.leaves)):
                self.graph = graph
                self._adopt_graph(graph)
        if self.mode == "backward" and self._losses:
            self._commit()
        elif self.mode == "unknown" and self._losses:
            self._probe_manual_update()

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
        self._losses.append(loss)
        if self._is_sampled(self.step):
            self._grad_row("grad")  # accumulation: the last call holds the summed gradients
        self._grads_taken = True
        if self.mode == "backward":
            if self._is_detail(self.step):
                self._take_snapshot()
        elif self.mode == "unknown":
            self._probe_norms = stats.norms([p.detach() for p in self._params], self._device
                                            or torch.device("cpu"))
            if self._is_detail(self.step):
                self._take_snapshot()

    def _probe_manual_update(self) -> None:
        """Second backward with no optimizer step in between: were weights changed by hand?"""
        before = self._probe_norms
        after = stats.norms([p.detach() for p in self._params], self._device
                            or torch.device("cpu"))
        self._probes += 1
        # One host sync, only during the first few backward calls of a run.
        changed = before is not None and before.shape == after.shape and \
            bool((before != after).any())
        if (changed and not self.optimizers) or self._probes >= self.options.probe_backwards:
            self.mode = "backward"
            self._commit()

    @guarded
    def on_step_begin(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` starts: applied (post-clipping) gradients, weight snapshot."""
        self.mode = "optimizer"
        self._in_step += 1
        if self._in_step > 1:
            return
        self._stepping = next((k for k, o in enumerate(self.optimizers) if o is optimizer), -1)
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
        """Whether some extension needs a forward pre-hook on this layer."""
        return any(ext.wants_layer_pre(module) for ext in self.extensions)

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
        layer = self._module_layer.get(id(module))
        if layer is None or self.suspended:
            return
        self.last_layer = layer
        info = self.history.layers[layer]
        if info.order is None:
            info.order = self._forward_counter
            self._forward_counter += 1
        if not torch.is_grad_enabled() or not self._is_detail(self.step):
            return
        out = _first_tensor(output)
        if out is None or not out.is_floating_point():
            return
        row = self._row()
        self._buf["act"][row, layer] = stats.rms(out).to(self._buf["act"].device)

    def _adopt_graph(self, graph: structure.GraphFacts) -> None:
        """Use a loss's graph: bare parameters, activation after each layer, structure."""
        if self.discover:
            self.add_tensors(graph.leaves)
        n = len(graph.leaves)
        roots: set[int] = set()
        for k, p in enumerate(graph.leaves):
            i = self._param_index.get(id(p))
            if i is None:
                continue
            layer = self.history.layers[self._param_layer[i]]
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
        self._graphed_roots |= roots | {r for r in range(len(self._roots))
                                        if r in roots}

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
        owners = np.asarray(self._param_layer[: a["grad"].shape[1]], dtype=np.int64)
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
        out: list[str] = []
        for layer in self.history.layers:
            out.extend(layer.param_names)
        # param_names are registered in the same order as parameters
        return out

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
        for ext in self.extensions:
            try:
                ext.finish()
            except Exception as exc:
                self.fail(exc)
        self.finished = time.perf_counter()
        self.status, self.error = status, error
        self._init_scales()
        self.history.facts["optimizer_roots"] = [
            sorted({self.history.layers[self._param_layer[self._param_index[id(p)]]].root
                    for g in o.param_groups for p in g["params"] if id(p) in self._param_index})
            for o in self.optimizers]
        self.history.facts["module"] = {str(r): structure.module_facts([m])
                                        for r, m in enumerate(self._roots)}
        self._params, self._roots, self.optimizers = [], [], []
        self._param_index, self._module_layer, self._root_index = {}, {}, {}
        self._module_names = {}
        self._buf, self._snapshot, self._losses, self._step_losses = {}, None, [], []
        self._probe_norms = None
        self.graph = None

    def _init_scales(self) -> None:
        """Each layer's initial weight std against the init its activation calls for."""
        for layer in self.history.layers:
            if layer.init_weight_std is None or not layer.fan_in:
                continue
            act = layer.activation
            family = structure.recommended_init(act)
            gain = structure.activation_gain(act)
            target = gain / math.sqrt(layer.fan_in) if family == "kaiming" else \
                gain * math.sqrt(2.0 / (layer.fan_in + (layer.fan_out or 0)))
            layer.init_scale = {"std": layer.init_weight_std, "recommended_std": target,
                                "ratio": layer.init_weight_std / target, "family": family,
                                "activation": act or "unknown"}

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


def _optimizer_facts(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    groups = []
    for g in optimizer.param_groups:
        lr = g.get("lr")
        groups.append({"lr": float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None,
                       "momentum": g.get("momentum", g.get("betas")),
                       "weight_decay": g.get("weight_decay"),
                       "params": sum(p.numel() for p in g["params"])})
    return {"type": type(optimizer).__name__, "groups": groups}
