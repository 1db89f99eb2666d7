"""Seed 003's claims about RNN training (SEEDS.md sections 1-2), measured on a real RNN.

The seed is a short note without code:

1. ``rnn_clipping``: "at the edge of a cliff the slope is very large; the update is slope x
   learning rate, so the parameters jump and the loss is very large. The remedy: when the
   slope exceeds a value such as 15, set it to 15" (``clip_grad_norm_(max_norm=15)``);
2. ``rnn_relu_vs_tanh``: "the explosion does not come from the sigmoid activation; with
   ReLU instead the model usually does worse".

As the seed gives no code, the lab builds the smallest RNN task it could make explode
honestly: a one-layer ``nn.RNN`` (32 hidden units, PyTorch's default init) reads 50 random
inputs and predicts the sum of the last five (scaled to unit variance) from its last
hidden state; 64 fixed sequences (data seed 0), full batch, MSE, plain SGD, 50 steps. At a
high learning rate (0.35) this RNN first learns, then falls off a cliff. Each variant is a
pure function ``run(seed) -> RunResult`` under :func:`gradwatch.watch`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch.thresholds import Thresholds

from .core import (
    Arm,
    ArmResults,
    Experiment,
    RunResult,
    Verdict,
    fit,
    n_steps,
    run_length,
    spread,
)

__all__ = [
    "EXPERIMENTS",
    "LastStepRNN",
    "constant_prediction_loss",
    "lstm",
    "relu_rnn",
    "sequence_data",
    "tanh_rnn",
    "tanh_rnn_clip15",
    "tanh_rnn_clip_early_median",
    "tanh_rnn_high_lr",
    "tanh_rnn_low_lr",
]

LENGTH = 50  # timesteps per sequence
LAST = 5  # the target sums the last LAST inputs
SAMPLES = 64
HIDDEN = 32
STEPS = 50
HIGH_LR = 0.35  # experiment 1: the lowest of 0.2-0.4 (step 0.05) that ended NaN on 6/6 seeds
LOW_LR = 0.05  # experiment 1's repair
COMPARE_LR = 0.1  # experiment 2: one rate for tanh, ReLU and LSTM
SEED_CLIP = 15.0  # the seed's threshold
_THRESHOLDS = Thresholds()
BASELINE_STEPS = _THRESHOLDS.baseline_steps  # the early steps gradwatch's clip threshold uses


def sequence_data(length: int = LENGTH, samples: int = SAMPLES) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """``samples`` sequences of ``length`` N(0, 1) inputs and the scaled sum of their last
    five; a generator of its own (seed 0), so the data never depends on the torch seed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, length, 1, generator=g)
    y = x[:, -LAST:, 0].sum(dim=1) / math.sqrt(LAST)
    return x, y


@functools.cache
def constant_prediction_loss() -> float:
    """MSE of predicting the mean of y for every sequence (about 1): the loss of a model that
    has learned nothing. Computed on first use, never
    at import (see ``recurrent.constant_loss``)."""
    return float(sequence_data()[1].var(unbiased=False))


