"""One forward (every layer output and activation call measured) and one backward, on device.

Layers are the modules that own trainable parameters; module hooks record their output RMS
and, through a tensor hook, the gradient norm at their output. Activation calls, modules
and functional calls alike, are seen by a ``TorchFunctionMode`` active only during the
forward; the table of which torch functions are activations (and ReLU6's hardtanh
bounds) is the one training runs use, in :mod:`gradwatch.measure.extensions.activations`.
Everything stays on device until :func:`to_host` copies it in one transfer per device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..measure import stats
from ..measure.extensions.activations import (
    ACTIVATION_MODULES,
    BOUNDS,
    CHANNEL_NORMS,
    RELU_KINDS,
    ActivationMode,
    hardtanh_bounds,
)
from ..measure.structure import walk_graph
from .batch import call, describe, first_float, tensors


@dataclasses.dataclass
class Layer:
    """A module that owns trainable parameters, and what one forward/backward showed."""

    name: str
    path: str  # for model.get_submodule(): "" for the model itself
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
class Site:
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


class Probe(ActivationMode):
    """Hooks for one forward/backward: a module stack, layer outputs, activation sites.

    Module hooks are attached for the whole preflight (:meth:`attached`); as a
    ``TorchFunctionMode``, entered only around the forward, the probe sees every torch call
    and measures the activation calls. ``margin`` is ``saturation_margin``: an output within
    this fraction of the activation's range from a bound is saturated.
    """

    def __init__(self, model: nn.Module, margin: float) -> None:
        super().__init__()
        root = type(model).__name__
        self.names = {id(m): name or root for name, m in model.named_modules()}
        self.layers: list[Layer] = []
        self.index: dict[int, int] = {}
        seen: set[int] = set()
        for name, m in model.named_modules():
            own = [(n, p) for n, p in m.named_parameters(recurse=False)
                   if p.requires_grad and id(p) not in seen]
            if own:
                seen.update(id(p) for _, p in own)
                self.index[id(m)] = len(self.layers)
                self.layers.append(Layer(name or root, name, m, own))
        self.margin = margin
        self.stack: list[nn.Module] = []
        self.sites: list[Site] = []
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
        out = first_float(output)
        self.last_layer, self.last_output = idx, out
        if out is None or out.numel() == 0:
            return
        with torch.no_grad():
            layer.out.append((stats.rms(out), out.numel(),
                              (~torch.isfinite(out.detach())).sum()))
        if out.requires_grad:
            def grad_hook(g: torch.Tensor, layer: Layer = layer) -> None:
                layer.out_grad.append(torch.linalg.vector_norm(g.detach(),
                                                               dtype=torch.float64))
            self.handles.append(out.register_hook(grad_hook))

    # --------------------------------------------------------------------- activations
    def activation(self, func: Any, kind: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """Run an activation call; record its site's dead units or saturated outputs."""
        x = args[0] if args else kwargs.get("input", kwargs.get("self"))
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 \
                or x.numel() == 0:
            return func(*args, **kwargs)
        bounds = BOUNDS.get(kind)
        if kind == "hardtanh":
            bounds = hardtanh_bounds(args, kwargs)
            if bounds[0] == 0.0:  # nn.ReLU6 calls hardtanh(x, 0, 6): a ReLU whose units die
                kind = "relu6"
        module = self.stack[-1] if self.stack else None
        feeding = self.last_layer
        ftype = type(self.layers[feeding].module).__name__ if feeding is not None else ""
        # Channels of a conv output (N, C, ...), features of anything else (..., F).
        channels = ftype.startswith("Conv") or ftype in CHANNEL_NORMS
        unit_dim = 1 if x.dim() >= 4 or (x.dim() == 3 and channels) else x.dim() - 1
        units = int(x.shape[unit_dim])
        st, masks = self._pre_stats(kind, x, unit_dim, feeding)
        out = func(*args, **kwargs)
        if kind not in RELU_KINDS and isinstance(out, torch.Tensor) and bounds is not None:
            lo, hi = bounds
            margin = self.margin * (hi - lo)
            with torch.no_grad():
                o = out.detach()
                st["saturated_fraction"] = ((o - lo <= margin) | (hi - o <= margin)).double().mean()
        key = (id(module), kind)
        k = self.counts[key] = self.counts.get(key, 0) + 1
        path = self.names.get(id(module), "") if module is not None else ""
        functional = not isinstance(module, ACTIVATION_MODULES)
        name = f"{path}.{kind}@{k}" if functional else path
        if module is None:
            name = f"{kind}@{k}"
        self.sites.append(Site(name, kind, path, functional, feeding, units, unit_dim,
                               x.numel() // max(1, units), st, masks))
        return out

    def _pre_stats(self, kind: str, x: torch.Tensor, unit_dim: int, feeding: int | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Pre-activation statistics and dead-unit masks, taken before an in-place call
        overwrites the input."""
        red = tuple(d for d in range(x.dim()) if d != unit_dim)
        xd = x.detach()
        with torch.no_grad():
            # float64 reductions without a float64 copy of the activation
            n = xd.numel()
            rms = torch.linalg.vector_norm(xd, dtype=torch.float64) / math.sqrt(n)
            mean = xd.mean(dtype=torch.float64)
            var = (rms.square() - mean.square()).clamp(min=0) * (n / max(1, n - 1))
            st = {"pre_mean": mean, "pre_std": var.sqrt(), "pre_rms": rms}
            masks: dict[str, torch.Tensor] = {}
            if kind not in RELU_KINDS:
                return st, masks
            # relu(x) == 0 exactly where x <= 0: a unit whose largest input over the batch
            # is <= 0 outputs 0 for every sample and passes no gradient.
            dead = xd.amax(dim=red) <= 0
            masks["dead"] = dead
            st["dead_fraction"] = dead.double().mean()
            bias = self.layers[feeding].bias if feeding is not None else None
            units = int(x.shape[unit_dim])
            if bias is not None and x is self.last_output and bias.numel() == units:
                shape = [1] * x.dim()
                shape[unit_dim] = units
                masks["revived"] = dead & ((xd - bias.detach().view(shape)).amax(red) > 0)
                masks["bias"] = bias.detach().clone()
        return st, masks

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


# ------------------------------------------------------------------------------- run
def forward_backward(model: nn.Module, inputs: Any, target: Any,
                     loss_fn: Callable[..., Any] | None, probe: Probe,
                     seed: int) -> dict[str, Any]:
    """One forward (activations spied on) and one backward; device-side measurements."""
    try:
        with probe:  # the activation calls of this forward, and only of it
            output = call(model, inputs)
    except Exception as exc:
        hint = ("; if the batch is (inputs, target), pass loss_fn or only the inputs"
                if loss_fn is None and isinstance(inputs, (tuple, list)) and len(inputs) == 2
                else "")
        raise ValueError(f"the model's forward raised {type(exc).__name__}: {exc} (on the "
                         f"example batch {describe(inputs)}{hint})") from exc
    surrogate, loss = _surrogate(output, target, loss_fn, seed)
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
    x = first_float(inputs)
    with torch.no_grad():
        inp = None if x is None else {"rms": stats.rms(x), "mean": x.double().mean(),
                                      "std": x.double().std() if x.numel() > 1 else
                                      x.new_zeros((), dtype=torch.float64)}
        outputs = [o.detach() for o in tensors(output) if o.is_floating_point()]
        out = {"rms": [stats.rms(o) for o in outputs], "numel": [o.numel() for o in outputs],
               "nonfinite": [(~torch.isfinite(o)).sum() for o in outputs]}
    sites = [{**s.stats, **s.masks} for s in probe.sites]
    return {"layers": raw_layers, "sites": sites, "input": inp, "output": out,
            "loss": None if loss is None else loss.detach().double().reshape(()),
            "graph": graph}


def _surrogate(output: Any, target: Any, loss_fn: Callable[..., Any] | None,
               seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scalar to differentiate, and the loss when there is one.

    Without ``loss_fn``: the sum of every differentiable floating output times a fixed-seed
    N(0, 1) tensor, whose gradient at the output is that random tensor.
    """
    if loss_fn is None:
        outs = [o for o in tensors(output) if o.is_floating_point() and o.requires_grad]
        if not outs:
            raise ValueError(f"the model's output ({describe(output)}) has no floating tensor "
                             f"that depends on a trainable parameter: nothing to backpropagate")
        gen = torch.Generator().manual_seed(seed)
        total = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
                    for o in outs)
        return total, None  # type: ignore[return-value]
    try:
        loss = loss_fn(output, target)
    except Exception as exc:
        raise ValueError(f"loss_fn raised {type(exc).__name__}: {exc} (preflight calls "
                         f"loss_fn(output, target) with output {describe(output)} and "
                         f"target {describe(target)})") from exc
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}: "
                         f"reduce it (e.g. reduction='mean')")
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on any trainable parameter: nothing "
                         "to backpropagate")
    return loss.reshape(()), loss


def to_host(tree: Any) -> Any:
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
        # The one host sync of preflight per device.
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
