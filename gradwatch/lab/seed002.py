"""Seed 002's three experiments (SEEDS.md section 6), exactly as the seed writes them.

The seed trains a 10-block MLP (``Linear(., 10)`` + activation, ten times, then
``Linear(10, 1)``) full batch with MSE and SGD on ``y = 3x + 2 + noise``, and compares:

1. ``sigmoid_vs_relu``: sigmoid vs ReLU, PyTorch's default init, lr 0.01, 500 epochs;
2. ``large_init_clipping``: every weight ``N(0, 10)``, ReLU, lr 0.1, 50 epochs, without vs
   with ``clip_grad_norm_(max_norm=10)``;
3. ``xavier_vs_kaiming``: Xavier-uniform vs Kaiming-uniform weights, ReLU, lr 0.01,
   500 epochs.

Each variant is a pure function ``run(seed) -> RunResult``: it seeds torch, builds the
model, trains it under :func:`gradwatch.watch` and returns the losses and the report. The
seed's claims are kept verbatim (translated) so that a reader can compare them with what
gradwatch measures; SEEDS.md section 7 says which of them do not hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch.report import Report

__all__ = [
    "EXPERIMENTS",
    "RUNS",
    "DeepNet",
    "RunResult",
    "Variant",
    "kaiming_uniform_relu",
    "large_init_clip",
    "large_init_no_clip",
    "relu_default_init",
    "seed_data",
    "sigmoid_default_init",
    "xavier_uniform_relu",
]

INPUT_SIZE = 1
HIDDEN_SIZE = 10
NUM_LAYERS = 10


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One watched training run of a seed experiment."""

    experiment: str
    variant: str
    claim: str
    final_loss: float  # the last epoch's loss, as the seed records it (before that step)
    losses: list[float]
    report: Report


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of an experiment: its names, the seed's claim, and how to run it."""

    experiment: str
    name: str
    claim: str
    description: str
    run: Callable[[int], RunResult]


def seed_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's data set: 100 points of y = 3x + 2 + 0.5 noise, numpy seed 0.

    ``RandomState(0).randn`` draws the same numbers as the seed's ``np.random.seed(0);
    np.random.randn`` without touching numpy's global generator.
    """
    rng = np.random.RandomState(0)
    x = rng.randn(100, 1)
    y = 3 * x + 2 + 0.5 * rng.randn(100, 1)
    return torch.FloatTensor(x), torch.FloatTensor(y)


class DeepNet(nn.Module):
    """The seed's network: ``num_layers`` x (Linear + activation), then Linear(hidden, 1).

    ``init``, when given, is applied to every Linear weight right after that layer is
    built (as the seed does); biases keep PyTorch's default init.
    """

    def __init__(self, activation: Callable[[], nn.Module],
                 init: Callable[[torch.Tensor], object] | None = None,
                 input_size: int = INPUT_SIZE, hidden_size: int = HIDDEN_SIZE,
                 num_layers: int = NUM_LAYERS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layer = nn.Linear(input_size if i == 0 else hidden_size, hidden_size)
            if init is not None:
                init(layer.weight)
            layers += [layer, activation()]
        head = nn.Linear(hidden_size, 1)
        if init is not None:
            init(head.weight)
        layers.append(head)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _train(experiment: str, variant: str, claim: str, model: nn.Module, lr: float,
           epochs: int, max_norm: float | None = None) -> RunResult:
    """The seed's loop (full batch, MSE, SGD) under gradwatch.watch."""
    x, y = seed_data()
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses: list[float] = []
    with gradwatch.watch(model, optimizer) as gw:
        for _ in range(epochs):
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)
            optimizer.step()
            losses.append(loss.item())  # the seed records every epoch's loss this way
    return RunResult(experiment, variant, claim, losses[-1], losses, gw.report())


def _normal_std10(w: torch.Tensor) -> None:
    nn.init.normal_(w, mean=0, std=10)


# --- 1. sigmoid vs ReLU, default init ------------------------------------------------------
EXP1 = "sigmoid_vs_relu"
CLAIM_SIGMOID = ("the sigmoid network suffers from vanishing gradients: its loss falls "
                 "slowly")
CLAIM_RELU = "the ReLU network avoids vanishing gradients: its loss falls fast"


def sigmoid_default_init(seed: int = 0) -> RunResult:
    """Experiment 1, sigmoid arm: default init, SGD lr 0.01, 500 epochs."""
    torch.manual_seed(seed)
    model = DeepNet(nn.Sigmoid)
    return _train(EXP1, "sigmoid", CLAIM_SIGMOID, model, lr=0.01, epochs=500)


