"""Remedies that change the architecture: normalisation layers, skip connections."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .base import (
    ACT_MODULES,
    SWAPS,
    WEIGHT_LAYERS,
    NotApplicable,
    RemedyEntry,
    swap_optimizer,
)

__all__ = ["ENTRIES"]


def _plain_sequentials(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """``nn.Sequential`` modules (the model or its descendants) of weight layers and
    activations/dropout only, with at least two weight layers and no normalisation."""
    allowed = WEIGHT_LAYERS + tuple(ACT_MODULES) + (nn.Dropout, nn.Flatten, nn.Identity)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential) and all(isinstance(c, allowed) for c in m) and \
                sum(isinstance(c, WEIGHT_LAYERS) for c in m) >= 2:
            out.append((name, m))
    return out


def _norm_for(layer: nn.Module, kind: str = "batch") -> nn.Module | None:
    """The normalisation inserted after ``layer``: BatchNorm over the batch, or (``kind``
    "layer") over each sample's features: LayerNorm after a Linear, GroupNorm with one group
    after a convolution."""
    p = layer.weight
    kw = {"device": p.device, "dtype": p.dtype}
    if kind == "layer":
        if isinstance(layer, nn.Linear):
            return nn.LayerNorm(layer.out_features, **kw)
        if isinstance(layer, WEIGHT_LAYERS):
            return nn.GroupNorm(1, layer.out_channels, **kw)
        return None
    if isinstance(layer, nn.Linear):
        return nn.BatchNorm1d(layer.out_features, **kw)
    if isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)):
        return nn.BatchNorm1d(layer.out_channels, **kw)
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        return nn.BatchNorm2d(layer.out_channels, **kw)
    if isinstance(layer, (nn.Conv3d, nn.ConvTranspose3d)):
        return nn.BatchNorm3d(layer.out_channels, **kw)
    return None


def _batchnorm_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    seqs = _plain_sequentials(model)
    if not seqs:
        raise NotApplicable("no plain nn.Sequential of Linear/convolution layers and "
                            "activations: add nn.BatchNorm1d/2d (or nn.LayerNorm) after each "
                            "hidden layer in the model's __init__")
    kind = str(params.get("norm", "auto"))
    if kind not in ("auto", "batch", "layer"):
        raise ValueError(f"norm must be 'auto', 'batch' or 'layer', got {kind!r}")
    shape = params.get("input_shape")
    if kind == "auto":
        # BatchNorm1d reads dim 1 as the features: a Linear stack fed (batch, time,
        # features) needs LayerNorm, and so does training on single samples.
        first = next((c for _, seq in seqs for c in seq if isinstance(c, WEIGHT_LAYERS)), None)
        kind = "layer" if isinstance(shape, list) and (
            (len(shape) > 2 and isinstance(first, nn.Linear)) or (shape and shape[0] == 1)) \
            else "batch"
    label = {"batch": "BatchNorm", "layer": "LayerNorm/GroupNorm"}[kind]
    new: list[nn.Parameter] = []
    for name, seq in seqs:
        children = list(seq)
        last = max(i for i, c in enumerate(children) if isinstance(c, WEIGHT_LAYERS))
        layers: list[nn.Module] = []
        added = 0
        for i, c in enumerate(children):
            layers.append(c)
            norm = _norm_for(c, kind) if isinstance(c, WEIGHT_LAYERS) and i < last else None
            if norm is not None:
                norm.train(seq.training)
                layers.append(norm)
                new += list(norm.parameters())
                added += 1
        seq._modules = OrderedDict((str(i), m) for i, m in enumerate(layers))
        changes.append(f"inserted {added} {label} layer(s) after the hidden layers of "
                       f"{name or 'the model'} (nn.Sequential, re-indexed: now "
                       f"{len(layers)} modules)")
    SWAPS.setdefault(model, []).append(([], new))


class _Residual(nn.Module):
    """``x + f(x)``: a skip connection around a block that keeps the width."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def _residual_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    done = 0
    for name, seq in _plain_sequentials(model):
        children = list(seq)
        layers: list[nn.Module] = []
        i = wrapped = 0
        while i < len(children):
            c = children[i]
            nxt = children[i + 1] if i + 1 < len(children) else None
            square = isinstance(c, nn.Linear) and c.in_features == c.out_features
            if square and nxt is not None and type(nxt) in ACT_MODULES:
                layers.append(_Residual(nn.Sequential(c, nxt)))
                wrapped += 1
                i += 2
            else:
                layers.append(c)
                i += 1
        if wrapped:
            seq._modules = OrderedDict((str(k), m) for k, m in enumerate(layers))
            changes.append(f"wrapped {wrapped} width-preserving Linear+activation block(s) of "
                           f"{name or 'the model'} in skip connections (x + f(x)); same "
                           "parameters")
            done += wrapped
    if not done:
        raise NotApplicable("no plain nn.Sequential with width-preserving Linear+activation "
                            "blocks; add skip connections in the model's code")


ENTRIES = [
    RemedyEntry(
        "batch_norm",
        lambda p: ("normalise each layer's output (BatchNorm1d for MLPs, BatchNorm2d for "
                   "convolutions, LayerNorm for sequence models) so that its scale cannot "
                   "compound with depth"),
        lambda p: ("layers = []\n"
                   "for m in model:  # an nn.Sequential\n"
                   "    layers.append(m)\n"
                   "    if isinstance(m, nn.Linear) and m is not model[-1]:\n"
                   + ("        layers.append(nn.LayerNorm(m.out_features))\n"
                      if p.get("norm") == "layer" else
                      "        layers.append(nn.BatchNorm1d(m.out_features))  # or "
                      "nn.LayerNorm for (batch, time, features) inputs\n") +
                   "model = nn.Sequential(*layers)  # re-create the optimizer afterwards"),
        to_model=_batchnorm_model,
        to_optimizer=swap_optimizer),
    RemedyEntry(
        "residual_connections",
        lambda p: ("add skip connections (x + f(x)) so that gradients reach early layers "
                   "through an identity path whatever the depth"),
        lambda p: ("class Residual(nn.Module):\n"
                   "    def __init__(self, width):\n"
                   "        super().__init__()\n"
                   "        self.f = nn.Sequential(nn.Linear(width, width), nn.ReLU())\n"
                   "    def forward(self, x):\n"
                   "        return x + self.f(x)\n"
                   f"model = nn.Sequential(nn.Linear(n_in, {p.get('width', 'width')}), "
                   f"*[Residual({p.get('width', 'width')}) for _ in range({p.get('depth', 8)})], "
                   f"nn.Linear({p.get('width', 'width')}, n_out))"),
        to_model=_residual_model),
]
