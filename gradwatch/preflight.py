"""Preflight: predict vanishing/exploding gradients, dead ReLUs and saturation before training.

``gradwatch.preflight(model, example_batch)`` runs ONE forward and ONE backward pass on the
model as it is now (at init) and measures, per layer with parameters (forward order): the
RMS of its output and the gain from layer to layer, the gradient norm of its parameters,
and the gradient norm at its output, so the backward gain through each layer is known.
Every ReLU / sigmoid / tanh call of the forward (modules and functional calls alike,
``nn.ReLU``, ``F.relu``, ``x.relu_()``...) is measured as an activation site: its dead
units and saturated outputs. From these it predicts ``vanishing_gradient``,
``exploding_gradient``, ``dying_relu``, ``saturated_activation`` (and ``nonfinite``), with
the init that would fix them, in the report contract of DESIGN.md (``run.mode`` is
``"preflight"``, ``run.steps`` 0, and ``preflight`` holds the per-layer and per-site tables).

What runs, exactly:

* the model runs in the mode it is in (a fresh model is in training mode, which is what
  the first training step sees: Dropout active, BatchNorm on batch statistics);
* without ``loss_fn`` the backward pass starts from a random unit-variance gradient
  (``N(0, 1)``, fixed seed) on every floating output that requires grad, so the per-layer
  gains say what the architecture and init do to any gradient; with ``loss_fn``,
  ``example_batch`` is ``(inputs, target)`` and the gradient is that of
  ``loss_fn(output, target)``;
* gradients come from ``torch.autograd.grad``: no ``.grad`` of the model is written.

Nothing of the model changes: buffers (BatchNorm running statistics) are restored from a
copy, every module's training flag and every ``requires_grad`` flag are put back, the
torch (CPU and CUDA), Python and numpy random states are restored, and every hook is
removed, also when the forward raises. Parameters are never written; a forward that
modifies them in place is an error. Plain Python attributes a forward sets on modules
(caches) cannot be restored.
"""

from __future__ import annotations

import dataclasses
import math
import random
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import stats
from ._version import __version__
from .detectors.context import fmt
from .findings import Cause, Finding, Remedy, jsonable
from .remedies import remedy
from .report import SCHEMA, Report
from .structure import init_scale, walk_graph
from .thresholds import Thresholds, resolve_thresholds

__all__ = ["PreflightReport", "load_factory", "preflight", "resolve_factory_result"]

# --- preflight thresholds (to move into Thresholds) ------------------------------------------
# The gradient-flow limits come from Thresholds (vanishing_ratio, vanishing_ratio_error,
# exploding_depth_ratio, exploding_error_factor, init_scale_low/high, forward_overflow,
# forward_shrink_per_layer, input_scale_high, deep_stack_layers, min_layers); these are the
# preflight's own.
DEAD_FRACTION = 0.5
"""Fraction of a ReLU site's units dead at init above this: dying_relu (warning); a site
whose every unit is dead passes no gradient at all: error."""
DEAD_MIN_VALUES = 8
"""A unit is judged only with at least this many values in the batch (samples x positions): a
healthy unit is zero on all of n values with probability about 2^-n."""
SATURATION_MARGIN = 0.01
"""An output within this fraction of the activation's range from a bound is saturated
(sigmoid < 0.01 or > 0.99, |tanh| > 0.98): its slope is a few % of the maximum."""
SATURATED_FRACTION = 0.5
"""Fraction of a site's outputs saturated at init above this: saturated_activation."""
SATURATED_FRACTION_ERROR = 0.9
"""... at or above this: severity error."""
FORWARD_GROWTH = 1e3
"""Largest layer-output RMS / model-input RMS above this at init: the forward signal
explodes (error above this times ``exploding_error_factor``)."""
BIAS_REVIVE_FRACTION = 0.5
"""Negative bias is the cause of dead units when at least this fraction of them would be
alive with a zero bias (measured on the same batch)."""
# --------------------------------------------------------------------------------------------

_KIND: dict[Any, str] = {
    F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu",
    torch.Tensor.relu: "relu", torch.Tensor.relu_: "relu", F.relu6: "relu6",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
    torch.Tensor.sigmoid_: "sigmoid", F.sigmoid: "sigmoid", torch.special.expit: "sigmoid",
    torch.tanh: "tanh", torch.tanh_: "tanh", torch.Tensor.tanh: "tanh",
    torch.Tensor.tanh_: "tanh", F.tanh: "tanh", F.hardtanh: "hardtanh",
    F.hardtanh_: "hardtanh", F.softsign: "softsign", F.hardsigmoid: "hardsigmoid"}
_RELU_KINDS = ("relu", "relu6")
_BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0),
           "hardsigmoid": (0.0, 1.0)}
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign,
                nn.Hardsigmoid)
_CHANNEL_LAYERS = ("Conv", "BatchNorm", "GroupNorm", "InstanceNorm", "LazyConv")
_RELU_LIKE = ("relu", "leaky_relu", "elu", "gelu", "silu", "prelu", "mish", "hardswish")


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested tuple/list/dict, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


def _first_float(obj: Any) -> torch.Tensor | None:
    return next((t for t in _tensors(obj) if t.is_floating_point()), None)


def _label(name: str) -> str:
    """``layer 0`` for an nn.Sequential index, so that a bare number reads as a layer."""
    return f"layer {name}" if name.replace(".", "").isdigit() else name


# ---------------------------------------------------------------------------------- measure
@dataclasses.dataclass
class _Layer:
    """A module that owns trainable parameters, and what one forward/backward showed."""

    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]
    order: int | None = None
    out: list[tuple[torch.Tensor, int, torch.Tensor]] = dataclasses.field(default_factory=list)
    out_grad: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def weight(self) -> nn.Parameter | None:
        return next((p for _, p in self.params if p.dim() >= 2), None)

    @property
    def bias(self) -> nn.Parameter | None:
        return next((p for n, p in self.params if n == "bias" and p.dim() == 1), None)


@dataclasses.dataclass
class _Site:
    """One activation call of the forward."""

    name: str
    kind: str
    module: str
    functional: bool
    layer: int | None  # the parameter layer that ran last before it (feeds it)
    units: int
    unit_dim: int
    values_per_unit: int
    stats: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]


