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

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .core import (
    Arm,
    ArmResults,
    Experiment,
    RunResult,
    Verdict,
    at_steps,
    depth_ratio,
    fit,
    run_length,
    spread,
)

__all__ = [
    "EXPERIMENTS",
    "DeepNet",
    "constant_prediction_loss",
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
EPOCHS = 500  # experiments 1 and 3, as the seed writes them
EPOCHS_LARGE_INIT = 50  # experiment 2


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
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def clip(_step: int) -> None:
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)

    losses, report = fit(model, optimizer, x, y, epochs, nn.MSELoss(), clip)
    return RunResult(experiment, variant, claim, losses[-1], losses, report)


def _normal_std10(w: torch.Tensor) -> None:
    nn.init.normal_(w, mean=0, std=10)


# --- 1. sigmoid vs ReLU, default init ------------------------------------------------------
EXP1 = "sigmoid_vs_relu"
CLAIM_SIGMOID = ("the sigmoid network suffers from vanishing gradients: its loss falls "
                 "slowly")
CLAIM_RELU = "the ReLU network avoids vanishing gradients: its loss falls fast"


def sigmoid_default_init(seed: int = 0, steps: int = EPOCHS) -> RunResult:
    """Experiment 1, sigmoid arm: default init, SGD lr 0.01, 500 epochs (``steps``)."""
    torch.manual_seed(seed)
    model = DeepNet(nn.Sigmoid)
    return _train(EXP1, "sigmoid", CLAIM_SIGMOID, model, lr=0.01, epochs=steps)


def relu_default_init(seed: int = 0, steps: int = EPOCHS) -> RunResult:
    """Experiment 1, ReLU arm: default init, SGD lr 0.01, 500 epochs (``steps``)."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU)
    return _train(EXP1, "relu", CLAIM_RELU, model, lr=0.01, epochs=steps)


# --- 2. N(0, 10) weights, without vs with clipping ------------------------------------------
EXP2 = "large_init_clipping"
CLAIM_NO_CLIP = ("without gradient clipping the gradients explode: the loss grows fast and "
                 "is unstable")
CLAIM_CLIP = ("with clip_grad_norm_(max_norm=10) training is relatively stable and the loss "
              "decreases gradually")


def large_init_no_clip(seed: int = 0, steps: int = EPOCHS_LARGE_INIT) -> RunResult:
    """Experiment 2, no clipping: all weights N(0, 10), ReLU, SGD lr 0.1, 50 epochs."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU, init=_normal_std10)
    return _train(EXP2, "no_clip", CLAIM_NO_CLIP, model, lr=0.1, epochs=steps)


def large_init_clip(seed: int = 0, steps: int = EPOCHS_LARGE_INIT) -> RunResult:
    """Experiment 2, with clip_grad_norm_(max_norm=10) between backward() and step()."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU, init=_normal_std10)
    return _train(EXP2, "clip10", CLAIM_CLIP, model, lr=0.1, epochs=steps, max_norm=10)


# --- 3. Xavier vs Kaiming ---------------------------------------------------------------
EXP3 = "xavier_vs_kaiming"
CLAIM_XAVIER = ("Xavier init keeps the weight variance the same forward and backward, so "
                "gradients propagate steadily and training is stable")
CLAIM_KAIMING = ("Kaiming init is made for ReLU: it keeps the variance after each ReLU, "
                 "stabilises gradients and eases vanishing gradients in deep networks")


def xavier_uniform_relu(seed: int = 0, steps: int = EPOCHS) -> RunResult:
    """Experiment 3, Xavier arm: xavier_uniform_ weights, ReLU, SGD lr 0.01, 500 epochs."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU, init=nn.init.xavier_uniform_)
    return _train(EXP3, "xavier", CLAIM_XAVIER, model, lr=0.01, epochs=steps)


