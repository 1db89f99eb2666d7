"""The seeds' architecture claims through depth (seeds 000 and 004, SEEDS.md section 1),
measured.

"Vanishing gradients are common in deep plain networks and plain RNNs, rarer in LSTM/GRU,
ResNets (residual connections) and with BatchNorm." The seeds give no code, so the lab
compares the architectures at equal size on a small task made in code, each trained for a
few dozen real steps under :func:`gradwatch.watch`:

``deep_architectures``: 20 weight layers with sigmoid, PyTorch's default init: plain, with
BatchNorm after every hidden Linear, and with residual connections. Measure: the first
layer's gradient norm / the last layer's (gradwatch's depth ratio).

The recurrent half of the claim (RNN, LSTM, GRU) is ``recurrent.py``'s experiment.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch.thresholds import Thresholds

from .core import Arm, ArmResults, Experiment, RunResult, Verdict, fit, run_length, spread

__all__ = [
    "DEPTH",
    "EXPERIMENTS",
    "PreActResidual",
    "deep_net",
    "depth_data",
]

_T = Thresholds()
VANISHING = _T.vanishing_ratio  # 1e-3: gradwatch's limit through depth
BETTER = 100.0  # an architecture "keeps" the gradient if it keeps >= 100x the plain one's

# --- depth ---------------------------------------------------------------------------
DEPTH = 20  # weight layers (Linear), the input layer and the head included
WIDTH = 32
INPUTS = 16
SAMPLES = 256
DEPTH_STEPS = 30
DEPTH_LR = 1e-3


def depth_data() -> tuple[torch.Tensor, torch.Tensor]:
    """256 samples of 16 N(0, 1) features; y = sin(2 x.w) + 0.1 noise (data seed 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, INPUTS, generator=g)
    w = torch.randn(INPUTS, 1, generator=g) / math.sqrt(INPUTS)
    y = torch.sin(2 * x @ w) + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return x, y


@functools.cache
def depth_constant_loss() -> float:
    """MSE of predicting the mean of y: the loss of a net that has learned nothing.
    Computed on first use, never at import (see ``recurrent.constant_loss``)."""
    return float(depth_data()[1].var(unbiased=False))


class PreActResidual(nn.Module):
    """``x + Linear(sigmoid(x))``: a pre-activation residual block with one weight layer."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.act = nn.Sigmoid()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.act(x))


def deep_net(kind: str, depth: int = DEPTH) -> nn.Sequential:
    """``depth`` Linear layers with sigmoid, default init: ``plain``, ``batchnorm`` (a
    BatchNorm1d after every hidden Linear) or ``residual`` (pre-activation blocks)."""
    hidden = depth - 2  # besides the input layer and the head
    if kind == "residual":
        layers: list[nn.Module] = [nn.Linear(INPUTS, WIDTH)]
        layers += [PreActResidual() for _ in range(hidden)]
        layers.append(nn.Sigmoid())
    else:
        layers = []
        for i in range(hidden + 1):
            layers.append(nn.Linear(INPUTS if i == 0 else WIDTH, WIDTH))
            if kind == "batchnorm":
                layers.append(nn.BatchNorm1d(WIDTH))
            layers.append(nn.Sigmoid())
    layers.append(nn.Linear(WIDTH, 1))
    return nn.Sequential(*layers)


def _depth_ratios(report: gradwatch.Report) -> np.ndarray:
    """Per step: the first weight layer's gradient norm / the last one's, on the steps where
    the last one still gets a gradient (>= active_grad_fraction of its maximum), as
    gradwatch's depth ratio is taken."""
    data = report.to_dict()
    facts = data["facts"]["layers"]
    names = [layer["name"] for layer in data["layers"]
             if facts.get(layer["name"], {}).get("fan_in") is not None]
    grad = data["series"]["grad_norm"]
    first, last = (np.array([np.nan if v is None else v for v in grad[n]], dtype=float)
                   for n in (names[0], names[-1]))
    ok = np.isfinite(first) & np.isfinite(last) & (last > 0)
    if ok.any():
        ok &= last >= _T.active_grad_fraction * np.max(last[ok])
    return first[ok] / last[ok]


