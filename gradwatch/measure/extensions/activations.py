"""Activation sites: dead ReLU units and saturated sigmoid/tanh outputs, per call site.

Real models call activations as modules (``nn.ReLU``) and, more often, as functions
(``F.relu``, ``torch.tanh``, ``x.relu()``, ``inplace=True``) inside ``forward``. Module hooks
see only the first kind, so on detail steps a ``TorchFunctionMode`` is active for exactly
the duration of the watched model's forward (entered in its forward pre-hook, left in its
forward hook, also when the forward raises). It sees both kinds, because an activation
module's forward calls the functional form. Each call is attributed to the module in whose
forward it runs (the nearest caller frame whose ``self`` is a watched module) and to its
1-based call count there: ``Net.relu@2`` is the second ``relu`` of ``Net.forward``.

Per site and detail step, reduced on device and copied to the host with the rest of the
monitor's buffers (no sync here):

* ReLU family: the fraction of units (features of a Linear output, channels of a conv
  output) whose pre-activation is <= 0 for every sample of the batch (the unit outputs 0
  and passes no gradient), the fraction of units dead on ``dying_persist_measurements``
  consecutive measurements, and the mean of the dead units' largest pre-activation.
* sigmoid / tanh / hardtanh / softsign: the fraction of outputs within
  ``saturation_margin`` of the output range from a bound, and the fraction of units
  saturated for every sample.
* both: the pre-activation mean, std and RMS (the scale that causes saturation).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ...history import SITE_STATS, SiteInfo
from ..cadence import WARMUP
from ..distributed import is_sharded
from ..extension import Extension

__all__ = ["SITES_PER_STEP", "SITE_STATS", "ActivationMode", "ActivationSites",
           "activation_kind"]

SITES_PER_STEP = 32
"""Sites measured on one detail step. A model with more (a ResNet-50 has 49 ReLU sites,
an unrolled RNN cell three per timestep) has them measured in turns, each site on every
``ceil(sites / 32)``-th detail step, so that a detail step's cost stops growing with the
model; steps 0-7 measure every site, and ``overhead=None`` (a fixed cadence) measures
every site on every detail step."""

_RELU = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
         torch.Tensor.relu: "relu", torch.Tensor.relu_: "relu", F.relu6: "relu6"}
_SATURATING = {torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid",
               torch.Tensor.sigmoid: "sigmoid",
               torch.Tensor.sigmoid_: "sigmoid", F.sigmoid: "sigmoid",
               torch.special.expit: "sigmoid", torch.tanh: "tanh", torch.Tensor.tanh: "tanh",
               torch.Tensor.tanh_: "tanh", torch.tanh_: "tanh", F.tanh: "tanh",
               F.hardtanh: "hardtanh", F.hardsigmoid: "hardsigmoid",
               F.hardtanh_: "hardtanh", F.softsign: "softsign"}
_KIND: dict[Any, str] = {**_RELU, **_SATURATING}
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0),
          "hardsigmoid": (0.0, 1.0)}
"""Output range of each saturating activation (hardtanh's comes from its arguments)."""
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign,
                      nn.Hardsigmoid)
"""Activation modules: a site in one is named by the module's path, not a call count."""
RELU_KINDS = ("relu", "relu6")
CHANNEL_NORMS = ("BatchNorm1d", "GroupNorm", "InstanceNorm1d", "SyncBatchNorm")
"""Layers whose 3-D output is (N, C, L), like a Conv1d's: units are its channels."""


def activation_kind(func: Any) -> str | None:
    """The site kind of a torch function, or None if it is not a watched activation."""
    try:
        return _KIND.get(func)
    except TypeError:  # unhashable callables
        return None


def hardtanh_bounds(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, float]:
    lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return float(lo), float(hi)


