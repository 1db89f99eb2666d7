"""One entry per remedy: its id, why it helps, and runnable code built from measurements.

Detectors ask for remedies by id with :func:`remedy`, passing the numbers measured on
this run (a clipping threshold, a learning rate, the input statistics); a test checks that
every id a detector names is here and that no entry is orphaned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..findings import Remedy

__all__ = ["CATALOGUE", "RemedyEntry", "remedy"]

_LAYERS = "(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)"


@dataclasses.dataclass(frozen=True)
class RemedyEntry:
    """A remedy: ``text`` and ``code`` are templates filled with measured parameters."""

    id: str
    text: Callable[[dict[str, Any]], str]
    code: Callable[[dict[str, Any]], str]

    def describe(self, **params: Any) -> Remedy:
        return Remedy(self.id, self.text(params), self.code(params))


def _kaiming_code(p: dict[str, Any]) -> str:
    act = p.get("nonlinearity", "relu")
    return ("for m in model.modules():\n"
            f"    if isinstance(m, {_LAYERS}):\n"
            f"        nn.init.kaiming_normal_(m.weight, nonlinearity=\"{act}\")\n"
            "        if m.bias is not None:\n"
            "            nn.init.zeros_(m.bias)")


def _xavier_code(p: dict[str, Any]) -> str:
    act = p.get("nonlinearity", "tanh")
    return ("for m in model.modules():\n"
            f"    if isinstance(m, {_LAYERS}):\n"
            f"        nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain(\"{act}\"))\n"
            "        if m.bias is not None:\n"
            "            nn.init.zeros_(m.bias)")


def _swap_code(p: dict[str, Any]) -> str:
    old = p.get("old", "nn.Sigmoid")
    return ("def swap_activations(module):\n"
            "    for name, child in module.named_children():\n"
            f"        if isinstance(child, {old}):\n"
            "            setattr(module, name, nn.LeakyReLU(0.01))\n"
            "        else:\n"
            "            swap_activations(child)\n"
            "swap_activations(model)  # functional calls: use F.leaky_relu(x, 0.01)\n"
            "# then re-initialise with Kaiming (nonlinearity=\"leaky_relu\")")


CATALOGUE: dict[str, RemedyEntry] = {e.id: e for e in [
    RemedyEntry(
        "kaiming_init",
        lambda p: ("re-initialise weights with Kaiming/He init (std = gain/sqrt(fan_in)), "
                   "which keeps the signal's variance constant through ReLU-family layers"
                   + (f"; measured init is {p['ratio']}x that scale" if "ratio" in p else "")),
        _kaiming_code),
    RemedyEntry(
        "xavier_init",
        lambda p: ("re-initialise weights with Xavier/Glorot init, which balances forward "
                   "and backward variance for sigmoid/tanh layers"),
        _xavier_code),
    RemedyEntry(
        "leaky_relu",
        lambda p: ("replace saturating activations with LeakyReLU: its derivative is 1 for "
                   "positive inputs and 0.01 (never 0) for negative ones"),
        _swap_code),
    RemedyEntry(
        "batch_norm",
        lambda p: ("normalise each layer's output (BatchNorm1d for MLPs, BatchNorm2d for "
                   "convolutions, LayerNorm for sequence models) so that its scale cannot "
                   "compound with depth"),
        lambda p: ("layers = []\n"
                   "for m in model:  # an nn.Sequential\n"
                   "    layers.append(m)\n"
                   "    if isinstance(m, nn.Linear) and m is not model[-1]:\n"
                   "        layers.append(nn.BatchNorm1d(m.out_features))\n"
                   "model = nn.Sequential(*layers)  # re-create the optimizer afterwards")),
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
                   f"nn.Linear({p.get('width', 'width')}, n_out))")),
    RemedyEntry(
        "clip_grad_norm",
        lambda p: (f"clip the total gradient norm at {p['max_norm']}, the median norm of this "
                   f"run's healthy early steps, between backward() and step()"),
        lambda p: (f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={p['max_norm']})"
                   "  # after loss.backward(), before optimizer.step()")),
    RemedyEntry(
        "lower_learning_rate",
        lambda p: (f"lower the learning rate from {p['old_lr']} to {p['lr']}: that brings the "
                   f"measured update size ({p['measured']} of the weights) near "
                   f"{p['target']} per step"),
        lambda p: ("for group in optimizer.param_groups:\n"
                   f"    group[\"lr\"] *= {p['factor']}  # {p['old_lr']} -> {p['lr']}")),
    RemedyEntry(
        "standardize_inputs",
        lambda p: (f"standardise the inputs (measured mean {p['mean']}, std {p['std']}) so that "
                   f"the first layer sees unit-scale features"),
        lambda p: (f"x = (x - {p['mean']}) / {p['std']}  # better: per-feature statistics "
                   "of the training set, x = (x - x_train.mean(0)) / x_train.std(0)")),
    RemedyEntry(
        "adaptive_optimizer",
        lambda p: ("use Adam, whose per-parameter step size does not shrink with the "
                   "gradient's scale, so starved layers still move"),
        lambda p: "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)"),
    RemedyEntry(
        "detect_anomaly",
        lambda p: ("run a few steps with anomaly detection to get the traceback of the "
                   "operation that first produced NaN/Inf"),
        lambda p: ("with torch.autograd.detect_anomaly():\n"
                   "    loss = loss_fn(model(x), y)\n"
                   "    loss.backward()")),
    RemedyEntry(
        "assert_finite_inputs",
        lambda p: ("check every batch before the forward pass and fix the data pipeline "
                   "(missing values, division by a zero std in preprocessing, bad records)"),
        lambda p: ("assert torch.isfinite(x).all(), "
                   "f\"non-finite input batch: {(~torch.isfinite(x)).sum()} bad values\"")),
    RemedyEntry(
        "guard_nonfinite_loss",
        lambda p: ("skip the update when the loss is not finite, so that one bad batch "
                   "cannot turn every weight into NaN"),
        lambda p: ("if torch.isfinite(loss):\n"
                   "    optimizer.step()\n"
                   "optimizer.zero_grad()")),
]}


def remedy(remedy_id: str, **params: Any) -> Remedy:
    """Build the catalogue's remedy ``remedy_id`` with this run's measured parameters."""
    try:
        entry = CATALOGUE[remedy_id]
    except KeyError:
        raise KeyError(f"unknown remedy {remedy_id!r}; known: {', '.join(CATALOGUE)}") from None
    return entry.describe(**params)