def kaiming_uniform_relu(seed: int = 0, steps: int = EPOCHS) -> RunResult:
    """Experiment 3, Kaiming arm: kaiming_uniform_ weights (defaults), ReLU, lr 0.01, 500."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU, init=nn.init.kaiming_uniform_)
    return _train(EXP3, "kaiming", CLAIM_KAIMING, model, lr=0.01, epochs=steps)


def kaiming_small_lr(seed: int = 0, steps: int = EPOCHS_LARGE_INIT) -> RunResult:
    """Repair of experiment 2: Kaiming-uniform instead of N(0, 10), lr 0.01, 50 epochs."""
    torch.manual_seed(seed)
    model = DeepNet(nn.ReLU, init=nn.init.kaiming_uniform_)
    return _train(EXP2, "kaiming_lr0.01", "", model, lr=0.01, epochs=steps)


def _kaiming_repair_arm(experiment: str) -> Callable[[int], RunResult]:
    def run(seed: int = 0, steps: int = EPOCHS) -> RunResult:
        result = kaiming_uniform_relu(seed, steps)
        return RunResult(experiment, "relu_kaiming", "", result.final_loss, result.losses,
                         result.report)
    run.__doc__ = "The ReLU arm with Kaiming-uniform init (experiment 3's), as the repair."
    return run


@functools.cache
def constant_prediction_loss() -> float:
    """MSE of predicting the mean of y for every input (9.76): the loss of a stalled net.
    Computed on first use, never at import (see ``recurrent.constant_loss``)."""
    return float(seed_data()[1].var(unbiased=False))


def _stalled(losses: list[float]) -> list[bool]:
    """Runs that ended at (within 5% of) the loss of a constant prediction."""
    return [abs(v - constant_prediction_loss()) < 0.05 * constant_prediction_loss()
            for v in losses]


def _first_ratio(results: ArmResults, arm: str) -> str:
    f = results.finding(arm, "vanishing_gradient")
    if f is None:
        return "no vanishing finding"
    ratio = f.evidence.get("grad_norm_ratio_first_to_last")
    return f"the first layer gets {ratio:.1e} of the last layer's gradient (seed 0)" \
        if ratio is not None else "vanishing"


def _init_ratio(result: RunResult) -> float:
    """Median over the layers of the measured init std / the recommended (Kaiming or
    Xavier) std, from the report's facts (NaN when not measured)."""
    layers = result.report.to_dict()["facts"].get("layers", {})
    ratios = [(info.get("init_scale") or {}).get("ratio") for info in layers.values()]
    ratios = [v for v in ratios if isinstance(v, (int, float))]
    return float(np.median(ratios)) if ratios else math.nan


def _dead_at_end(result: RunResult) -> list[float]:
    """The last measured dead fraction of each ReLU site, in forward order (the report's
    series; sites never measured finite are left out)."""
    sites = result.report.to_dict()["series"].get("dead_fraction") or {}
    out = []
    for values in sites.values():
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if finite:
            out.append(float(finite[-1]))
    return out


def _pct_range(values: list[float]) -> str:
    """``0-80%`` (or ``80%`` when they are all equal) of fractions."""
    lo, hi = round(100 * min(values)), round(100 * max(values))
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


def _judge_sigmoid_vs_relu(r: ArmResults) -> Verdict:
    sig, relu, fix = r.losses("sigmoid"), r.losses("relu"), r.losses("relu_kaiming")
    sig_stalls, relu_stalls = all(_stalled(sig)), all(_stalled(relu))
    relu_learns = not any(_stalled(relu))
    verdict = "holds" if sig_stalls and relu_learns else \
        "partly" if sig_stalls or relu_learns else "does not hold"
    dead = r.finding("relu", "dying_relu")
    since = [s.get("dead_since_step", math.nan) for s in
             (dead.evidence.get("sites") or [dead.evidence] if dead is not None else [])]
    ends = [_dead_at_end(run) for run in r["relu"]]
    every = [v for e in ends for v in e]
    first = [e[0] for e in ends if e]
    dead_text = (f"; at the end {_pct_range(every)} of a ReLU layer's units are dead (first "
                 f"layer {_pct_range(first)}, over every seed), and the layers gradwatch "
                 f"flags are dead from {at_steps(since)}" if dead is not None and every
                 else "")
    return Verdict(
        verdict,
        f"sigmoid ends at loss {spread(sig)}, ReLU at {spread(relu)}; "
        f"{constant_prediction_loss():.2f} is the loss of predicting the mean of y, so "
        f"{'both nets stall' if sig_stalls and relu_stalls else 'see the numbers'}.",
        f"both gradients vanish towards the input (sigmoid: {_first_ratio(r, 'sigmoid')}; "
        f"ReLU: {_first_ratio(r, 'relu')}). PyTorch's default Linear init draws weights at "
        f"about {spread([_init_ratio(run) for run in r['relu']], 2)}x the Kaiming std, so "
        f"every layer shrinks the signal; with ReLU that is "
        f"not compensated{dead_text}. The activation alone does not decide it: the init does.",
        f"the same ReLU net with Kaiming-uniform init learns: loss {spread(fix)} after the same "
        f"{run_length(r)} epochs.")


def _forward_gain(result: RunResult) -> float:
    """Geometric-mean growth of the layers' output RMS per layer at the first step."""
    acts = result.report.to_dict()["series"].get("activation_rms", {})
    first = [v[0] for v in acts.values() if v and v[0] is not None and v[0] > 0]
    if len(first) < 2:
        return math.nan
    return float((first[-1] / first[0]) ** (1 / (len(first) - 1)))