class LastStepRNN(nn.Module):
    """A recurrent module read at its last timestep, then ``Linear(hidden, 1)``."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def _model(kind: str, seed: int) -> LastStepRNN:
    torch.manual_seed(seed)
    if kind == "lstm":
        return LastStepRNN(nn.LSTM(1, HIDDEN, batch_first=True))
    return LastStepRNN(nn.RNN(1, HIDDEN, batch_first=True, nonlinearity=kind))


def _total_norm(model: nn.Module) -> float:
    """The L2 norm over all parameters' gradients, as clip_grad_norm_ computes it."""
    grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def _train(experiment: str, variant: str, claim: str, model: nn.Module, lr: float,
           max_norm: float | None = None, early_median: bool = False,
           detail_every: int = 16, steps: int = STEPS) -> RunResult:
    """Full-batch MSE with plain SGD for ``steps`` (STEPS) steps under gradwatch.watch.

    ``max_norm``: ``clip_grad_norm_`` at that threshold before every step. ``early_median``:
    no clipping on the first ``BASELINE_STEPS`` steps, then clipping at the median total
    gradient norm of those steps (the threshold gradwatch's clip_grad_norm remedy suggests).
    ``detail_every``: gradwatch's detail measurements (the through-time ratio among them)
    on steps 0-7 and every this many steps after; experiment 1 measures every step, since a
    cliff lasts one or two steps.
    """
    x, y = sequence_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    early: list[float] = []
    clipped = 0

    def clip(step: int) -> None:
        nonlocal clipped
        threshold = max_norm
        if early_median:
            if step < BASELINE_STEPS:
                early.append(_total_norm(model))
            threshold = float(np.median(early)) if step >= BASELINE_STEPS else None
        if threshold is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=threshold)
            clipped += int(not float(norm) <= threshold)  # NaN/Inf norms count too

    losses, report = fit(model, optimizer, x, y, steps, before_step=clip,
                         detail_every=detail_every)
    metrics = _metrics(report, losses)
    if max_norm is not None or early_median:
        metrics["clipped_steps"] = clipped
    if early_median:
        metrics["clip_threshold"] = float(np.median(early))
    return RunResult(experiment, variant, claim, losses[-1], losses, report, metrics)


def _metrics(report: gradwatch.Report, losses: list[float]) -> dict[str, float]:
    """Best loss, raw gradient norms (before clipping, as gradwatch measured them), the
    through-time ratio, and the first step whose loss was not finite (NaN if none)."""
    series = report.series
    grads = np.array([[np.nan if v is None else v for v in col]
                      for col in series["grad_norm"].values()], dtype=float)
    total = np.sqrt(np.sum(grads ** 2, axis=0)) if grads.size else np.array([])
    finite_total = total[np.isfinite(total)]
    finite = [v for v in losses if math.isfinite(v)]
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    weight = {name: np.array([np.nan if v is None else v for v in col], dtype=float)
              for name, col in series["weight_norm"].items()}
    initial = [col[0] for col in weight.values() if col.size and np.isfinite(col[0])]
    ratios = [r for m in series["through_time"].values()
              for r in m["ratio_first_to_last_timestep"] if r is not None and math.isfinite(r)]
    return {
        "best_loss": min(finite) if finite else math.nan,
        "max_grad_norm": float(finite_total.max()) if finite_total.size else math.nan,
        "median_grad_norm": float(np.median(finite_total)) if finite_total.size else math.nan,
        "early_grad_norm": float(np.median(finite_total[:BASELINE_STEPS]))
        if finite_total.size else math.nan,
        "initial_weight_norm": float(np.sqrt(np.sum(np.square(initial)))) if initial
        else math.nan,
        # largest finite weight norm / initial, per module (detail steps)
        **{f"{name}_weight_growth": float(np.nanmax(col) / col[0])
           if col.size and np.isfinite(col).any() and col[0] > 0 else math.nan
           for name, col in weight.items()},
        "ratio_first_to_last_timestep": float(np.median(ratios)) if ratios else math.nan,
        "max_ratio_first_to_last_timestep": float(np.max(ratios)) if ratios else math.nan,
        "first_nonfinite_step": float(bad[0]) if bad else math.nan,
    }


# --- 1. a tanh RNN at a high learning rate, without and with clipping at 15 -----------------
EXP1 = "rnn_clipping"
CLAIM_NO_CLIP = ("at the edge of a cliff the slope is very large; the update is slope x "
                 "learning rate, so the parameters jump and the loss becomes very large")
CLAIM_CLIP = ("when the slope exceeds a value such as 15, setting it to 15 "
              "(clip_grad_norm_(max_norm=15)) is the remedy")


