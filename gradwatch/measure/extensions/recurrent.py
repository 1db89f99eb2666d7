"""Gradient flow through time: the gradient that reaches each timestep's input of an RNN.

A vanilla RNN that cannot carry information across 100 steps has per-module gradient norms
of ordinary size: its weights get gradient from the last few timesteps. Only the gradient
of the loss with respect to each timestep's *input* shows how far back the backward signal
reaches. On detail steps with grad enabled, the forward pre-hook of every ``nn.RNN`` /
``nn.LSTM`` / ``nn.GRU`` hands the module an input whose gradient it can see:

* an input that already requires grad (an ``nn.Embedding`` output, a previous layer's
  output) is passed as ``x.view_as(x)``: autograd passes the gradient through a view
  unchanged, so every gradient upstream stays bit-identical, and the hook sees only the
  part of the gradient that comes through this module (not other uses of ``x``);
* an input that does not (raw data) is passed as ``x.detach().requires_grad_()``, a new
  leaf with the same values: the module's outputs and its weights' gradients are
  unchanged; backward additionally computes the gradient of this copy (one more matrix
  product per timestep, on detail steps only).

A tensor hook on that input reduces ``dL/dx`` to one L2 norm per timestep (over batch and
features), on device, and writes a fixed-size row: the sequence length, the mean norm over
all timesteps, and the norms at :data:`PROFILE_POINTS` evenly spaced timesteps that always
include the first and the last. Memory is bounded whatever the length. Nothing is read on
the host until the monitor's flush.

What this measures, and what it does not: ``||dL/dx_0|| / ||dL/dx_{T-1}||`` compares the
gradient reaching the first timestep with the gradient reaching the last. With a loss on
the last output (many-to-one: classification of a sequence) every gradient enters at the
end, so the ratio is how much of it survives the trip back through ``T - 1`` steps. With a
loss on every timestep (sequence to sequence) each input also gets its own direct
gradient, so the ratio stays near 1 even when the long-range part of the gradient
vanishes: this measure cannot see that (a detector reads a near-1 ratio as "not starved",
never as "carries long dependencies"). A ratio far *above* 1 is meaningful for both: the
early inputs get far more gradient than the late ones, which only a growing long-range
part can cause (explosion through time).

Known limits: ``PackedSequence`` inputs are not measured (counted in the facts); a module
called several times in one step keeps one call's measurement; bidirectional modules are
measured but not judged (their reverse direction gives the first timestep a direct path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ...history import PROFILE_POINTS, sampled_timesteps
from ..extension import Extension

__all__ = ["COLUMNS", "PROFILE_POINTS", "RecurrentGradients", "sampled_timesteps"]


COLUMNS = 2 + PROFILE_POINTS
"""Per module and step: sequence length, mean norm over all timesteps, the sampled norms."""

_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


def _sampled_index(length: int, device: torch.device) -> torch.Tensor:
    """:func:`sampled_timesteps` built on ``device`` (no host-to-device copy, so no sync)."""
    if length <= PROFILE_POINTS:
        return torch.arange(length, device=device)
    i = torch.arange(PROFILE_POINTS, device=device)
    return (i * (length - 1) + (PROFILE_POINTS - 1) // 2) // (PROFILE_POINTS - 1)


def per_timestep_norms(grad: torch.Tensor, time_dim: int) -> torch.Tensor:
    """L2 norm of ``grad`` over everything but ``time_dim``, one per timestep, in float32 or
    wider; each timestep is scaled by its largest element first, so that gradients of 1e-30
    (whose squares underflow float32) or 1e30 (whose squares overflow) keep their norm."""
    g = grad.detach()
    if g.dtype not in (torch.float32, torch.float64):
        g = g.float()
    g = g.movedim(time_dim, 0).reshape(g.shape[time_dim], -1)
    scale = g.abs().amax(dim=1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.linalg.vector_norm(g / safe, dim=1) * scale[:, 0]


class _Module:
    """What the extension keeps about one recurrent module while watching."""

    def __init__(self, index: int, module: nn.RNNBase, name: str, layer: int | None,
                 root: int) -> None:
        self.index, self.key = index, f"through_time{index}"
        self.name, self.layer, self.root = name, layer, root
        # The module's settings and parameters, not the module: it may be the root itself,
        # which gradwatch never keeps alive (its parameters do not reference it).
        self.config: dict[str, Any] = {
            "type": type(module).__name__, "mode": module.mode,
            "nonlinearity": getattr(module, "nonlinearity", None),
            "input_size": module.input_size, "hidden_size": module.hidden_size,
            "num_layers": module.num_layers, "bidirectional": module.bidirectional,
            "batch_first": module.batch_first}
        self.params: list[tuple[str, torch.Tensor]] | None = list(module.named_parameters())
        self.initial: dict[str, torch.Tensor] = {}  # device copies taken when first seen
        self.packed = 0  # calls with a PackedSequence input (not measured)
        self.lengths: list[int] = []  # [shortest, longest] length measured (host side)


class RecurrentGradients(Extension):
    """Measures the input gradient per timestep of every watched RNN/LSTM/GRU on detail steps."""

    def __init__(self) -> None:
        self._modules: dict[int, _Module] = {}  # id(module) -> entry, while its root lives
        self._done: list[_Module] = []  # entries of models that died (their facts taken)

    def wants_layer_pre(self, module: nn.Module) -> bool:
        return isinstance(module, _TYPES)

    # ------------------------------------------------------------------ forward
    def on_layer_forward_pre(self, module: nn.Module, args: tuple[Any, ...]
                             ) -> tuple[Any, ...] | None:
        m = self.monitor
        if not isinstance(module, _TYPES) or not args or not torch.is_grad_enabled() \
                or not m.is_detail_step():
            return None
        x = args[0]
        entry = self._entry(module)
        if isinstance(x, PackedSequence):
            entry.packed += 1
            return None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() not in (2, 3):
            return None
        # Unbatched input is (T, F) whatever batch_first says.
        time_dim = 1 if x.dim() == 3 and module.batch_first else 0
        length = int(x.shape[time_dim])
        if length < 2 or x.numel() == 0:
            return None
        if x.requires_grad:
            watched = x.view_as(x)
        elif any(p.requires_grad for p in module.parameters()):
            watched = x.detach().requires_grad_()
            self.monitor.own_tensors.add(id(watched))  # a probe, not a parameter to adopt
        else:
            return None  # a frozen module on data: no gradient flows through it at all
        watched.register_hook(self._hook(entry.key, m.step, time_dim, length))
        return (watched, *args[1:])

    def _entry(self, module: nn.RNNBase) -> _Module:
        entry = self._modules.get(id(module))
        if entry is None:
            m = self.monitor
            layer = m.watched.layer_of_module(module)
            root = m.history.layers[layer].root if layer is not None else 0
            entry = self._modules[id(module)] = _Module(
                len(self._modules) + len(self._done), module, m.watched.module_name(module) or "",
                layer, root)
            m.add_buffer(entry.key, (COLUMNS,))
            entry.initial = _weights(entry.config, entry.params or [])
        return entry

    def _hook(self, key: str, step: int, time_dim: int, length: int
              ) -> Callable[[torch.Tensor], None]:
        m = self.monitor

        def hook(grad: torch.Tensor) -> None:
            # Runs inside the user's backward: it must never raise, and returns None so
            # that the gradient flows on unchanged.
            if not m.enabled or m.finished is not None or m.step != step:
                return
            try:
                norms = per_timestep_norms(grad, time_dim)
                dev = norms.device
                head = torch.stack([torch.full((), float(length), dtype=norms.dtype,
                                               device=dev), norms.mean()])
                sampled = norms.index_select(0, _sampled_index(length, dev))
                pad = torch.full((PROFILE_POINTS - sampled.shape[0],), float("nan"),
                                 dtype=norms.dtype, device=dev)
                row = torch.cat([head, sampled, pad])
                m.buffer(key)[m.row()].copy_(row, non_blocking=True)
            except Exception as exc:  # measuring must never break the user's backward
                m.fail(exc)
                if m.options.strict:  # unless the user asked for exactly that
                    raise

        return hook

    # ------------------------------------------------------------------ host side
    def on_flush(self, steps: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        if not self._modules and not self._done:
            return
        entries = sorted([*self._modules.values(), *self._done], key=lambda e: e.index)
        n = len(entries)
        length = np.full((len(steps), n), np.nan)
        mean = np.full((len(steps), n), np.nan)
        profile = np.full((len(steps), n * PROFILE_POINTS), np.nan)
        for e in entries:
            a = arrays.get(e.key)
            if a is None:
                continue
            length[:, e.index], mean[:, e.index] = a[:, 0], a[:, 1]
            profile[:, e.index * PROFILE_POINTS:(e.index + 1) * PROFILE_POINTS] = a[:, 2:]
            seen = a[np.isfinite(a[:, 0]), 0].astype(int).tolist()
            if seen:
                e.lengths = [min(seen + e.lengths), max(seen + e.lengths)]
        measured = np.isfinite(length).any(axis=1)
        if not measured.any():
            return
        series = self.monitor.history.series(
            "through_time", {"length": n, "mean": n, "profile": n * PROFILE_POINTS})
        series.append(steps[measured], {"length": length[measured], "mean": mean[measured],
                                        "profile": profile[measured]})

    def _record(self, e: _Module) -> None:
        facts = self.monitor.history.facts.setdefault("recurrent", [])
        facts[:] = [f for f in facts if f["column"] != e.index]
        facts.append({
            "column": e.index, "name": e.name, "layer": e.layer, "root": e.root,
            **e.config, "packed_calls": e.packed, "lengths": e.lengths,
            "initial": _describe(e.config["mode"], e.initial),
            "final": _describe(e.config["mode"], _weights(e.config, e.params or [])),
        })
        facts.sort(key=lambda f: f["column"])

    def on_snapshot(self) -> None:
        for e in self._modules.values():
            if e.params is not None:
                self._record(e)

    def on_root_gone(self, root: int) -> None:
        """Structural facts of each measured module of this model, its gate biases and
        recurrent weights when first seen and at the end (one-off host reads)."""
        for key, e in list(self._modules.items()):
            if e.root != root or e.params is None:
                continue
            self._record(e)
            e.params, e.initial = None, {}
            self._done.append(self._modules.pop(key))


def _weights(config: dict[str, Any], params: list[tuple[str, torch.Tensor]]
             ) -> dict[str, torch.Tensor]:
    """Device copies of what the causes judge: the recurrent matrices of a vanilla RNN, the
    summed forget-gate (LSTM) / update-gate (GRU) biases of every layer (no host sync)."""
    out: dict[str, torch.Tensor] = {}
    h, mode = config["hidden_size"], config["mode"]
    with torch.no_grad():
        for name, p in params:
            if "reverse" in name:
                continue
            layer = name.rsplit("_l", 1)[-1]
            if mode.startswith("RNN") and name.startswith("weight_hh"):
                out[f"weight_hh_l{layer}"] = p.detach().clone()
            elif mode in ("LSTM", "GRU") and name.startswith("bias_"):
                # Gate order: LSTM (input, forget, cell, output), GRU (reset, update, new):
                # the second block is the gate that decides how much old state is kept.
                gate = p.detach()[h: 2 * h].clone()
                key = f"gate_bias_l{layer}"
                out[key] = out[key] + gate if key in out else gate
    return out


def _describe(mode: str, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Host numbers from :func:`_weights`: spectral radius and largest singular value of each
    recurrent matrix, mean of each layer's summed gate bias."""
    out: dict[str, Any] = {}
    radius, sigma, gate = [], [], []
    for key, w in sorted(weights.items()):
        w64 = w.detach().to("cpu", torch.float64)
        if not torch.isfinite(w64).all():
            (radius if key.startswith("weight") else gate).append(None)
            if key.startswith("weight"):
                sigma.append(None)
            continue
        if key.startswith("weight_hh"):
            radius.append(float(torch.linalg.eigvals(w64).abs().max()))
            sigma.append(float(torch.linalg.matrix_norm(w64, ord=2)))
        else:
            gate.append(float(w64.mean()))
    if radius:
        out["spectral_radius"], out["largest_singular_value"] = radius, sigma
    if gate:
        out["forget_gate_bias" if mode == "LSTM" else "update_gate_bias"] = gate
    return out