def _judge_large_init(r: ArmResults) -> Verdict:
    no_clip, clip, fix = r.losses("no_clip"), r.losses("clip10"), r.losses("kaiming_lr0.01")
    exploded = all(math.isnan(v) for v in no_clip)
    first = [run.losses[0] for run in r["clip10"]]
    frozen = all(math.isfinite(v) and abs(v - f0) <= 1e-6 * abs(f0)
                 for v, f0 in zip(clip, first, strict=True))
    clip_helps = all(math.isfinite(v) and v < 0.5 * f0 for v, f0 in zip(clip, first, strict=True))
    verdict = "holds" if exploded and clip_helps else \
        "partly" if exploded or clip_helps else "does not hold"
    nan_from = [next((i for i, v in enumerate(run.losses) if not math.isfinite(v)), math.nan)
                for run in r["no_clip"]]
    plateau = r.finding("clip10", "loss_plateau")
    zeroed = plateau is not None and any(c.id == "clipping_on_infinite_norm"
                                         for c in plateau.causes)
    return Verdict(
        verdict,
        f"without clipping the loss starts at {spread(first)} and is NaN from "
        f"{at_steps(nan_from)} "
        f"({'every seed' if exploded else 'not every seed'}); with clip_grad_norm_(10) it "
        f"stays at {spread(clip)}: {'frozen, not decreasing' if frozen else 'see the numbers'}.",
        f"the very first forward pass already overflows: N(0, 10) weights multiply the "
        f"signal's RMS by {spread([_forward_gain(run) for run in r['no_clip']], 2)} per layer "
        f"(measured at step 0), so the loss is astronomical before any update. "
        + ("The total gradient norm is infinite, so clip_grad_norm_ scales every gradient by "
           "max_norm / inf = 0 and no weight ever moves (gradwatch: loss_plateau with cause "
           "clipping_on_infinite_norm). " if zeroed else "")
        + "Clipping cannot repair a forward pass that has already overflowed.",
        f"re-initialising with Kaiming-uniform (lr 0.01, no clipping) trains: loss "
        f"{spread(fix)} after the same {run_length(r)} epochs.")


def _std_ratio(r: ArmResults) -> list[float]:
    """Per seed: Kaiming's initial weight std / Xavier's, median over the hidden
    HIDDEN_SIZE x HIDDEN_SIZE layers (the first and the head have other shapes)."""
    out = []
    for xav, kai in zip(r["xavier"], r["kaiming"], strict=True):
        hidden = [layer["name"] for layer in xav.report.layers][1:-1]
        stds = [[(run.report.to_dict()["facts"]["layers"][n].get("init_scale") or {}).get("std")
                 for n in hidden] for run in (xav, kai)]
        pairs = [k / x for x, k in zip(*stds, strict=True) if x and k]
        out.append(float(np.median(pairs)) if pairs else math.nan)
    return out


def _judge_xavier_kaiming(r: ArmResults) -> Verdict:
    xav, kai = r.losses("xavier"), r.losses("kaiming")
    start = {arm: [run.losses[0] for run in r[arm]] for arm in ("xavier", "kaiming")}
    ratios = {arm: [depth_ratio(run.report) for run in r[arm]] for arm in ("xavier", "kaiming")}
    learn = [v < 0.1 * constant_prediction_loss() for v in xav + kai]
    problems = {k for arm in ("xavier", "kaiming") for kinds in r.kinds(arm) for k in kinds}
    verdict = "holds" if all(learn) and not problems else "partly" if any(learn) \
        else "does not hold"
    return Verdict(
        verdict,
        f"Xavier-uniform ends at loss {spread(xav)}, Kaiming-uniform at {spread(kai)} "
        f"(from {spread(start['xavier'])} and {spread(start['kaiming'])} at the first step); "
        f"gradwatch finds "
        f"{'no warning or error in either' if not problems else ', '.join(sorted(problems))}.",
        f"both keep the signal's scale through the {NUM_LAYERS} ReLU layers: the first layer "
        f"gets {spread(ratios['xavier'], 2)} (Xavier) and {spread(ratios['kaiming'], 2)} "
        f"(Kaiming) of the last layer's gradient norm (median over the run). Kaiming's "
        f"initial std measured here is {spread(_std_ratio(r), 2)}x Xavier's for these "
        f"{HIDDEN_SIZE}x{HIDDEN_SIZE} layers, the factor ReLU's halving of the variance "
        f"calls for.",
        "no repair needed; Kaiming-uniform is the init to use with ReLU.")