def tanh_rnn_high_lr(seed: int = 0, steps: int = STEPS) -> RunResult:
    """Experiment 1, no clipping: tanh RNN, default init, SGD lr 0.35."""
    return _train(EXP1, "no_clip", CLAIM_NO_CLIP, _model("tanh", seed), lr=HIGH_LR,
                  detail_every=1, steps=steps)


def tanh_rnn_clip15(seed: int = 0, steps: int = STEPS) -> RunResult:
    """Experiment 1, clip_grad_norm_(max_norm=15) before every step."""
    return _train(EXP1, "clip15", CLAIM_CLIP, _model("tanh", seed), lr=HIGH_LR,
                  max_norm=SEED_CLIP, detail_every=1, steps=steps)


def tanh_rnn_clip_early_median(seed: int = 0, steps: int = STEPS) -> RunResult:
    """Repair: clip at the median gradient norm of the first 5 steps (gradwatch's advice)."""
    return _train(EXP1, "clip_early_median", "", _model("tanh", seed), lr=HIGH_LR,
                  early_median=True, detail_every=1, steps=steps)


def tanh_rnn_low_lr(seed: int = 0, steps: int = STEPS) -> RunResult:
    """Repair: the same RNN without clipping at lr 0.05."""
    return _train(EXP1, "lr0.05", "", _model("tanh", seed), lr=LOW_LR, detail_every=1,
                  steps=steps)


# --- 2. ReLU vs tanh (and a sigmoid-gated LSTM) at one learning rate ------------------------
EXP2 = "rnn_relu_vs_tanh"
CLAIM_TANH = ("the explosion does not come from the sigmoid/tanh activation: the squashing "
              "RNN is the better one")
CLAIM_RELU = "with ReLU instead of sigmoid/tanh the RNN usually does worse"


def tanh_rnn(seed: int = 0, steps: int = STEPS) -> RunResult:
    """Experiment 2, tanh arm: default init, SGD lr 0.1."""
    return _train(EXP2, "tanh", CLAIM_TANH, _model("tanh", seed), lr=COMPARE_LR, steps=steps)


def relu_rnn(seed: int = 0, steps: int = STEPS) -> RunResult:
    """Experiment 2, ReLU arm: nn.RNN(nonlinearity='relu'), default init, SGD lr 0.1."""
    return _train(EXP2, "relu", CLAIM_RELU, _model("relu", seed), lr=COMPARE_LR, steps=steps)


def lstm(seed: int = 0, steps: int = STEPS) -> RunResult:
    """Experiment 2, repair: nn.LSTM (sigmoid gates, tanh cell), default init, lr 0.1."""
    return _train(EXP2, "lstm", "", _model("lstm", seed), lr=COMPARE_LR, steps=steps)


# --- judges ---------------------------------------------------------------------------
def _diverged(run: RunResult) -> bool:
    """Non-finite at the end, or ended at 10x (gradwatch's divergence_factor) its best."""
    best = run.metrics["best_loss"]
    return not math.isfinite(run.final_loss) or run.final_loss > 10 * best


def _learned(run: RunResult) -> bool:
    """Ended finite, below half the constant-prediction loss, and not diverged."""
    return math.isfinite(run.final_loss) and \
        run.final_loss < 0.5 * constant_prediction_loss() and not _diverged(run)


def _time_finding(run: RunResult, kind: str) -> str | None:
    """Severity of the run's through-time finding of ``kind``, or None."""
    return next((f.severity for f in run.report.findings
                 if f.kind == kind and f.evidence.get("axis") == "time"), None)


def _count(flags: list[bool]) -> str:
    return f"{sum(flags)} of {len(flags)} seeds"


def _causes(r: ArmResults, arm: str, kind: str) -> list[str]:
    ids = {c.id for run in r[arm] for f in run.report.findings if f.kind == kind
           for c in f.causes}
    return sorted(ids)