def _vanishing(report: gradwatch.Report, axis: str | None) -> Any:
    """gradwatch's vanishing_gradient finding on this axis ("time" or depth: None)."""
    return next((f for f in report.findings if f.kind == "vanishing_gradient"
                 and f.evidence.get("axis") == axis), None)


def _train_depth(variant: str, claim: str, seed: int, steps: int = DEPTH_STEPS) -> RunResult:
    """One depth arm: full-batch MSE with Adam for ``steps`` (DEPTH_STEPS) steps under
    gradwatch.watch; the depth ratios."""
    torch.manual_seed(seed)
    model = deep_net(variant)
    x, y = depth_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=DEPTH_LR)
    losses, report = fit(model, optimizer, x, y, steps)
    ratios = _depth_ratios(report)
    finding = _vanishing(report, None)
    metrics = {
        "grad_ratio_first_to_last": float(np.median(ratios)) if ratios.size else math.nan,
        "grad_ratio_at_step0": float(ratios[0]) if ratios.size else math.nan,
        "vanishing_reported": float(finding is not None and finding.severity != "info"),
    }
    if finding is not None and "mean_factor_per_layer" in finding.evidence:
        metrics["factor_per_layer"] = float(finding.evidence["mean_factor_per_layer"])
    return RunResult(EXP_DEPTH, variant, claim, losses[-1], losses, report, metrics)


# --- judges ---------------------------------------------------------------------------
def _count(flags: list[bool]) -> str:
    return f"{sum(flags)} of {len(flags)} seeds"


def _keeps(r: ArmResults, arm: str, base: str, metric: str, limit: float) -> tuple[bool, bool]:
    """(above ``limit`` on every seed, >= BETTER x the ``base`` arm's ratio on every seed)."""
    mine, theirs = r.metric(arm, metric), r.metric(base, metric)
    above = all(m >= limit for m in mine)
    better = all(m >= BETTER * t for m, t in zip(mine, theirs, strict=True))
    return above, better


def _reported(r: ArmResults, arm: str) -> str:
    return _count([v == 1.0 for v in r.metric(arm, "vanishing_reported")])


def _judge_depth(r: ArmResults) -> Verdict:
    metric = "grad_ratio_first_to_last"
    plain = r.metric("plain", metric)
    vanishes = all(v < VANISHING for v in plain)
    keeps = {arm: _keeps(r, arm, "plain", metric, VANISHING) for arm in ("batchnorm", "residual")}
    fixed = [arm for arm, (above, better) in keeps.items() if above and better]
    verdict = "holds" if vanishes and len(fixed) == 2 else \
        "partly" if vanishes and fixed else "does not hold"
    observed = (
        f"first layer's / last layer's gradient norm, median over {run_length(r)} Adam steps: "
        f"plain {spread(plain, 2)}, BatchNorm {spread(r.metric('batchnorm', metric), 2)}, "
        f"residual {spread(r.metric('residual', metric), 2)}. gradwatch reports "
        f"vanishing_gradient for plain on {_reported(r, 'plain')}, BatchNorm on "
        f"{_reported(r, 'batchnorm')}, residual on {_reported(r, 'residual')}. Final loss: "
        f"plain {spread(r.losses('plain'))}, BatchNorm {spread(r.losses('batchnorm'))}, "
        f"residual {spread(r.losses('residual'))} (predicting the mean scores "
        f"{depth_constant_loss():.3f}).")
    factor = r.metric("plain", "factor_per_layer")
    per_layer = (f" gradwatch measures the gradient shrinking about {spread(factor, 2)}x per "
                 f"layer towards the input." if any(math.isfinite(v) for v in factor) else "")
    reason = (
        f"in the plain stack every layer multiplies the backward signal by sigmoid's slope "
        f"(at most 0.25) times default-init weights, {DEPTH - 1} times over.{per_layer} "
        f"BatchNorm re-normalises every layer's pre-activations, so the sigmoids work on "
        f"their steep part and the scale of the signal, forward and backward, is reset at "
        f"every layer instead of shrinking layer after layer; the residual blocks add an "
        f"identity path that carries the gradient past every block. At step 0 the first "
        f"layer gets plain "
        f"{spread(r.metric('plain', 'grad_ratio_at_step0'), 2)}, BatchNorm "
        f"{spread(r.metric('batchnorm', 'grad_ratio_at_step0'), 2)}, residual "
        f"{spread(r.metric('residual', 'grad_ratio_at_step0'), 2)} of the last layer's "
        f"gradient.")
    names = {"batchnorm": "BatchNorm", "residual": "residual connections"}
    best = min(names, key=lambda a: float(np.nanmedian(r.losses(a))))
    repair = (
        f"{' and '.join(names[a] for a in fixed) or 'neither BatchNorm nor residual connections'}"
        f" {'keeps' if len(fixed) == 1 else 'keep'} the first layer's gradient within "
        f"{1 / VANISHING:.0f}x of the last's on every seed; in {run_length(r)} steps "
        f"{names[best]} {'trains' if best == 'batchnorm' else 'train'} best: loss "
        f"{spread(r.losses(best))}.")
    return Verdict(verdict, observed, reason, repair)