class ActivationMode(TorchFunctionMode):
    """A ``TorchFunctionMode`` that passes every torch call through and hands activation
    calls (module or functional) to :meth:`activation`, which runs and measures them."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        kind = activation_kind(func)
        if kind is None:
            return func(*args, **kwargs)
        if kind == "hardtanh" and hardtanh_bounds(args, kwargs)[0] == 0.0:
            kind = "relu6"  # nn.ReLU6 calls hardtanh(x, 0, 6): a ReLU whose units can die
        return self.activation(func, kind, args, kwargs)

    def activation(self, func: Any, kind: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """Run one activation call (``func(*args, **kwargs)``) and return its result."""
        return func(*args, **kwargs)


class _SiteMode(ActivationMode):
    """The training-time mode: each activation call is measured as a site."""

    def __init__(self, sites: ActivationSites) -> None:
        super().__init__()
        self.sites = sites

    def activation(self, func: Any, kind: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        return self.sites.call(func, kind, args, kwargs)


class _Site:
    """Device-side state of one site: its buffer key and the per-unit dead streak."""

    def __init__(self, index: int, ordinal: int) -> None:
        self.index = index
        self.ordinal = ordinal  # the how-manieth site of this extension: its turn
        self.streak: torch.Tensor | None = None  # consecutive dead measurements per unit
        self.since: torch.Tensor | None = None  # step at which each unit's streak began
        self.step = -1  # the step of the last measurement

    @property
    def key(self) -> str:
        """The monitor buffer holding this site's rows."""
        return f"site{self.index}"