def _flipped_steps(run: RunResult) -> int:
    """Steps on which the first timestep got at least the last one's gradient."""
    return sum(1 for m in run.report.series["through_time"].values()
               for v in m["ratio_first_to_last_timestep"]
               if v is not None and math.isfinite(v) and v >= 1)


def _judge_clipping(r: ArmResults) -> Verdict:
    no_clip, clip = r["no_clip"], r["clip15"]
    exploded = [_diverged(run) and bool({"exploding_gradient", "nonfinite"} & kinds)
                for run, kinds in zip(no_clip, r.kinds("no_clip"), strict=True)]
    nonfinite = [not math.isfinite(run.final_loss) for run in no_clip]
    clip_finite = [math.isfinite(run.final_loss) for run in clip]
    clip_learns = [_learned(run) for run in clip]
    if all(exploded) and all(clip_learns):
        verdict = "holds"
    elif any(exploded) and (any(clip_learns) or all(clip_finite)):
        verdict = "partly"
    else:
        verdict = "does not hold"
    growth = [run.metrics["max_grad_norm"] / run.metrics["early_grad_norm"] for run in no_clip]
    observed = (
        f"without clipping the loss first falls (best "
        f"{spread(r.metric('no_clip', 'best_loss'))}), then the raw gradient norm grows "
        f"{spread(growth, 2)}x over its first steps' level and the loss diverges on "
        f"{_count(exploded)}, ending NaN/Inf on {_count(nonfinite)}. With "
        f"clip_grad_norm_(max_norm=15) the run stays finite on {_count(clip_finite)}, but its "
        f"loss ends at {spread(r.losses('clip15'))} (best "
        f"{spread(r.metric('clip15', 'best_loss'))}; predicting the mean scores "
        f"{constant_prediction_loss():.2f}): it learned on {_count(clip_learns)}. Clipping was "
        f"active on {spread(r.metric('clip15', 'clipped_steps'))} of {run_length(r, 'clip15')} "
        f"steps.")
    kinds = r.kinds("no_clip")
    flagged = _count(["exploding_gradient" in k for k in kinds])
    causes = _causes(r, "no_clip", "exploding_gradient")
    median = spread(r.metric("no_clip", "ratio_first_to_last_timestep"), 2)
    peak = r.metric("no_clip", "max_ratio_first_to_last_timestep")
    flips = [p >= 1 for p in peak]
    through = _count([_time_finding(run, "exploding_gradient") is not None for run in no_clip])
    if any(flips):
        flipped = [_flipped_steps(run) for run in no_clip]
        cliff = (
            f"The spike is a cliff through time: on most steps the first of {LENGTH} timesteps "
            f"gets {median} of the last one's gradient, but at the spike up to "
            f"{spread(peak, 2)}x it (>= 1 on {_count(flips)}): for "
            f"{n_steps([n for n in flipped if n > 0])} the recurrent "
            f"weights, moved by the large updates, amplify the gradient going back in time "
            f"instead of shrinking it (too briefly for gradwatch's through-time explosion "
            f"finding, which wants a ratio above "
            f"{_THRESHOLDS.through_time_exploding_ratio:.0e} on most steps: reported on "
            f"{through}). ")
    else:
        cliff = (f"It is not an explosion through time: the first of {LENGTH} timesteps gets "
                 f"{median} (at most {spread(peak, 2)}) of the last one's gradient. ")
    reason = (
        f"gradwatch reports exploding_gradient on {flagged} (cause: "
        f"{', '.join(causes) or 'none named'}) and nonfinite on "
        f"{_count(['nonfinite' in k for k in kinds])}. {cliff}The update lr x gradient then "
        f"throws the recurrent weights' norm up "
        f"{spread(r.metric('no_clip', 'rnn_weight_growth'), 2)}x (tanh saturates) and the "
        f"read-out's {spread(r.metric('no_clip', 'head_weight_growth'), 2)}x before the loss "
        f"turns NaN. Clipping at 15 still allows a step of lr x 15 = "
        f"{HIGH_LR * SEED_CLIP:.2f} in weight norm, more than all the weights together "
        f"({spread(r.metric('clip15', 'initial_weight_norm'), 2)} at the start): 15 is far "
        f"above this model's normal gradient norm "
        f"({spread(r.metric('no_clip', 'early_grad_norm'), 2)} on the first "
        f"{BASELINE_STEPS} steps), so clipping only starts once the run is already jumping.")
    repair = (
        f"lr {LOW_LR} without clipping learns on "
        f"{_count([_learned(run) for run in r['lr0.05']])}: loss {spread(r.losses('lr0.05'))}. "
        f"Clipping at the gradient's normal scale (gradwatch's clip_grad_norm advice, the "
        f"median norm of the first {BASELINE_STEPS} steps: max_norm "
        f"{spread(r.metric('clip_early_median', 'clip_threshold'), 2)}) at lr {HIGH_LR} learns "
        f"on {_count([_learned(run) for run in r['clip_early_median']])}: loss "
        f"{spread(r.losses('clip_early_median'))}.")
    return Verdict(verdict, observed, reason, repair)