# --- arms and experiments -------------------------------------------------------------
EXP_DEPTH = "deep_architectures"

CLAIM_PLAIN = "vanishing gradients are common in deep plain networks"
CLAIM_BN = ("BatchNorm keeps each layer's input distribution stable and eases vanishing "
            "gradients")
CLAIM_RES = ("residual connections let the gradient skip layers directly in backprop, which "
             "eases vanishing gradients")
def _runner(train: Callable[[str, str, int, int], RunResult], variant: str, claim: str,
            doc: str, steps: int) -> Callable[..., RunResult]:
    def run(seed: int = 0, steps: int = steps) -> RunResult:
        return train(variant, claim, seed, steps)
    run.__doc__ = doc
    run.__name__ = run.__qualname__ = f"{variant}_run"
    return run


_DEPTH_SETUP = (f"{DEPTH} Linear layers (Linear({INPUTS}, {WIDTH}), {DEPTH - 2} x "
                f"Linear({WIDTH}, {WIDTH}), Linear({WIDTH}, 1)) with sigmoid, PyTorch's default "
                f"init; {SAMPLES} samples of {INPUTS} N(0, 1) features, y = sin(2 x.w) + 0.1 "
                f"noise (data seed 0); full-batch MSE, Adam lr {DEPTH_LR}, {DEPTH_STEPS} steps")
def _arm(train: Callable[[str, str, int, int], RunResult], name: str, claim: str, text: str,
         role: str) -> Arm:
    return Arm(name, claim, text, _runner(train, name, claim, text, DEPTH_STEPS), role=role)


_ARMS = {
    "plain": _arm(_train_depth, "plain", CLAIM_PLAIN,
                  f"{_DEPTH_SETUP}; plain: Linear -> Sigmoid.", "seed"),
    "batchnorm": _arm(_train_depth, "batchnorm", CLAIM_BN,
                      f"{_DEPTH_SETUP}; Linear -> BatchNorm1d -> Sigmoid in every hidden "
                      f"layer.", "repair"),
    "residual": _arm(_train_depth, "residual", CLAIM_RES,
                     f"{_DEPTH_SETUP}; the {DEPTH - 2} middle layers as pre-activation "
                     f"residual blocks x + Linear(sigmoid(x)), a sigmoid before the head.",
                     "repair"),
}

EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(EXP_DEPTH, "seeds 000/004", "Vanishing gradients vs depth: plain, BatchNorm, "
               "residual",
               "vanishing gradients are common in deep plain networks; BatchNorm and residual "
               "connections (ResNet) make them rarer",
               f"The seeds give no code. Three nets of equal depth ({DEPTH} weight layers, "
               f"sigmoid, PyTorch's default init), trained the same way: {_DEPTH_SETUP}. The "
               "measure is gradwatch's depth ratio: the first weight layer's gradient norm / "
               "the last one's, median over the steps.",
               (_ARMS["plain"], _ARMS["batchnorm"], _ARMS["residual"]), _judge_depth,
               cost_s=1.3),
)
"""The architecture claim through depth (the one through time: recurrent.py)."""