_ARCH = ("10 x (Linear(., 10) + {act}) + Linear(10, 1), full-batch MSE on y = 3x + 2 + "
         "0.5 noise (100 points, numpy seed 0), SGD")

def _arms() -> dict[str, Arm]:
    relu_default = _ARCH.format(act="ReLU") + " lr 0.01, 500 epochs; PyTorch's default init."
    return {
        "sigmoid": Arm("sigmoid", CLAIM_SIGMOID, _ARCH.format(act="Sigmoid")
                       + " lr 0.01, 500 epochs; PyTorch's default init.", sigmoid_default_init),
        "relu": Arm("relu", CLAIM_RELU, relu_default, relu_default_init),
        "relu_kaiming": Arm("relu_kaiming", "", relu_default.replace(
            "PyTorch's default init.", "nn.init.kaiming_uniform_ on every Linear weight."),
            _kaiming_repair_arm(EXP1), role="repair"),
        "no_clip": Arm("no_clip", CLAIM_NO_CLIP, _ARCH.format(act="ReLU")
                       + " lr 0.1, 50 epochs; every Linear weight nn.init.normal_(w, mean=0, "
                       "std=10), biases default; no clipping.", large_init_no_clip),
        "clip10": Arm("clip10", CLAIM_CLIP, _ARCH.format(act="ReLU")
                      + " lr 0.1, 50 epochs; every Linear weight nn.init.normal_(w, mean=0, "
                      "std=10), biases default; clip_grad_norm_(model.parameters(), "
                      "max_norm=10) before each step. Unlike the seed, which builds this model "
                      "after the unclipped one, both arms start from the same weights for a "
                      "given seed.", large_init_clip),
        "kaiming_lr0.01": Arm("kaiming_lr0.01", "", _ARCH.format(act="ReLU")
                              + " lr 0.01, 50 epochs; nn.init.kaiming_uniform_ instead of "
                              "N(0, 10); no clipping. (With the seed's lr 0.1 even the "
                              "Kaiming-init net diverges.)", kaiming_small_lr, role="repair"),
        "xavier": Arm("xavier", CLAIM_XAVIER, _ARCH.format(act="ReLU")
                      + " lr 0.01, 500 epochs; nn.init.xavier_uniform_ on every Linear "
                      "weight.", xavier_uniform_relu),
        "kaiming": Arm("kaiming", CLAIM_KAIMING, _ARCH.format(act="ReLU")
                       + " lr 0.01, 500 epochs; nn.init.kaiming_uniform_ (defaults: fan_in, "
                       "gain sqrt(2)) on every Linear weight.", kaiming_uniform_relu),
    }


_A = _arms()
EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(EXP1, "seed 002 #1", "Vanishing gradients: sigmoid vs ReLU, default init",
               "a 10-layer sigmoid network suffers from vanishing gradients and its loss "
               "falls slowly, while the same network with ReLU avoids them and learns fast",
               "The seed's code exactly (data, layers, PyTorch's default init, SGD lr 0.01, "
               "500 full-batch epochs); the repair arm adds Kaiming-uniform init.",
               (_A["sigmoid"], _A["relu"], _A["relu_kaiming"]), _judge_sigmoid_vs_relu,
               cost_s=4.0),
    Experiment(EXP2, "seed 002 #2", "Exploding gradients: N(0, 10) weights, with and without "
               "clipping",
               "with every weight drawn from N(0, 10) the gradients explode and the loss grows "
               "fast without clipping; clip_grad_norm_(max_norm=10) keeps training stable and "
               "the loss decreases gradually",
               "The seed's code exactly (N(0, 10) weights, ReLU, SGD lr 0.1, 50 epochs); both "
               "arms start from the same weights for a given seed. The repair arm re-initialises "
               "with Kaiming-uniform and uses lr 0.01.",
               (_A["no_clip"], _A["clip10"], _A["kaiming_lr0.01"]), _judge_large_init,
               cost_s=1.0),
    Experiment(EXP3, "seed 002 #3", "Initialisation: Xavier-uniform vs Kaiming-uniform with "
               "ReLU",
               "Xavier init keeps the variance the same forward and backward so training is "
               "stable; Kaiming init, made for ReLU, keeps the variance after each ReLU and "
               "eases vanishing gradients in deep networks",
               "The seed's code is cut off inside the Kaiming arm's loop (at loss.backward()): "
               "both arms are completed the obvious way (optimizer.step(), record the loss); "
               "ReLU, SGD lr 0.01, 500 epochs.",
               (_A["xavier"], _A["kaiming"]), _judge_xavier_kaiming, cost_s=3.0),
)
"""Seed 002's three experiments, in the seed's order."""