def _judge_relu_vs_tanh(r: ArmResults) -> Verdict:
    tanh, relu, gated = r.losses("tanh"), r.losses("relu"), r.losses("lstm")
    worse = [not math.isfinite(b) or (math.isfinite(a) and b > a)
             for a, b in zip(tanh, relu, strict=True)]
    n = len(worse)
    verdict = "holds" if all(worse) else "partly" if sum(worse) > n / 2 else "does not hold"
    rose = [run.final_loss / run.metrics["best_loss"] if math.isfinite(run.final_loss)
            else math.inf for run in r["relu"]]
    rose_tanh = [run.final_loss / run.metrics["best_loss"] for run in r["tanh"]]
    observed = (
        f"at lr {COMPARE_LR}, same data and init scheme: tanh RNN final loss {spread(tanh)}, "
        f"ReLU RNN {spread(relu)}; ReLU is worse on {_count(worse)}. The ReLU RNN's loss "
        f"ends at {spread(rose, 2)}x its best (tanh: {spread(rose_tanh, 2)}x); largest raw "
        f"gradient norm ReLU {spread(r.metric('relu', 'max_grad_norm'), 2)}, tanh "
        f"{spread(r.metric('tanh', 'max_grad_norm'), 2)}.")
    problem = {arm: _count([_time_finding(run, "vanishing_gradient") in ("warning", "error")
                            for run in r[arm]]) for arm in ("relu", "tanh")}
    reason = (
        f"ReLU does not squash: single steps get gradient spikes (up to "
        f"{spread(r.metric('relu', 'max_grad_norm'), 2)} against a median of "
        f"{spread(r.metric('relu', 'median_grad_norm'), 2)}) and the "
        f"updates at lr {COMPARE_LR} overshoot, so the loss climbs back from its best. Its "
        f"gradient through time also fades faster: the first timestep gets "
        f"{spread(r.metric('relu', 'ratio_first_to_last_timestep'), 2)} of the last one's "
        f"(tanh {spread(r.metric('tanh', 'ratio_first_to_last_timestep'), 2)}), because "
        f"units at 0 pass no gradient back. gradwatch reports vanishing through time as a "
        f"problem for ReLU on {problem['relu']} and for tanh on {problem['tanh']} (where the "
        f"loss fell well it is only info: this task needs the last {LAST} steps).")
    repair = (
        f"keep the squashing nonlinearity: tanh learns on "
        f"{_count([_learned(run) for run in r['tanh']])}; an LSTM (sigmoid gates) at the same "
        f"lr learns more slowly but steadily: loss {spread(gated)}, largest gradient norm "
        f"{spread(r.metric('lstm', 'max_grad_norm'), 2)}.")
    return Verdict(verdict, observed, reason, repair)