class ActivationSites(Extension):
    """Measures every activation call of the watched model's forward on detail steps."""

    def __init__(self) -> None:
        self._mode: _SiteMode | None = None
        self._depth = 0  # nested root forwards while the mode is active
        self._counts: dict[tuple[int, str], int] = {}
        self._sites: dict[tuple[int, int, str, int], _Site] = {}  # (root, caller, kind, k)
        self._root = 0  # the watched model whose forward is running
        self._turn, self._turn_step = 0, -1  # detail steps measured; the last one

    # ------------------------------------------------------------------ scope
    def on_root_forward_pre(self, module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> None:
        m = self.monitor
        if self._mode is not None:
            self._depth += 1
            return
        # Training forwards only: a prediction made with gradients on, in eval mode or
        # after the last step, says nothing about the units during training.
        if not torch.is_grad_enabled() or not m.is_detail_step() or m.suspended or \
                not module.training:
            return
        self._counts = {}
        if m.step != self._turn_step:
            self._turn, self._turn_step = self._turn + 1, m.step
        self._root = m.watched.root_of_module(module) or 0
        m.last_layer = -1
        self._mode = _SiteMode(self)
        self._mode.__enter__()
        self._depth = 1

    def on_root_forward(self, module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any], output: Any) -> None:
        if self._mode is None:
            return
        self._depth -= 1
        if self._depth <= 0:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    # ------------------------------------------------------------------ one call
    def call(self, func: Any, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the activation; measure it unless gradwatch failed or it is not a tensor."""
        x = args[0] if args else kwargs.get("input", kwargs.get("self"))
        m = self.monitor
        if not m.enabled or not isinstance(x, torch.Tensor) or not x.is_floating_point() \
                or x.dim() < 2 or x.numel() == 0:
            return func(*args, **kwargs)
        try:
            site, _, red = self._site(kind, x, func, args, kwargs)
            if not self._in_turn(site):
                return func(*args, **kwargs)
            pre = self._pre_stats(kind, x.detach(), red)
        except Exception as exc:  # measuring must never break the forward
            m.fail(exc)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        try:
            self._write(site, kind, pre, out, red)
        except Exception as exc:
            m.fail(exc)
        return out

    def _in_turn(self, site: _Site) -> bool:
        """Whether ``site`` is measured on this detail step (see ``SITES_PER_STEP``)."""
        m, n = self.monitor, len(self._sites)
        if n <= SITES_PER_STEP or m.step < WARMUP or m.options.overhead is None:
            return True
        turns = -(-n // SITES_PER_STEP)
        m.history.facts["site_turns"] = turns
        return site.ordinal % turns == self._turn % turns

    def _site(self, kind: str, x: torch.Tensor, func: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[_Site, int, tuple[int, ...]]:
        m = self.monitor
        module = self._caller()
        mod_id = id(module) if module is not None else 0
        count_key = (mod_id, kind)
        k = self._counts[count_key] = self._counts.get(count_key, 0) + 1
        key = (self._root, mod_id, kind, k)
        feeding = m.last_layer if m.last_layer >= 0 else None
        layer_type = m.history.layers[feeding].type if feeding is not None else ""
        # Channels of a conv output (N, C, ...), features of anything else (..., F).
        conv_like = layer_type.startswith("Conv") or layer_type in CHANNEL_NORMS
        unit_dim = 1 if x.dim() >= 4 or (x.dim() == 3 and conv_like) else x.dim() - 1
        red = tuple(d for d in range(x.dim()) if d != unit_dim)
        site = self._sites.get(key)
        if site is None:
            site = self._new_site(key, kind, module, x, unit_dim, feeding, args, kwargs)
        info = m.history.sites[site.index]
        if x.shape[unit_dim] != info.units:  # another width: a different use of the site
            info.units, info.unit_dim = int(x.shape[unit_dim]), unit_dim
            site.streak = site.since = None
        return site, unit_dim, red

    def _new_site(self, key: tuple[int, int, str, int], kind: str, module: nn.Module | None,
                  x: torch.Tensor, unit_dim: int, feeding: int | None,
                  args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Site:
        m = self.monitor
        path = m.watched.module_name(module) if module is not None else None
        functional = not isinstance(module, ACTIVATION_MODULES)
        if module is None:
            name = f"{kind}@{key[3]}"
        elif functional:
            base = path or type(module).__name__
            name = f"{base}.{kind}@{key[3]}"
        else:
            name = path or type(module).__name__
            if key[3] > 1:
                name = f"{name}@{key[3]}"
        root = self._root
        bounds = BOUNDS.get(kind)
        if kind == "hardtanh":
            bounds = hardtanh_bounds(args, kwargs)
        info = SiteInfo(name=name, kind=kind, module=path or "", root=root,
                        functional=functional, order=len(m.history.sites),
                        units=int(x.shape[unit_dim]), unit_dim=unit_dim, layer=feeding,
                        bounds=bounds, bias_init=self._bias_mean(feeding))
        m.history.sites.append(info)
        site = _Site(len(m.history.sites) - 1, len(self._sites))
        self._sites[key] = site
        m.add_buffer(site.key, (len(SITE_STATS),))
        return site

    def _caller(self) -> nn.Module | None:
        """The watched module in whose forward (or helper method) the call runs."""
        frame = sys._getframe(3)
        m = self.monitor
        for _ in range(64):
            if frame is None:
                break
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                obj = frame.f_locals.get("self")
                if isinstance(obj, nn.Module) and m.watched.module_name(obj) is not None:
                    return obj
            frame = frame.f_back
        return None

    def _bias_mean(self, layer: int | None) -> float | None:
        """Mean bias of the feeding layer (one host read when a site is first seen)."""
        bias = self._bias(layer)
        return None if bias is None else float(bias.detach().float().mean())

    def _bias(self, layer: int | None) -> torch.Tensor | None:
        if layer is None:
            return None
        m = self.monitor
        names = m.history.layers[layer].param_names
        for name, p in zip(names, m.watched.layer_params(layer), strict=False):
            if name.endswith("bias") and p.dim() == 1:
                return None if is_sharded(p) else p  # a shard has only some units' biases
        return None

    # ------------------------------------------------------------------ statistics
    @staticmethod
    def _pre_stats(kind: str, x: torch.Tensor, red: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Pre-activation statistics, taken before an in-place call overwrites the input."""
        xf = x.float()
        # Two one-pass reductions (a two-pass std costs 3x more on CPU); the std follows
        # from them. Precise enough for a diagnosis of scale, which is all it is used for.
        mean, square = xf.mean(), xf.square().mean()
        n = xf.numel()
        var = (square - mean * mean).clamp(min=0) * (n / max(n - 1, 1))
        out = {"mean": mean, "std": var.sqrt(), "rms": square.sqrt()}
        if kind in RELU_KINDS:
            # relu(x) == 0 exactly where x <= 0: a unit whose largest input over the batch
            # is <= 0 is dead for this batch (NaN inputs count as alive).
            out["unit_max"] = xf.amax(dim=red)
        return out

    def _write(self, site: _Site, kind: str, pre: dict[str, torch.Tensor], out: Any,
               red: tuple[int, ...]) -> None:
        m = self.monitor
        nan = pre["mean"].new_full((), float("nan"))
        if kind in RELU_KINDS:
            unit_max = pre["unit_max"]
            dead = unit_max <= 0
            deadf = dead.float()
            if site.streak is None or site.streak.shape != dead.shape:
                site.streak = torch.zeros_like(deadf)
                site.since = torch.full_like(deadf, float(m.step))
            if site.step == m.step:
                # Another forward in the same step (gradient accumulation): a unit stays
                # dead only if it is dead in every micro-batch; no second count.
                site.streak = site.streak * deadf
            else:
                site.streak = (site.streak + 1.0) * deadf
                site.since = torch.where(site.streak == 1.0, float(m.step), site.since)
            site.step = m.step
            k = float(m.thresholds.dying_persist_measurements)
            fraction, persistent = deadf.mean(), (site.streak >= k).float().mean()
            n_dead = deadf.sum()
            dead_max = torch.where(n_dead > 0, (unit_max * deadf).sum() / n_dead.clamp(min=1),
                                   nan)
        else:
            info = m.history.sites[site.index]
            lo, hi = info.bounds or (-1.0, 1.0)
            margin = m.thresholds.saturation_margin * (hi - lo)
            o = out.detach().float() if isinstance(out, torch.Tensor) else None
            if o is None:
                return
            sat = (o - lo <= margin) | (hi - o <= margin)
            fraction = sat.float().mean()
            persistent = sat.all(dim=red).float().mean() if red else fraction
            dead_max = nan
        row = torch.stack([fraction, persistent, pre["mean"], pre["std"], pre["rms"], dead_max])
        buf = m.buffer(site.key)
        buf[m.row()].copy_(row, non_blocking=True)

    # ------------------------------------------------------------------ host side
    def on_flush(self, steps: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        if not self._sites:
            return
        m = self.monitor
        n = len(m.history.sites)
        rows = np.full((len(steps), n, len(SITE_STATS)), np.nan)
        for site in self._sites.values():
            a = arrays.get(site.key)
            if a is not None:
                rows[:, site.index, :] = a
        measured = ~np.isnan(rows[:, :, 0]).all(axis=1)
        if not measured.any():
            return
        series = m.history.series("sites", {s: n for s in SITE_STATS})
        series.append(steps[measured], {s: rows[measured, :, j]
                                        for j, s in enumerate(SITE_STATS)})

    def on_snapshot(self) -> None:
        for site in self._sites.values():
            if site.streak is not None:
                info = self.monitor.history.sites[site.index]
                info.final = self._final(site, self._bias(info.layer))

    def on_root_gone(self, root: int) -> None:
        """Each site's state at the end of this model: which units are dead, since when,
        their bias; the model's sites are then dropped."""
        m = self.monitor
        for key in [k for k in self._sites if k[0] == root]:
            site = self._sites.pop(key)
            if site.streak is not None:
                info = m.history.sites[site.index]
                info.final = self._final(site, self._bias(info.layer))
            site.streak = site.since = None

    def _final(self, site: _Site, bias: torch.Tensor | None) -> dict[str, Any]:
        # One-off host reads, once per site.
        streak = site.streak.detach().cpu().numpy()  # type: ignore[union-attr]
        since = site.since.detach().cpu().numpy()  # type: ignore[union-attr]
        k = self.monitor.thresholds.dying_persist_measurements
        dead = np.nonzero(streak >= k)[0]
        final: dict[str, Any] = {"dead_units": len(dead), "units": len(streak),
                                 "dead_indices": dead[:16].tolist()}
        if len(dead):
            final["dead_since_step"] = int(np.min(since[dead]))
            final["dead_since_step_median"] = int(np.median(since[dead]))
            final["dead_measurements_median"] = int(np.median(streak[dead]))
        if bias is not None and bias.numel() == len(streak):
            b = bias.detach().float().cpu().numpy()
            alive = np.setdiff1d(np.arange(len(streak)), dead)
            final["bias_dead_mean"] = float(b[dead].mean()) if len(dead) else None
            final["bias_alive_mean"] = float(b[alive].mean()) if len(alive) else None
        return final

    def finish(self) -> None:
        """Close a forward that never returned; number the uses of shared modules."""
        if self._mode is not None:  # a forward that never returned
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        m = self.monitor
        # A module used several times (one nn.ReLU after every layer): number every use.
        uses: dict[tuple[str, int], int] = {}
        for info in m.history.sites:
            if not info.functional:
                uses[(info.module, info.root)] = uses.get((info.module, info.root), 0) + 1
        for info in m.history.sites:
            if not info.functional and uses[(info.module, info.root)] > 1 and "@" not in info.name:
                info.name = f"{info.name}@1"
        self._sites = {}