class _Spy(TorchFunctionMode):
    """Passes every torch call through; activation calls are measured on the way."""

    def __init__(self, probe: _Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            kind = _KIND.get(func)
        except TypeError:  # an unhashable callable
            kind = None
        if kind is None:
            return func(*args, **kwargs)
        return self.probe.activation(func, kind, args, kwargs)


class _Probe:
    """Hooks for one forward/backward: a module stack, layer outputs, activation sites."""

    def __init__(self, model: nn.Module) -> None:
        root = type(model).__name__
        self.names = {id(m): name or root for name, m in model.named_modules()}
        self.layers: list[_Layer] = []
        self.index: dict[int, int] = {}
        seen: set[int] = set()
        for name, m in model.named_modules():
            own = [(n, p) for n, p in m.named_parameters(recurse=False)
                   if p.requires_grad and id(p) not in seen]
            if own:
                seen.update(id(p) for _, p in own)
                self.index[id(m)] = len(self.layers)
                self.layers.append(_Layer(name or root, m, own))
        self.stack: list[nn.Module] = []
        self.sites: list[_Site] = []
        self.counts: dict[tuple[int, str], int] = {}
        self.ran = 0
        self.last_layer: int | None = None
        self.last_output: torch.Tensor | None = None
        self.handles: list[Any] = []
        self.model = model

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Module hooks for the whole preflight; removed whatever happens."""
        try:
            for m in self.model.modules():
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post, always_call=True))
            yield
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()
            self.last_output = None

    def _pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        idx = self.index.get(id(module))
        if idx is None or output is None:
            return
        layer = self.layers[idx]
        if layer.order is None:
            layer.order, self.ran = self.ran, self.ran + 1
        out = _first_float(output)
        self.last_layer, self.last_output = idx, out
        if out is None or out.numel() == 0:
            return
        with torch.no_grad():
            layer.out.append((stats.rms(out), out.numel(),
                              (~torch.isfinite(out.detach())).sum()))
        if out.requires_grad:
            def grad_hook(g: torch.Tensor, layer: _Layer = layer) -> None:
                layer.out_grad.append(torch.linalg.vector_norm(g.detach(),
                                                               dtype=torch.float64))
            self.handles.append(out.register_hook(grad_hook))

    # --------------------------------------------------------------------- activations
    def activation(self, func: Any, kind: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 \
                or x.numel() == 0:
            return func(*args, **kwargs)
        bounds = _BOUNDS.get(kind)
        if kind == "hardtanh":
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            bounds = (float(lo), float(hi))
            if bounds == (0.0, 6.0):  # nn.ReLU6 calls F.hardtanh(x, 0, 6): a ReLU
                kind = "relu6"
        module = self.stack[-1] if self.stack else None
        feeding = self.last_layer
        ftype = type(self.layers[feeding].module).__name__ if feeding is not None else ""
        # Channels of a conv output (N, C, ...), features of anything else (..., F).
        unit_dim = 1 if x.dim() >= 4 or (x.dim() == 3 and ftype.startswith(_CHANNEL_LAYERS)) \
            else x.dim() - 1
        red = tuple(d for d in range(x.dim()) if d != unit_dim)
        units = int(x.shape[unit_dim])
        xd = x.detach()
        with torch.no_grad():  # taken before an in-place call overwrites the input
            # float64 reductions without a float64 copy of the activation
            n = xd.numel()
            rms = torch.linalg.vector_norm(xd, dtype=torch.float64) / math.sqrt(n)
            mean = xd.mean(dtype=torch.float64)
            var = (rms.square() - mean.square()).clamp(min=0) * (n / max(1, n - 1))
            st = {"pre_mean": mean, "pre_std": var.sqrt(), "pre_rms": rms}
            masks: dict[str, torch.Tensor] = {}
            if kind in _RELU_KINDS:
                # relu(x) == 0 exactly where x <= 0: a unit whose largest input over the
                # batch is <= 0 outputs 0 for every sample and passes no gradient.
                dead = xd.amax(dim=red) <= 0
                masks["dead"] = dead
                st["dead_fraction"] = dead.double().mean()
                bias = self.layers[feeding].bias if feeding is not None else None
                if bias is not None and x is self.last_output and bias.numel() == units:
                    shape = [1] * x.dim()
                    shape[unit_dim] = units
                    masks["revived"] = dead & ((xd - bias.detach().view(shape)).amax(red) > 0)
                    masks["bias"] = bias.detach().clone()
        out = func(*args, **kwargs)
        if kind not in _RELU_KINDS and isinstance(out, torch.Tensor) and bounds is not None:
            lo, hi = bounds
            margin = SATURATION_MARGIN * (hi - lo)
            with torch.no_grad():
                o = out.detach()
                st["saturated_fraction"] = ((o - lo <= margin) | (hi - o <= margin)).double().mean()
        key = (id(module), kind)
        k = self.counts[key] = self.counts.get(key, 0) + 1
        path = self.names.get(id(module), "") if module is not None else ""
        functional = not isinstance(module, _ACT_MODULES)
        name = f"{path}.{kind}@{k}" if functional else path
        if module is None:
            name = f"{kind}@{k}"
        self.sites.append(_Site(name, kind, path, functional, feeding, units, unit_dim,
                                x.numel() // max(1, units), st, masks))
        return out

    def finish_names(self) -> None:
        """A module used several times (one nn.ReLU after every layer): number every use."""
        uses: dict[str, int] = {}
        for s in self.sites:
            if not s.functional:
                uses[s.name] = uses.get(s.name, 0) + 1
        seen: dict[str, int] = {}
        for s in self.sites:
            if not s.functional and uses[s.name] > 1:
                seen[s.name] = seen.get(s.name, 0) + 1
                s.name = f"{s.name}@{seen[s.name]}"


# ------------------------------------------------------------------------------- preserve
class _Preserved:
    """What preflight must give back exactly as it found it: modes, buffers, grads, flags."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        self.params = [(name, p, p.requires_grad, p.grad, p._version)
                       for name, p in model.named_parameters()]
        self.grad_versions = [None if p.grad is None else p.grad._version
                              for _, p, *_ in self.params]
        # Buffers are small next to parameters: BatchNorm statistics, step counters. They
        # are copied back whatever their version counter says: BatchNorm's kernel updates
        # its running statistics in place without bumping it.
        self.buffers = [(m, name, b, b.detach().clone())
                        for m in model.modules() for name, b in m._buffers.items()
                        if b is not None]

    def restore(self) -> None:
        for m, flag in self.modes:
            m.training = flag
        for _, p, requires_grad, grad, _ in self.params:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
        with torch.no_grad():
            for m, name, b, copy in self.buffers:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                b.copy_(copy)

    def changed_in_place(self) -> list[str]:
        """Parameters (or their grads) the user's forward or loss modified in place."""
        return [name for (name, p, _, grad, version), gv in zip(self.params, self.grad_versions,
                                                                strict=True)
                if p._version != version or (grad is not None and grad._version != gv)]