def relu_default_init(seed: int = 0) -> RunResult:
    """Experiment 1, ReLU arm: default init, SGD lr 0.01, 500 epochs."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU)
    return _train(EXP1, "relu", CLAIM_RELU, model, lr=0.01, epochs=500)


# --- 2. N(0, 10) weights, without vs with clipping ------------------------------------------
EXP2 = "large_init_clipping"
CLAIM_NO_CLIP = ("without gradient clipping the gradients explode: the loss grows fast and "
                 "is unstable")
CLAIM_CLIP = ("with clip_grad_norm_(max_norm=10) training is relatively stable and the loss "
              "decreases gradually")


def large_init_no_clip(seed: int = 0) -> RunResult:
    """Experiment 2, no clipping: all weights N(0, 10), ReLU, SGD lr 0.1, 50 epochs."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU, init=_normal_std10)
    return _train(EXP2, "no_clip", CLAIM_NO_CLIP, model, lr=0.1, epochs=50)


def large_init_clip(seed: int = 0) -> RunResult:
    """Experiment 2, with clip_grad_norm_(max_norm=10) between backward() and step()."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU, init=_normal_std10)
    return _train(EXP2, "clip10", CLAIM_CLIP, model, lr=0.1, epochs=50, max_norm=10)


# --- 3. Xavier vs Kaiming ---------------------------------------------------------------
EXP3 = "xavier_vs_kaiming"
CLAIM_XAVIER = ("Xavier init keeps the weight variance the same forward and backward, so "
                "gradients propagate steadily and training is stable")
CLAIM_KAIMING = ("Kaiming init is made for ReLU: it keeps the variance after each ReLU, "
                 "stabilises gradients and eases vanishing gradients in deep networks")


def xavier_uniform_relu(seed: int = 0) -> RunResult:
    """Experiment 3, Xavier arm: xavier_uniform_ weights, ReLU, SGD lr 0.01, 500 epochs."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU, init=nn.init.xavier_uniform_)
    return _train(EXP3, "xavier", CLAIM_XAVIER, model, lr=0.01, epochs=500)


def kaiming_uniform_relu(seed: int = 0) -> RunResult:
    """Experiment 3, Kaiming arm: kaiming_uniform_ weights (defaults), ReLU, lr 0.01, 500."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU, init=nn.init.kaiming_uniform_)
    return _train(EXP3, "kaiming", CLAIM_KAIMING, model, lr=0.01, epochs=500)


_ARCH = ("10 x (Linear(., 10) + {act}) + Linear(10, 1), full-batch MSE on y = 3x + 2 + "
         "0.5 noise (100 points, numpy seed 0), SGD")

RUNS: tuple[Variant, ...] = (
    Variant(EXP1, "sigmoid", CLAIM_SIGMOID,
            _ARCH.format(act="Sigmoid") + " lr 0.01, 500 epochs; PyTorch's default init.",
            sigmoid_default_init),
    Variant(EXP1, "relu", CLAIM_RELU,
            _ARCH.format(act="ReLU") + " lr 0.01, 500 epochs; PyTorch's default init.",
            relu_default_init),
    Variant(EXP2, "no_clip", CLAIM_NO_CLIP,
            _ARCH.format(act="ReLU") + " lr 0.1, 50 epochs; every Linear weight "
            "nn.init.normal_(w, mean=0, std=10), biases default; no clipping.",
            large_init_no_clip),
    Variant(EXP2, "clip10", CLAIM_CLIP,
            _ARCH.format(act="ReLU") + " lr 0.1, 50 epochs; every Linear weight "
            "nn.init.normal_(w, mean=0, std=10), biases default; "
            "clip_grad_norm_(model.parameters(), max_norm=10) before each step. Unlike the "
            "seed, which builds this model after the unclipped one, both arms start from "
            "the same weights for a given seed.",
            large_init_clip),
    Variant(EXP3, "xavier", CLAIM_XAVIER,
            _ARCH.format(act="ReLU") + " lr 0.01, 500 epochs; nn.init.xavier_uniform_ on "
            "every Linear weight. The seed's code is cut off after the Kaiming arm's "
            "backward: both arms are completed the obvious way (step, record the loss), "
            "and the claim comes from the seed's text on Xavier init.",
            xavier_uniform_relu),
    Variant(EXP3, "kaiming", CLAIM_KAIMING,
            _ARCH.format(act="ReLU") + " lr 0.01, 500 epochs; nn.init.kaiming_uniform_ "
            "(defaults: fan_in, gain sqrt(2)) on every Linear weight. The seed's code is cut "
            "off in this arm's loop (at loss.backward): it is completed the obvious way "
            "(step, record the loss), and the claim comes from the seed's text on Kaiming "
            "init.",
            kaiming_uniform_relu),
)
"""Every arm of every experiment, in the seed's order."""

EXPERIMENTS: dict[str, str] = {
    EXP1: "Vanishing gradients: sigmoid vs ReLU with PyTorch's default init",
    EXP2: "Exploding gradients: N(0, 10) weights without vs with gradient clipping",
    EXP3: "Initialisation: Xavier-uniform vs Kaiming-uniform with ReLU",
}
"""Experiment id -> title, in the seed's order."""