_TASK = (f"one-layer RNN ({HIDDEN} hidden units, PyTorch's default init) + Linear({HIDDEN}, 1) "
         f"on its last hidden state; {SAMPLES} fixed sequences of {LENGTH} N(0, 1) inputs "
         f"(data seed 0), target the sum of the last {LAST} inputs / sqrt({LAST}); full-batch "
         f"MSE, plain SGD, {STEPS} steps")


def _arms() -> dict[str, Arm]:
    tanh = _TASK.replace("RNN (", "nn.RNN (tanh, ")
    return {
        "no_clip": Arm("no_clip", CLAIM_NO_CLIP, f"{tanh}; lr {HIGH_LR}; no clipping.",
                       tanh_rnn_high_lr),
        "clip15": Arm("clip15", CLAIM_CLIP, f"{tanh}; lr {HIGH_LR}; "
                      f"clip_grad_norm_(model.parameters(), max_norm=15) before each step.",
                      tanh_rnn_clip15),
        "clip_early_median": Arm(
            "clip_early_median", "", f"{tanh}; lr {HIGH_LR}; no clipping on the first "
            f"{BASELINE_STEPS} steps, then clip_grad_norm_ at the median total gradient norm "
            f"of those steps (gradwatch's clip_grad_norm advice).", tanh_rnn_clip_early_median,
            role="repair"),
        "lr0.05": Arm("lr0.05", "", f"{tanh}; lr {LOW_LR}; no clipping.", tanh_rnn_low_lr,
                      role="repair"),
        "tanh": Arm("tanh", CLAIM_TANH, f"{tanh}; lr {COMPARE_LR}.", tanh_rnn),
        "relu": Arm("relu", CLAIM_RELU, _TASK.replace("RNN (", "nn.RNN (nonlinearity='relu', ")
                    + f"; lr {COMPARE_LR}.", relu_rnn),
        "lstm": Arm("lstm", "", _TASK.replace("one-layer RNN (", "one-layer nn.LSTM (sigmoid "
                    "gates, ") + f"; lr {COMPARE_LR}.", lstm, role="repair"),
    }


_A = _arms()
EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(EXP1, "seed 003 #1", "Exploding gradients in an RNN: clipping at 15",
               "in RNN training the gradient can explode: at the edge of a cliff the slope is "
               "very large, the update (slope x learning rate) makes the parameters jump and "
               "the loss very large; when the slope exceeds a value such as 15, set it to 15",
               "The seed gives no code. The lab's minimal RNN that explodes: " + _TASK
               + f", at lr {HIGH_LR}, where it first learns and then falls off a cliff. The "
               "seed's arms: no clipping, and clip_grad_norm_(max_norm=15) (the L2 norm over "
               "all parameters). Repairs: clipping at the gradient's normal scale, and a "
               f"lower learning rate ({LOW_LR}). Watched with detail_every=1, so that the "
               "through-time ratio is measured on every step (a cliff lasts a step or two).",
               (_A["no_clip"], _A["clip15"], _A["clip_early_median"], _A["lr0.05"]),
               _judge_clipping, cost_s=2.1),
    Experiment(EXP2, "seed 003 #2", "ReLU vs tanh in an RNN",
               "the explosion does not come from the sigmoid activation; with ReLU instead the "
               "model usually does worse",
               "The seed gives no code. The same task and init scheme as rnn_clipping ("
               + _TASK + f") at lr {COMPARE_LR}, a rate at which the tanh RNN trains: nn.RNN "
               "with tanh vs nonlinearity='relu' (same torch seed, so the same initial "
               "weights), and an LSTM (sigmoid-gated) as the repair.",
               (_A["tanh"], _A["relu"], _A["lstm"]), _judge_relu_vs_tanh, cost_s=1.2),
)
"""Seed 003's two claims, in the seed's order."""