@contextmanager
def _random_state(devices: list[int], seed: int) -> Iterator[None]:
    """Seed torch for a reproducible forward (Dropout masks), then restore every RNG."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            for d in devices:
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


# ------------------------------------------------------------------------------- validate
def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"preflight(model, example_batch) expects a torch.nn.Module as model, "
                        f"got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its module
    params = list(model.parameters())
    if not params:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters: there is no "
                         f"gradient to predict; pass the network whose weights will train")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
        raise ValueError("the model has uninitialised lazy parameters (nn.LazyLinear...): run "
                         "one forward pass before preflight so that they get their shapes")
    if not any(p.requires_grad for p in params):
        raise ValueError(f"all {len(params)} parameters of the model have requires_grad=False: "
                         f"nothing would train")
    return model


def _split_batch(batch: Any, loss_fn: Callable[..., Any] | None) -> tuple[Any, Any]:
    """``(inputs, target)``; target is None without a loss function."""
    allowed = ("a tensor (model(x)), a tuple or list (model(*batch)) or a dict "
               "(model(**batch))")
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got "
                            f"{type(loss_fn).__name__}")
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"with loss_fn, example_batch must be a pair (inputs, target), got "
                            f"{_describe(batch)}; inputs may be {allowed}")
        inputs, target = batch
    else:
        inputs, target = batch, None
    if not isinstance(inputs, (torch.Tensor, tuple, list, Mapping)) or \
            next(_tensors(inputs), None) is None:
        raise TypeError(f"example_batch must hold at least one tensor: {allowed}; got "
                        f"{_describe(inputs)}")
    for where, part in (("inputs", inputs), ("target", target)):
        for t in _tensors(part):
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"the example batch's {where} hold {bad} non-finite value(s) "
                                 f"(NaN/Inf) in a tensor of shape {tuple(t.shape)}: preflight "
                                 f"needs finite data; fix the data pipeline first")
    return inputs, target


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor {tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, Mapping):
        return "dict(" + ", ".join(f"{k}={_describe(v)}" for k, v in obj.items()) + ")"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}(" + ", ".join(_describe(v) for v in obj) + ")"
    return type(obj).__name__


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _usable(obj: Any) -> Any:
    """Inference-mode tensors cannot be saved for backward: plain copies of them."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, Mapping):
        return {k: _usable(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_usable(v) for v in obj) if isinstance(obj, list) else \
            tuple(_usable(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------- run
def _forward_backward(model: nn.Module, inputs: Any, target: Any,
                      loss_fn: Callable[..., Any] | None, probe: _Probe,
                      seed: int) -> dict[str, Any]:
    """One forward (activations spied on) and one backward; device-side measurements."""
    try:
        with _Spy(probe):
            output = _call(model, inputs)
    except Exception as exc:
        hint = ("; if the batch is (inputs, target), pass loss_fn or only the inputs"
                if loss_fn is None and isinstance(inputs, (tuple, list)) and len(inputs) == 2
                else "")
        raise ValueError(f"the model's forward raised {type(exc).__name__}: {exc} (on the "
                         f"example batch {_describe(inputs)}{hint})") from exc
    outs = [o for o in _tensors(output) if o.is_floating_point()]
    loss = None
    if loss_fn is None:
        outs = [o for o in outs if o.requires_grad]
        if not outs:
            raise ValueError(f"the model's output ({_describe(output)}) has no floating tensor "
                             f"that depends on a trainable parameter: nothing to backpropagate")
        gen = torch.Generator().manual_seed(seed)
        surrogate = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
                        for o in outs)
    else:
        try:
            loss = loss_fn(output, target)
        except Exception as exc:
            raise ValueError(f"loss_fn raised {type(exc).__name__}: {exc} (preflight calls "
                             f"loss_fn(output, target) with output {_describe(output)} and "
                             f"target {_describe(target)})") from exc
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}: "
                             f"reduce it (e.g. reduction='mean')")
        if not loss.requires_grad:
            raise ValueError("the loss does not depend on any trainable parameter: nothing "
                             "to backpropagate")
        surrogate = loss.reshape(())
    try:
        graph = walk_graph(surrogate)  # before backward frees the graph
    except Exception:  # structure is a nicety; the measurements do not need it
        graph = None
    params = [p for layer in probe.layers for _, p in layer.params]
    try:
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
    except RuntimeError as exc:
        raise RuntimeError(f"preflight's backward pass failed: {exc}") from exc
    present = [g for g in grads if g is not None]
    norms = iter(stats.norms(present, present[0].device).unbind()) if present else iter(())
    grad_norm = [next(norms) if g is not None else None for g in grads]
    raw_layers, k = [], 0
    for layer in probe.layers:
        n = len(layer.params)
        own = grad_norm[k: k + n]
        wk = next((j for j, (_, p) in enumerate(layer.params) if p.dim() >= 2), None)
        raw_layers.append({"out": layer.out, "out_grad": layer.out_grad, "grad": own,
                           "weight_grad": own[wk] if wk is not None else None})
        k += n
    x = next((t for t in _tensors(inputs) if t.is_floating_point()), None)
    with torch.no_grad():
        inp = None if x is None else {"rms": stats.rms(x), "mean": x.double().mean(),
                                      "std": x.double().std() if x.numel() > 1 else
                                      x.new_zeros((), dtype=torch.float64)}
        outputs = [o.detach() for o in _tensors(output) if o.is_floating_point()]
        out = {"rms": [stats.rms(o) for o in outputs], "numel": [o.numel() for o in outputs],
               "nonfinite": [(~torch.isfinite(o)).sum() for o in outputs]}
    sites = [{**s.stats, **s.masks} for s in probe.sites]
    return {"layers": raw_layers, "sites": sites, "input": inp, "output": out,
            "loss": None if loss is None else loss.detach().double().reshape(()),
            "graph": graph}


def _to_host(tree: Any) -> Any:
    """The same tree with every tensor as a float or a list: one copy per device."""
    flat: list[torch.Tensor] = []

    def collect(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            flat.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    collect(tree)
    values: dict[int, Any] = {}
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in flat:
        by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        host = torch.cat([t.detach().reshape(-1).double() for t in group]).cpu().tolist()
        k = 0
        for t in group:
            n = t.numel()
            values[id(t)] = host[k] if t.dim() == 0 else host[k: k + n]
            k += n

    def rebuild(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return values[id(x)]
        if isinstance(x, dict):
            return {k: rebuild(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [rebuild(v) for v in x]
        return x

    return rebuild(tree)


# ------------------------------------------------------------------------------- tables
def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return a / b


def _layer_rows(probe: _Probe, raw: list[dict[str, Any]], graph: Any,
                inp: dict[str, float] | None) -> list[dict[str, Any]]:
    """The per-layer table, input side first (layers that never ran at the end)."""
    relu6_fed = {s.layer for s in probe.sites if s.kind == "relu6"}
    rows = []
    for i, (layer, r) in enumerate(zip(probe.layers, raw, strict=True)):
        w = layer.weight
        act = None
        if w is not None and graph is not None:
            act = graph.act_after.get(id(w))
            if act == "hardtanh" and (i in relu6_fed or i + 1 in relu6_fed):
                act = "relu"
        n = sum(numel for _, numel, _ in r["out"])
        out_rms = math.sqrt(sum(rms ** 2 * numel for rms, numel, _ in r["out"]) / n) if n \
            else None
        grads = [g for g in r["grad"] if g is not None]
        scale = init_scale(w, act) if w is not None else None
        rows.append({
            "name": layer.name, "type": type(layer.module).__name__,
            "params": sum(p.numel() for _, p in layer.params), "ran": layer.order is not None,
            "order": layer.order, "calls": len(r["out"]), "activation": act,
            "fan_in": scale["fan_in"] if scale else None,
            "fan_out": scale["fan_out"] if scale else None,
            "init": {k: scale[k] for k in ("std", "recommended_std", "ratio", "family")}
            if scale else None,
            "output_rms": out_rms,
            "output_nonfinite": int(sum(nf for _, _, nf in r["out"])),
            "grad_norm": math.sqrt(sum(g ** 2 for g in grads)) if grads else None,
            "weight_grad_norm": r["weight_grad"],
            "output_grad_norm": math.sqrt(sum(g ** 2 for g in r["out_grad"]))
            if r["out_grad"] else None,
        })
    rows.sort(key=lambda row: (row["order"] is None, row["order"] or 0))
    prev = inp["rms"] if inp else None
    ran = [row for row in rows if row["ran"]]
    for k, row in enumerate(ran):
        row["forward_gain"] = _ratio(row["output_rms"], prev)
        prev = row["output_rms"]
        nxt = ran[k + 1]["output_grad_norm"] if k + 1 < len(ran) else None
        row["backward_gain"] = _ratio(row["output_grad_norm"], nxt)
    for depth, row in enumerate(rows):
        row["depth"] = depth
        row.pop("order")
        row.setdefault("forward_gain", None)
        row.setdefault("backward_gain", None)
    return rows


def _site_rows(probe: _Probe, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for site, r in zip(probe.sites, raw, strict=True):
        row: dict[str, Any] = {
            "name": site.name, "kind": site.kind, "module": site.module,
            "functional": site.functional,
            "layer": probe.layers[site.layer].name if site.layer is not None else None,
            "units": site.units, "unit_dim": site.unit_dim,
            "values_per_unit": site.values_per_unit,
            "pre_mean": r["pre_mean"], "pre_std": r["pre_std"], "pre_rms": r["pre_rms"],
            "dead_fraction": r.get("dead_fraction"),
            "saturated_fraction": r.get("saturated_fraction")}
        if "dead" in r:
            dead = [i for i, d in enumerate(r["dead"]) if d]
            row["dead_units"] = len(dead)
            row["dead_indices"] = dead[:16]
            row["judged"] = site.values_per_unit >= DEAD_MIN_VALUES
            if "revived" in r and dead:
                row["revived_by_zero_bias"] = int(sum(1 for v in r["revived"] if v))
                row["bias_dead_mean"] = float(np.mean([r["bias"][i] for i in dead]))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- judge
@dataclasses.dataclass
class _Measured:
    """Everything the predictions read, on the host."""

    t: Thresholds
    rows: list[dict[str, Any]]
    sites: list[dict[str, Any]]
    inp: dict[str, float] | None
    out_rms: float | None
    out_nonfinite: int
    loss: float | None
    graph: Any

    @property
    def weight_rows(self) -> list[dict[str, Any]]:
        """Layers with a weight matrix/kernel that ran and got a gradient, input side first."""
        return [r for r in self.rows if r["ran"] and r["fan_in"] is not None
                and r["grad_norm"] is not None]

    def row(self, name: str | None) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["name"] == name), None)


def _init_cause(m: _Measured, rows: list[dict[str, Any]], kind: str) -> Cause | None:
    """Most weight layers initialised far below ("small") or above ("large") Kaiming/Xavier."""
    scales = [r for r in rows if r["init"] and _finite(r["init"]["ratio"])]
    if len(scales) < 2:
        return None
    low, high = m.t.init_scale_low, m.t.init_scale_high
    picked = [r for r in scales if (r["init"]["ratio"] < low if kind == "small"
                                    else r["init"]["ratio"] > high)]
    if len(picked) * 2 < len(scales):
        return None
    parts = []
    by_act: dict[str, list[dict[str, Any]]] = {}
    for r in picked:
        by_act.setdefault(r["activation"] or "none", []).append(r)
    for act, items in sorted(by_act.items(), key=lambda kv: -len(kv[1])):
        med = float(np.median([r["init"]["ratio"] for r in items]))
        fam = items[0]["init"]["family"].capitalize()
        after = "a layer without activation" if act in ("none", "unknown") else \
            f"the {act} that follows"
        ex = items[0]
        parts.append(f"{fmt(med)}x the {fam} std for {after} ({_span(items)}; e.g. "
                     f"{_label(ex['name'])}: std {fmt(ex['init']['std'])} vs "
                     f"{fmt(ex['init']['recommended_std'])})")
    text = f"weights start at {'; and '.join(parts)}: " + (
        "each layer shrinks the signal, forward and backward" if kind == "small"
        else "each layer multiplies the signal, forward and backward")
    return Cause(f"init_too_{kind}", text)


def _span(rows: list[dict[str, Any]]) -> str:
    names = [_label(r["name"]) for r in rows]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]}"


def _depth_causes(m: _Measured, rows: list[dict[str, Any]],
                  init_kinds: tuple[str, ...]) -> list[Cause]:
    causes: list[Cause] = []
    acts = [r["activation"] for r in rows]
    for act in ("sigmoid", "tanh"):
        n = sum(a == act for a in acts)
        if n >= max(2, m.t.deep_stack_layers - 1) or (n >= 2 and n >= len(acts) // 2):
            gains = [r["backward_gain"] for r in rows if _finite(r["backward_gain"])]
            measured = f"; measured here, the gradient at layer outputs changes " \
                f"{fmt(_geomean(gains))}x per layer" if gains else ""
            bound = "0.25" if act == "sigmoid" else "1 (and far less off-centre)"
            causes.append(Cause(f"{act}_in_deep_stack",
                                f"{n} of the {len(acts)} layers feed a {act}; its derivative "
                                f"is at most {bound}{measured}"))
            break
    for kind in init_kinds:
        c = _init_cause(m, rows, kind)
        if c:
            causes.append(c)
    rms = [r["output_rms"] for r in rows]
    if len(rows) >= m.t.min_layers and _finite(rms[0]) and _finite(rms[-2]) and rms[0] > 0:
        factor = (rms[-2] / rms[0]) ** (1 / max(1, len(rms) - 2))
        if 0 < factor <= m.t.forward_shrink_per_layer:
            causes.append(Cause(
                "signal_shrinks_forward",
                f"the forward signal shrinks {fmt(1 / factor)}x per layer (output RMS "
                f"{fmt(rms[0])} at {_label(rows[0]['name'])}, {fmt(rms[-2])} at "
                f"{_label(rows[-2]['name'])}): the backward signal shrinks with it"))
    g = m.graph
    if len(rows) >= m.t.deep_stack_layers and g is not None and not g.norm_ops and \
            not g.branch_merges:
        causes.append(Cause("deep_plain_stack",
                            f"{len(rows)} layers in a plain chain: the autograd graph has no "
                            f"skip connection and no normalisation layer to keep the gradient "
                            f"scale from compounding"))
    return causes


def _geomean(values: list[float]) -> float:
    pos = [v for v in values if v > 0]
    return float(np.exp(np.mean(np.log(pos)))) if pos else math.nan


def _has(causes: list[Cause], *ids: str) -> bool:
    return any(c.id in ids for c in causes)


def _init_ratio(rows: list[dict[str, Any]]) -> str | None:
    ratios = [r["init"]["ratio"] for r in rows if r["init"] and _finite(r["init"]["ratio"])]
    return fmt(float(np.median(ratios))) if ratios else None


def _depth_remedies(m: _Measured, rows: list[dict[str, Any]],
                    causes: list[Cause]) -> list[Remedy]:
    """The init (and activation, normalisation, skip) that fits the causes found."""
    out: list[Remedy] = []
    acts = [r["activation"] for r in rows]
    relu_like = sum(a in _RELU_LIKE for a in acts) >= max(1, len(acts) // 2)
    init_bad = _has(causes, "init_too_small", "init_too_large", "signal_shrinks_forward",
                    "forward_overflow")
    ratio = _init_ratio(rows)
    if relu_like and init_bad:
        out.append(remedy("kaiming_init", nonlinearity="relu", **({"ratio": ratio} if ratio
                                                                   else {})))
    if _has(causes, "sigmoid_in_deep_stack", "tanh_in_deep_stack"):
        out.append(remedy("leaky_relu", old="(nn.Sigmoid, nn.Tanh)"))
        out.append(remedy("kaiming_init", nonlinearity="leaky_relu"))
    elif init_bad and not relu_like:
        act = next((a for a in acts if a in ("tanh", "sigmoid")), "linear")
        out.append(remedy("xavier_init", nonlinearity=act))
    if _has(causes, "deep_plain_stack"):
        out.append(remedy("batch_norm"))
        width = rows[len(rows) // 2]["fan_in"] or "width"
        out.append(remedy("residual_connections", width=width, depth=max(1, len(rows) - 2)))
    seen: set[str] = set()
    return [r for r in out if not (r.id in seen or seen.add(r.id))]  # type: ignore[func-returns-value]


def _vanishing(m: _Measured) -> Finding | None:
    rows, t = m.weight_rows, m.t
    if len(rows) < t.min_layers:
        return None
    first, last = rows[0], rows[-1]
    ratio = _ratio(first["grad_norm"], last["grad_norm"])
    if ratio is None or ratio >= t.vanishing_ratio:
        return None
    grads = [r["grad_norm"] for r in rows]
    starved = [r["name"] for r in rows if _finite(r["grad_norm"])
               and r["grad_norm"] < t.vanishing_ratio * last["grad_norm"]]
    # factor by which the gradient norm falls from layer k+1 to layer k (input side)
    drops = [_ratio(grads[k + 1], grads[k]) for k in range(len(rows) - 1)]
    finite = [(k, d) for k, d in enumerate(drops) if _finite(d) and d > 0]
    evidence: dict[str, Any] = {
        "grad_norm_ratio_first_to_last": ratio,
        "per_layer_grad_norm": {r["name"]: r["grad_norm"] for r in rows},
        "per_layer_output_grad_norm": {r["name"]: r["output_grad_norm"] for r in rows},
        "backward_gain": {r["name"]: r["backward_gain"] for r in rows},
        "forward_gain": {r["name"]: r["forward_gain"] for r in rows},
        "threshold": t.vanishing_ratio}
    where = ""
    zero = [k for k, g in enumerate(grads) if g == 0]
    if zero:
        where = f"; no gradient at all reaches {_label(rows[zero[-1]]['name'])}" + \
            (" and the layers below it" if zero[-1] > 0 else "")
    elif finite:
        k, worst = max(finite, key=lambda kd: kd[1])
        mean = _geomean([d for _, d in finite])
        evidence["largest_drop"] = {"from": rows[k + 1]["name"], "to": rows[k]["name"],
                                    "factor": worst}
        evidence["mean_factor_per_layer"] = mean
        if worst > max(t.single_layer_drop, mean ** 2):
            where = (f"; most of it is lost between {_label(rows[k + 1]['name'])} and "
                     f"{_label(rows[k]['name'])} ({fmt(worst)}x)")
        else:
            where = f"; it is lost gradually, about {fmt(mean)}x per layer over {len(rows)} layers"
    saturating = any(c.id.endswith("_in_deep_stack") for c in _depth_causes(m, rows, ()))
    causes = _dead_cause(m, rows) + \
        _depth_causes(m, rows, ("small", "large") if saturating else ("small",))
    summary = (f"Gradients will vanish towards the input: at init {_label(first['name'])} gets "
               f"{fmt(ratio)} of the gradient norm of {_label(last['name'])}{where}, so the "
               f"input-side layers will barely learn.")
    severity = "error" if ratio < t.vanishing_ratio_error else "warning"
    return Finding("vanishing_gradient", severity, 0, 0, starved or [first["name"]], summary,
                   evidence, causes, _depth_remedies(m, rows, causes))


def _dead_cause(m: _Measured, rows: list[dict[str, Any]]) -> list[Cause]:
    """ReLU sites, between the weight layers, whose units are mostly dead: they block the
    gradient of every layer below them."""
    inside = {r["name"] for r in rows[:-1]}
    dead = [s for s in m.sites if s.get("judged") and s["layer"] in inside
            and _finite(s["dead_fraction"]) and s["dead_fraction"] > DEAD_FRACTION]
    if not dead:
        return []
    worst = max(dead, key=lambda s: s["dead_fraction"])
    return [Cause("dead_units_block_gradient",
                  f"{len(dead)} ReLU site{'s' if len(dead) > 1 else ''} between the layers "
                  f"start{'' if len(dead) > 1 else 's'} mostly dead ({worst['name']}: "
                  f"{fmt(100 * worst['dead_fraction'])}% of {worst['units']} units): a dead "
                  f"unit passes no gradient to the layers below it")]


def _first_nonfinite(m: _Measured) -> dict[str, Any] | None:
    return next((r for r in m.rows if r["ran"] and r["output_nonfinite"]), None)


def _forward_growth(m: _Measured, upto: dict[str, Any] | None = None
                    ) -> tuple[float, dict[str, Any], float] | None:
    """Largest finite layer-output RMS (before ``upto``) over the input scale."""
    ran = [r for r in m.rows if r["ran"]]
    if upto is not None:
        ran = ran[: ran.index(upto)]
    finite = [r for r in ran if _finite(r["output_rms"])]
    if not finite:
        return None
    base = m.inp["rms"] if m.inp and _finite(m.inp["rms"]) and m.inp["rms"] > 0 \
        else finite[0]["output_rms"]
    top = max(finite, key=lambda r: r["output_rms"])
    if base <= 0:
        return None
    return top["output_rms"] / base, top, base


def _exploding(m: _Measured) -> Finding | None:
    t, rows = m.t, m.weight_rows
    reasons: list[str] = []
    evidence: dict[str, Any] = {}
    layers: list[str] = []
    worst = 0.0  # how far past its limit the strongest sign is
    bad = _first_nonfinite(m)
    grown = _forward_growth(m, bad)
    if grown is not None:
        growth, top, base = grown
        if growth > FORWARD_GROWTH or top["output_rms"] > t.forward_overflow:
            depth = 1 + [r["name"] for r in m.rows if r["ran"]].index(top["name"])
            per_layer = growth ** (1 / depth)
            reasons.append(f"the forward signal grows {fmt(growth)}x from the input (RMS "
                           f"{fmt(base)}) to the output of {_label(top['name'])} (RMS "
                           f"{fmt(top['output_rms'])}), about {fmt(per_layer)}x per layer")
            evidence.update(forward_growth=growth, forward_growth_per_layer=per_layer,
                            input_rms=base, max_output_rms=top["output_rms"],
                            max_output_rms_layer=top["name"])
            worst = max(worst, growth / FORWARD_GROWTH)
            if top["output_rms"] > t.forward_overflow:
                worst = math.inf
    if len(rows) >= t.min_layers:
        back = _ratio(rows[0]["output_grad_norm"], rows[-1]["output_grad_norm"])
        if back is not None and back > t.exploding_depth_ratio:
            reasons.append(f"the gradient at layer outputs grows {fmt(back)}x from "
                           f"{_label(rows[-1]['name'])} back to {_label(rows[0]['name'])}")
            evidence["output_grad_norm_ratio_first_to_last"] = back
            worst = max(worst, back / t.exploding_depth_ratio)
        ratio = _ratio(rows[0]["grad_norm"], rows[-1]["grad_norm"])
        if ratio is not None and ratio > t.exploding_depth_ratio:
            reasons.append(f"{_label(rows[0]['name'])} gets {fmt(ratio)}x the gradient norm "
                           f"of {_label(rows[-1]['name'])}")
            evidence["grad_norm_ratio_first_to_last"] = ratio
            worst = max(worst, ratio / t.exploding_depth_ratio)
    if not reasons:
        return None
    nonfinite = _nonfinite_facts(m)
    if nonfinite:
        reasons.append(nonfinite)
        worst = math.inf
    evidence["per_layer_output_rms"] = {r["name"]: r["output_rms"] for r in m.rows if r["ran"]}
    evidence["forward_gain"] = {r["name"]: r["forward_gain"] for r in m.rows if r["ran"]}
    evidence["backward_gain"] = {r["name"]: r["backward_gain"] for r in rows}
    evidence["per_layer_grad_norm"] = {r["name"]: r["grad_norm"] for r in rows}
    if m.loss is not None:
        evidence["loss"] = m.loss
    depth_rows = rows or [r for r in m.rows if r["ran"] and r["fan_in"] is not None]
    overflow = None
    if worst == math.inf:
        what = [f"largest layer-output RMS {fmt(evidence['max_output_rms'])}"] \
            if "max_output_rms" in evidence else []
        what += [nonfinite] if nonfinite else []
        overflow = Cause("forward_overflow",
                         f"the very first forward pass already overflows ({'; '.join(what)}): "
                         f"no learning rate or clipping can train from these weights")
    causes = [c for c in (overflow,) if c] + _depth_causes(m, depth_rows, ("large",))
    causes = [c for c in causes if c.id != "signal_shrinks_forward"]
    inputs = _input_cause(m)
    if inputs:
        causes.append(inputs)
    remedies = _depth_remedies(m, depth_rows, causes)
    if inputs and m.inp:
        remedies.insert(0, remedy("standardize_inputs", mean=fmt(m.inp["mean"]),
                                  std=fmt(m.inp["std"])))
    large = [r["name"] for r in depth_rows if r["init"] and _finite(r["init"]["ratio"])
             and r["init"]["ratio"] > t.init_scale_high]
    layers = large or [r["name"] for r in depth_rows[:1]] + \
        ([evidence["max_output_rms_layer"]] if "max_output_rms_layer" in evidence else [])
    severity = "error" if worst >= t.exploding_error_factor else "warning"
    summary = f"Gradients will explode: {'; '.join(reasons)}."
    if overflow:
        summary += " Training cannot start from these weights; gradient clipping cannot help."
    return Finding("exploding_gradient", severity, 0, 0, _ordered(m, layers), summary, evidence,
                   causes, remedies)


def _ordered(m: _Measured, names: list[str]) -> list[str]:
    rank = {r["name"]: k for k, r in enumerate(m.rows)}
    return sorted(set(names), key=lambda n: rank.get(n, len(rank)))


def _nonfinite_facts(m: _Measured) -> str | None:
    bad = _first_nonfinite(m)
    if bad is not None:
        return f"the output of {_label(bad['name'])} is already non-finite (NaN/Inf)"
    if m.out_nonfinite:
        return "the model's output is non-finite (NaN/Inf)"
    if m.loss is not None and not math.isfinite(m.loss):
        return "the loss is non-finite"
    if any(r["grad_norm"] is not None and not math.isfinite(r["grad_norm"]) for r in m.rows):
        return "the backward pass produces non-finite gradients"
    return None


def _nonfinite(m: _Measured, exploding: Finding | None) -> Finding | None:
    """NaN/Inf from a finite batch that no forward growth explains: an invalid operation."""
    what = _nonfinite_facts(m)
    if what is None or exploding is not None:
        return None
    bad = _first_nonfinite(m)
    backward = bad is None and not m.out_nonfinite and (m.loss is None or math.isfinite(m.loss))
    grads = [r["name"] for r in m.rows if r["grad_norm"] is not None
             and not math.isfinite(r["grad_norm"])]
    if bad is not None:
        cause = Cause("invalid_forward_op",
                      f"{_label(bad['name'])} ({bad['type']}) turns a finite input into NaN/Inf "
                      f"without the signal growing before it: an invalid operation (log of 0, "
                      f"division by 0, sqrt of a negative) in or just before it")
    elif backward:
        cause = Cause("invalid_backward_op",
                      "the forward pass is finite but its gradient is not: an operation whose "
                      "derivative is infinite where it is evaluated (sqrt or pow at 0, a norm of "
                      "a zero vector)")
    else:
        cause = Cause("invalid_forward_op", f"{what} although every layer output is finite: "
                      f"an invalid operation after the last layer or in the loss")
    summary = f"Training will produce NaN/Inf from the first step: {what} on a finite batch."
    evidence = {"first_nonfinite_layer": bad["name"] if bad else None,
                "nonfinite_grad_layers": grads, "output_nonfinite": m.out_nonfinite,
                "loss": m.loss}
    layers = [bad["name"]] if bad else grads
    return Finding("nonfinite", "error", 0, 0, layers, summary, evidence, [cause],
                   [remedy("detect_anomaly")])


def _input_cause(m: _Measured) -> Cause | None:
    if not m.inp or not _finite(m.inp["rms"]) or m.inp["rms"] <= 0:
        return None
    rms, limit = m.inp["rms"], m.t.input_scale_high
    if 1 / limit <= rms <= limit:
        return None
    return Cause("unscaled_inputs",
                 f"the inputs are not standardised: RMS {fmt(rms)} (mean "
                 f"{fmt(m.inp['mean'])}, std {fmt(m.inp['std'])}), so the first layer sees "
                 f"{fmt(rms)}x the unit scale its init assumes")


def _dying(m: _Measured) -> Finding | None:
    hits = [s for s in m.sites if s.get("judged") and _finite(s["dead_fraction"])
            and s["dead_fraction"] > DEAD_FRACTION]
    if not hits:
        return None
    hits.sort(key=lambda s: -s["dead_fraction"])
    causes: list[Cause] = []
    for s in hits:
        dead, revived = s["dead_units"], s.get("revived_by_zero_bias")
        if revived is not None and revived >= BIAS_REVIVE_FRACTION * dead and \
                s["bias_dead_mean"] < 0:
            causes.append(Cause(
                "large_negative_bias",
                f"{_label(s['layer'])} feeds {s['name']} with a bias of {fmt(s['bias_dead_mean'])} "
                f"on average over its {dead} dead units; with a zero bias {revived} of them "
                f"would be active on this batch: the bias, not the weights, kills them"))
    feeding = [m.row(s["layer"]) for s in hits if s["layer"]]
    rows = [r for r in feeding if r is not None]
    small = _init_cause(m, m.weight_rows, "small") if len(m.weight_rows) >= 2 else None
    shrink = [c for c in _depth_causes(m, m.weight_rows, ()) if c.id == "signal_shrinks_forward"] \
        if len(m.weight_rows) >= m.t.min_layers else []
    causes += [c for c in (small, *shrink) if c]
    remedies: list[Remedy] = []
    if causes:  # Kaiming weights with zero biases: what the catalogue's code sets
        remedies.append(remedy("kaiming_init", nonlinearity="relu",
                               **({"ratio": r} if (r := _init_ratio(rows)) else {})))
    top = hits[0]
    remedies.append(remedy("leaky_relu", old="(nn.ReLU, nn.ReLU6)", site=top["name"]))
    more = f", and {len(hits) - 1} more site{'s' if len(hits) > 2 else ''} above " \
        f"{fmt(100 * DEAD_FRACTION)}%" if len(hits) > 1 else ""
    summary = (f"ReLU units are dead from the start: {fmt(100 * top['dead_fraction'])}% of the "
               f"{top['units']} units of {top['name']} output 0 for every one of the batch's "
               f"samples, with pre-activation mean {fmt(top['pre_mean'])} and std "
               f"{fmt(top['pre_std'])}{more}; dead units pass no gradient, so nothing "
               f"revives them.")
    evidence = {"sites": {s["name"]: {k: s.get(k) for k in (
        "dead_fraction", "dead_units", "units", "layer", "pre_mean", "pre_std",
        "dead_indices", "bias_dead_mean", "revived_by_zero_bias", "values_per_unit")}
        for s in hits}, "threshold": DEAD_FRACTION}
    severity = "error" if any(s["dead_units"] == s["units"] for s in hits) else "warning"
    layers = _ordered(m, [s["layer"] for s in hits if s["layer"]])
    return Finding("dying_relu", severity, 0, 0, layers, summary, evidence, causes, remedies)


def _saturated(m: _Measured) -> Finding | None:
    hits = [s for s in m.sites if _finite(s["saturated_fraction"])
            and s["saturated_fraction"] > SATURATED_FRACTION]
    if not hits:
        return None
    hits.sort(key=lambda s: -s["saturated_fraction"])
    causes: list[Cause] = []
    first = m.weight_rows[0]["name"] if m.weight_rows else None
    inputs = _input_cause(m)
    if inputs and any(s["layer"] in (None, first) for s in hits):
        causes.append(inputs)
    large = []
    for s in hits:
        r = m.row(s["layer"])
        if r and r["init"] and _finite(r["init"]["ratio"]) and \
                r["init"]["ratio"] > m.t.init_scale_high:
            large.append((s, r))
    if large:
        s, r = large[0]
        causes.append(Cause("init_too_large",
                            f"{_label(r['name'])} starts at {fmt(r['init']['ratio'])}x the "
                            f"{r['init']['family'].capitalize()} std for the {s['kind']} that "
                            f"follows (std {fmt(r['init']['std'])} vs "
                            f"{fmt(r['init']['recommended_std'])})"))
    if not causes:
        top = hits[0]
        causes.append(Cause("large_preactivations",
                            f"the pre-activations of {top['name']} have std "
                            f"{fmt(top['pre_std'])} and mean {fmt(top['pre_mean'])}, far "
                            f"outside the {top['kind']}'s linear range"))
    remedies: list[Remedy] = []
    if inputs and m.inp and causes and causes[0] is inputs:
        remedies.append(remedy("standardize_inputs", mean=fmt(m.inp["mean"]),
                               std=fmt(m.inp["std"])))
    if large:
        remedies.append(remedy("xavier_init", nonlinearity=_gain_name(large[0][0]["kind"])))
    remedies.append(remedy("batch_norm"))
    remedies.append(remedy("leaky_relu", old="(nn.Sigmoid, nn.Tanh)"))
    top = hits[0]
    more = f" ({len(hits) - 1} more site{'s' if len(hits) > 2 else ''} above " \
        f"{fmt(100 * SATURATED_FRACTION)}%)" if len(hits) > 1 else ""
    summary = (f"Activations start saturated: {fmt(100 * top['saturated_fraction'])}% of the "
               f"outputs of {top['name']} ({top['kind']}) lie within "
               f"{fmt(100 * SATURATION_MARGIN)}% of its range from a bound, because its "
               f"pre-activations have std {fmt(top['pre_std'])} (mean {fmt(top['pre_mean'])})"
               f"{more}; saturated units pass almost no gradient.")
    evidence = {"sites": {s["name"]: {k: s.get(k) for k in (
        "saturated_fraction", "kind", "layer", "pre_mean", "pre_std", "pre_rms", "units")}
        for s in hits}, "threshold": SATURATED_FRACTION, "margin": SATURATION_MARGIN}
    if m.inp:
        evidence["input"] = dict(m.inp)
    severity = "error" if top["saturated_fraction"] >= SATURATED_FRACTION_ERROR else "warning"
    layers = _ordered(m, [s["layer"] for s in hits if s["layer"]])
    return Finding("saturated_activation", severity, 0, 0, layers, summary, evidence, causes,
                   remedies)


def _gain_name(kind: str) -> str:
    """The ``nn.init.calculate_gain`` name of an activation kind."""
    return kind if kind in ("sigmoid", "tanh") else "tanh"


# ------------------------------------------------------------------------------- report
class PreflightReport(Report):
    """A :class:`Report` of one forward/backward at init, with the per-layer table.

    JSON, ``findings`` and ``problems`` are those of any report (``run.mode`` is
    ``"preflight"``, ``run.steps`` 0); the text and HTML add the measured per-layer table.
    """

    @property
    def preflight(self) -> dict[str, Any]:
        return self._data["preflight"]

    def table(self, max_rows: int = 40) -> str:
        """The per-layer measurements as a fixed-width table."""
        head = ("layer", "type", "act", "init", "out rms", "fwd gain", "grad norm", "bwd gain")
        lines = []
        for r in self.preflight["layers"]:
            init = f"{fmt(r['init']['ratio'])}x {r['init']['family']}" if r["init"] else ""
            lines.append((r["name"], r["type"], r["activation"] or "", init,
                          fmt(r["output_rms"]), fmt(r["forward_gain"]), fmt(r["grad_norm"]),
                          fmt(r["backward_gain"])) if r["ran"] else
                         # parameters used without the module's forward (MultiheadAttention's
                         # out_proj) still get a gradient
                         (r["name"], r["type"], "", init, "no forward", "",
                          fmt(r["grad_norm"]) if r["grad_norm"] is not None else "unused", ""))
        if len(lines) > max_rows:
            keep = max_rows // 2
            lines = [*lines[:keep], ("...",) + ("",) * 7, *lines[-keep:]]
        widths = [max(len(str(x[i])) for x in (head, *lines)) for i in range(len(head))]
        return "\n".join("  ".join(str(x[i]).ljust(widths[i]) for i in range(len(head))).rstrip()
                         for x in (head, *lines))

    def summary(self, width: int = 100) -> str:
        from .report.text import render_text

        p = self.preflight
        grad = "the loss's gradient" if p["gradient"] == "loss_fn" else \
            f"a random N(0, 1) output gradient (seed {p['seed']})"
        head = (f"gradwatch {self._data['tool']['version']} preflight: one forward/backward at "
                f"init, model in {p['model_mode']} mode, example batch {p['batch']}, {grad}")
        rest = render_text(self.to_dict(), width).splitlines()[2:]  # after head and model
        return "\n".join([*textwrap.wrap(head, width, subsequent_indent="  "), self.table(),
                          *rest]) + "\n"

    def to_html(self) -> str:
        from html import escape

        from .report.html import render_html

        page = render_html(self.to_dict())
        table = "<h2>Preflight: one forward/backward at init</h2><pre>" + \
            escape(self.table(max_rows=10_000)) + "</pre>"
        marker = "<h2>Layers"
        return page.replace(marker, table + marker, 1) if marker in page else \
            page.replace("</body>", table + "</body>")


def preflight(model: nn.Module, example_batch: Any,
              loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, *,
              thresholds: Thresholds | Mapping[str, float] | None = None,
              seed: int = 0) -> PreflightReport:
    """Predict, from one forward/backward at init, which layers' gradients will go wrong.

    ``example_batch`` is what the model is called with: a tensor (``model(x)``), a tuple or
    list (``model(*batch)``) or a dict (``model(**batch)``); with ``loss_fn`` it is
    ``(inputs, target)`` and the backward pass starts from ``loss_fn(output, target)``,
    without it from a random unit-variance gradient on the output (seed ``seed``). The
    model runs in the mode it is in and is left exactly as it was (see the module doc).

    >>> import torch
    >>> from torch import nn
    >>> layers = [m for _ in range(10) for m in (nn.Linear(10, 10), nn.Sigmoid())]
    >>> model = nn.Sequential(*layers, nn.Linear(10, 1))
    >>> report = preflight(model, torch.randn(64, 10))
    >>> "vanishing_gradient" in report.kinds()
    True
    """
    start = time.perf_counter()
    t = resolve_thresholds(None, thresholds)
    model = _check_model(model)
    inputs, target = _split_batch(example_batch, loss_fn)
    inputs, target = _usable(inputs), _usable(target)
    if torch.is_inference_mode_enabled():
        raise ValueError("preflight needs autograd: call it outside torch.inference_mode()")
    devices = sorted({t_.device.index or 0 for t_ in [*model.parameters(), *_tensors(inputs)]
                      if t_.device.type == "cuda"})
    probe = _Probe(model)
    kept = _Preserved(model)
    modes = {m.training for m in model.modules()}
    with ExitStack() as stack:
        stack.callback(kept.restore)  # runs last: after the hooks are gone
        stack.enter_context(_random_state(devices, seed))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(probe.attached())
        raw = _forward_backward(model, inputs, target, loss_fn, probe, seed)
    changed = kept.changed_in_place()
    if changed:
        raise RuntimeError(f"the model's forward (or loss_fn) modified parameters in place "
                           f"({', '.join(changed[:5])}); preflight cannot undo that and its "
                           f"measurements would not describe the model's init")
    probe.finish_names()
    graph = raw.pop("graph")
    host = _to_host(raw)
    inp = host["input"]
    out = host["output"]
    numel = sum(out["numel"])
    out_rms = math.sqrt(sum(r ** 2 * n for r, n in zip(out["rms"], out["numel"], strict=True))
                        / numel) if numel else None
    m = _Measured(t, _layer_rows(probe, host["layers"], graph, inp),
                  _site_rows(probe, host["sites"]), inp, out_rms,
                  int(sum(out["nonfinite"])), host["loss"], graph)
    exploding = _exploding(m)
    found = [f for f in (_nonfinite(m, exploding), exploding, _vanishing(m), _dying(m),
                         _saturated(m)) if f]
    order = {"error": 0, "warning": 1, "info": 2}
    found.sort(key=lambda f: order[f.severity])
    mode = "train" if modes == {True} else "eval" if modes == {False} else "mixed"
    batch = _describe(inputs) + ("" if loss_fn is None else f", target {_describe(target)}")
    data = {
        "schema": SCHEMA,
        "tool": {"name": "gradwatch", "version": __version__},
        "run": {"steps": 0, "status": "completed", "in_progress": False, "error": None,
                "duration_s": round(time.perf_counter() - start, 3), "mode": "preflight",
                "internal_errors": []},
        "layers": [{k: r[k] for k in ("name", "type", "depth", "params")} for r in m.rows],
        "findings": [f.to_dict() for f in found],
        "series": {"step": [0], "loss": [m.loss], "lr": [None],
                   "grad_norm": {r["name"]: [r["grad_norm"]] for r in m.rows},
                   "activation_rms": {r["name"]: [r["output_rms"]] for r in m.rows},
                   "dead_fraction": {s["name"]: [s["dead_fraction"]] for s in m.sites
                                     if s["dead_fraction"] is not None},
                   "saturated_fraction": {s["name"]: [s["saturated_fraction"]] for s in m.sites
                                          if s["saturated_fraction"] is not None},
                   "stride": 1},
        "facts": {"layers": {r["name"]: {"activation": r["activation"], "init_scale": r["init"],
                                         "fan_in": r["fan_in"]} for r in m.rows},
                  "graph": None if graph is None else {
                      "activations": graph.activations, "norm_ops": graph.norm_ops,
                      "branch_merges": graph.branch_merges, "nodes": graph.nodes}},
        "preflight": {"model_mode": mode, "seed": seed, "batch": batch,
                      "gradient": "random_unit_normal" if loss_fn is None else "loss_fn",
                      "input": inp, "output": {"rms": out_rms, "nonfinite": m.out_nonfinite},
                      "loss": m.loss, "layers": m.rows, "sites": m.sites},
    }
    return PreflightReport(jsonable(data))


# ------------------------------------------------------------------------------- CLI helpers
class _TargetError(ImportError):
    """A target that cannot be imported, said in one line."""


def load_factory(module: str, factory: str) -> Callable[[], Any]:
    """``FACTORY`` of ``MODULE:FACTORY`` or ``FILE.py:FACTORY`` (``gradwatch check``).

    A module is imported like ``python -m`` does, from the current folder first; a file is
    imported with its folder on ``sys.path`` (so that its sibling imports work). Errors are
    one line: ``ImportError`` for what cannot be imported, ``LookupError`` for a missing or
    uncallable factory.
    """
    import importlib
    import importlib.util
    import os
    import sys

    try:
        if module.endswith(".py") or os.sep in module or "/" in module:
            path = os.path.abspath(module)
            if not os.path.isfile(path):
                raise _TargetError(f"no such file: {module}")
            sys.path.insert(0, os.path.dirname(path))
            name = "_gradwatch_check_" + os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise _TargetError(f"cannot import {module} as Python code")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # dataclasses and pickling look their module up there
            spec.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                    raise _TargetError(f"no module named {module!r} (looked in the current "
                                      f"folder and on sys.path; give a file as "
                                      f"path/to/file.py:FACTORY)") from None
                raise
    except _TargetError:
        raise
    except Exception as exc:  # the user's module raised while being imported
        raise ImportError(f"importing {module} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = mod
    for part in factory.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise LookupError(f"{module} has no {factory!r}")
    if not callable(obj):
        raise LookupError(f"{module}:{factory} is a {type(obj).__name__}, not callable")
    return obj


def resolve_factory_result(factory: Callable[[], Any], name: str,
                           shape: tuple[int, ...] | None,
                           seed: int = 0) -> tuple[nn.Module, Any, Any]:
    """Call ``factory()`` (torch seeded with ``seed``) and return ``(model, batch, loss_fn)``.

    The factory returns a model, ``(model, example_batch)`` or ``(model, example_batch,
    loss_fn)``; for a bare model the batch is standard normal of ``shape`` (seed ``seed``)
    on the model's device and in its dtype.
    """
    torch.manual_seed(seed)  # the factory's init draws from it: reproducible predictions
    try:
        made = factory()
    except Exception as exc:
        raise ValueError(f"{name}() raised {type(exc).__name__}: {exc}") from exc
    if isinstance(made, nn.Module):
        if shape is None:
            raise ValueError(f"{name}() returned only a model: give --input-shape N,D,... (a "
                             f"standard normal batch) or return (model, example_batch) from it")
        param = next(made.parameters(), None)
        dtype = next((p.dtype for p in made.parameters() if p.is_floating_point()),
                     torch.float32)
        gen = torch.Generator().manual_seed(seed)
        batch = torch.randn(shape, generator=gen).to(
            device=param.device if param is not None else "cpu", dtype=dtype)
        return made, batch, None
    if isinstance(made, (tuple, list)) and len(made) in (2, 3) and isinstance(made[0], nn.Module):
        if shape is not None:
            raise ValueError(f"{name}() returns its own example batch: drop --input-shape")
        return made[0], made[1], made[2] if len(made) == 3 else None
    raise TypeError(f"{name}() must return an nn.Module, (model, example_batch) or (model, "
                    f"example_batch, loss_fn); got {_describe(made)}")
