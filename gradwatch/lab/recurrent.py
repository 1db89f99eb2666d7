"""The seeds' claim about recurrent architectures (seeds 000 and 004, SEEDS.md section 1),
measured by how much gradient reaches the early timesteps and by what the nets learn.

"Vanishing gradients are common in plain RNNs and rarer in LSTM/GRU." The seeds give no
code, so the lab makes a recall task in code (``recall_data``): each sequence has
``LENGTH`` = 35 timesteps of two inputs, a N(0, 1) value and a marker that is 1 at one
timestep and 0 elsewhere; the target is the marked value, read from the net's last output.
The marker says which value to keep, as in Hochreiter & Schmidhuber's adding problem. In
training the marker is anywhere (lags of 0-34 steps before the last): the short lags teach
a net what to keep, the long ones whether it can keep it. A net is judged on held-out
sequences from generator seeds of their own, with the marker 30-34 steps back (``LONG``):
one that "learned" recalls values it never saw across 30 timesteps of distractors; it did
not memorise its training set. Held-out lags 0-4 (``SHORT``) are the control: a net that
fails them too fails for another reason than the gradient's path.

While designing it (measured, not assumed): with the target the first of 40 inputs and no
marker, as the lab first had it, in 300 Adam steps (lr 3e-3, batches of 64) the default
LSTM and GRU learned on no seed, the forget-bias-1 LSTM on 2 of 3 and the plain RNN on 2 of
3 too (a saturated "latch" on its first inputs); with the marker always 30-34 steps back,
the gated nets escaped their plateau at a step that varied from seed to seed between 100
and over 600. Lags spread over the whole sequence in training make every
gated arm's training loss fall below half a constant prediction's by step 70-130 on each of
the demo's seeds (measured); ``STEPS`` = 300 leaves a margin.

nn.RNN, nn.LSTM and nn.GRU (PyTorch's default init) and an LSTM with forget-gate bias 1 are
trained the same way: Adam, mini-batches of ``BATCH`` from ``TRAIN_SEQUENCES`` training
sequences, ``STEPS`` steps (what the 2-core demo affords: about 6 s per seed for the four
arms, the GRU the slowest). The measure of the gradient's path is gradwatch's through-time
ratio: the gradient norm reaching the first timestep's input / the last one's, at step 0,
at the end and its median over the run. ``_judge`` writes every sentence from those numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch.thresholds import Thresholds

from .core import Arm, ArmResults, Experiment, RunResult, Verdict, run_length, spread
from .seed003 import LastStepRNN

__all__ = [
    "EXPERIMENTS",
    "LEARNED",
    "LENGTH",
    "LONG",
    "SHORT",
    "constant_loss",
    "held_out",
    "recall_data",
    "train_arm",
]

_T = Thresholds()
VANISHING_TIME = _T.through_time_vanishing_ratio  # 1e-3: gradwatch's limit through time
LEARNED = 0.5  # an arm learned if its held-out loss is below half the constant prediction's

LENGTH = 35  # timesteps
LONG = (30, LENGTH - 1)  # the held-out lags judged: the marker 30-34 steps before the last
SHORT = (0, 4)  # the control: lags that need no long path for the gradient
HIDDEN = 32
TRAIN_SEQUENCES = 4096
TEST_SEQUENCES = 512
TRAIN_DATA_SEED, LONG_DATA_SEED, SHORT_DATA_SEED = 0, 1, 2
BATCH = 128
STEPS = 300
LR = 1e-2
DETAIL_EVERY = 16  # gradwatch's detail steps (the through-time ratio): 0-7, then every 16th
EXP = "recurrent_architectures"


def recall_data(sequences: int = TRAIN_SEQUENCES, seed: int = TRAIN_DATA_SEED,
                lags: tuple[int, int] = (0, LENGTH - 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequences`` recall sequences, ``(sequences, LENGTH, 2)``: channel 0 N(0, 1) values,
    channel 1 a marker, 1 at one timestep ``lags[0]``-``lags[1]`` steps before the last
    (uniformly); the target is the marked value. A generator of its own (``seed``), so the
    data never depends on the torch seed."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(sequences, LENGTH, generator=g)
    lag = torch.randint(lags[0], lags[1] + 1, (sequences,), generator=g)
    where = LENGTH - 1 - lag
    rows = torch.arange(sequences)
    marker = torch.zeros(sequences, LENGTH)
    marker[rows, where] = 1.0
    return torch.stack([values, marker], dim=2), values[rows, where].clone()


def held_out(lags: tuple[int, int] = LONG) -> tuple[torch.Tensor, torch.Tensor]:
    """TEST_SEQUENCES held-out sequences with the marker ``lags`` steps back (LONG or
    SHORT), from generator seeds of their own: none of them is in the training set."""
    return recall_data(TEST_SEQUENCES, LONG_DATA_SEED if lags == LONG else SHORT_DATA_SEED,
                       lags)


@functools.cache
def constant_loss(lags: tuple[int, int] = LONG) -> float:
    """Held-out MSE at ``lags`` of predicting the training targets' mean: what a net that
    recalls nothing scores (about 1). Computed on first use, never at import: ``gradwatch
    run`` imports the lab (through the CLI) before it forks its re-run server, and tensor
    work at import would start OpenMP threads, which a forked process cannot use."""
    _, y = recall_data()
    _, y_test = held_out(lags)
    return float(((y_test - y.mean()) ** 2).mean())




def _recurrent(kind: str) -> nn.RNNBase:
    """One recurrent layer, 2 inputs, HIDDEN units, PyTorch's default init (but the forget
    bias of ``lstm_forget1``)."""
    if kind == "rnn":
        return nn.RNN(2, HIDDEN, batch_first=True)
    if kind == "gru":
        return nn.GRU(2, HIDDEN, batch_first=True)
    module = nn.LSTM(2, HIDDEN, batch_first=True)
    if kind == "lstm_forget1":  # gate order: input, forget, cell, output
        with torch.no_grad():
            module.bias_ih_l0[HIDDEN:2 * HIDDEN] = 1.0
            module.bias_hh_l0[HIDDEN:2 * HIDDEN] = 0.0
    return module


def _finite(values: Sequence[Any]) -> np.ndarray:
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    return v[np.isfinite(v)]


def train_arm(variant: str, claim: str, seed: int, steps: int = STEPS) -> RunResult:
    """One recurrent arm: Adam on shuffled mini-batches of BATCH training sequences for
    ``steps`` steps under gradwatch.watch (every step's training loss recorded), then the
    held-out loss and gradwatch's through-time ratios."""
    torch.manual_seed(seed)
    model = LastStepRNN(_recurrent(variant))
    x, y = recall_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    epochs = math.ceil(steps * BATCH / TRAIN_SEQUENCES)
    order = torch.cat([torch.randperm(TRAIN_SEQUENCES) for _ in range(epochs)])
    losses: list[float] = []
    with gradwatch.watch(model, optimizer, detail_every=DETAIL_EVERY) as gw:
        for step in range(steps):
            rows = order[step * BATCH:(step + 1) * BATCH]
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    report = gw.report()
    val = {}
    with torch.no_grad():
        for lags in (LONG, SHORT):
            x_test, y_test = held_out(lags)
            val[lags] = float(nn.functional.mse_loss(model(x_test), y_test))
    series = report.series["through_time"].get("rnn", {})
    ratios = _finite(series.get("ratio_first_to_last_timestep", []))
    finding = next((f for f in report.findings if f.kind == "vanishing_gradient"
                    and f.evidence.get("axis") == "time"), None)
    metrics = {
        "val_loss_long": val[LONG],
        "val_loss_short": val[SHORT],
        "grad_ratio_first_to_last_timestep": float(np.median(ratios)) if ratios.size
        else math.nan,
        "timestep_ratio_at_step0": float(ratios[0]) if ratios.size else math.nan,
        "timestep_ratio_at_end": float(ratios[-1]) if ratios.size else math.nan,
        "vanishing_reported": float(finding is not None and finding.severity != "info"),
    }
    return RunResult(EXP, variant, claim, losses[-1], losses, report, metrics)


# --- judge ----------------------------------------------------------------------------
NAMES = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU", "lstm_forget1": "LSTM(forget bias 1)"}
GATED = ("lstm", "gru", "lstm_forget1")
RATIO = "grad_ratio_first_to_last_timestep"


def _each(r: ArmResults, metric: str, digits: int = 2, arms: Sequence[str] = tuple(NAMES)) -> str:
    """``RNN 1.2e-07 (...), LSTM ...``: one metric of every arm with its spread."""
    return ", ".join(f"{NAMES[a]} {spread(r.metric(a, metric), digits)}" for a in arms)


def _learned(r: ArmResults, arm: str, metric: str = "val_loss_long",
             constant: float | None = None) -> list[bool]:
    """Per seed: the held-out loss below LEARNED x the constant prediction's (by default
    at the long lags)."""
    limit = LEARNED * (constant_loss(LONG) if constant is None else constant)
    return [v < limit for v in r.metric(arm, metric)]


def _keeps(r: ArmResults, arm: str) -> list[bool]:
    """Per seed: the first timestep still gets >= gradwatch's limit x the last one's
    gradient at the end of the run."""
    return [v >= VANISHING_TIME for v in r.metric(arm, "timestep_ratio_at_end")]


def _seeds(flags: list[bool]) -> str:
    return f"{sum(flags)} of {len(flags)} seeds"


def _and(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _judge(r: ArmResults) -> Verdict:
    """The verdict from the measured ratios and held-out losses; nothing is fixed."""
    rnn_ratio = r.metric("rnn", RATIO)
    vanishes = all(v < VANISHING_TIME for v in rnn_ratio)
    rnn_learned = _learned(r, "rnn")
    works = {a: all(_learned(r, a)) and all(_keeps(r, a)) for a in GATED}
    fixed = [a for a in GATED if works[a]]
    verdict = "holds" if vanishes and not any(rnn_learned) and works["lstm"] and works["gru"] \
        else "partly" if vanishes and not any(rnn_learned) and fixed else "does not hold"
    steps = run_length(r)
    observed = (
        f"held-out loss with the marker {LONG[0]}-{LONG[1]} steps back, after {steps} Adam "
        f"steps (predicting the mean scores {constant_loss(LONG):.2f}): "
        f"{_each(r, 'val_loss_long', 3)}; below {LEARNED:g}x the mean's for "
        + ", ".join(f"{NAMES[a]} on {_seeds(_learned(r, a))}" for a in NAMES)
        + f". Gradient reaching the first of {LENGTH} timesteps / the last one's, median "
        f"over the run: {_each(r, RATIO)}; at the end: {_each(r, 'timestep_ratio_at_end')}. "
        f"gradwatch reports vanishing through time for "
        + ", ".join(f"{NAMES[a]} on {_seeds([v == 1.0 for v in r.metric(a, 'vanishing_reported')])}"
                    for a in NAMES) + ".")
    start = _each(r, "timestep_ratio_at_step0")
    short = r.metric("rnn", "val_loss_short")
    short_learned = _learned(r, "rnn", "val_loss_short", constant_loss(SHORT))
    short_gated = [a for a in GATED
                   if all(_learned(r, a, "val_loss_short", constant_loss(SHORT)))]
    control = (
        f"The plain RNN learns the short lags ({SHORT[0]}-{SHORT[1]} steps back: held-out "
        f"loss {spread(short, 2)} against the mean's {constant_loss(SHORT):.2f}) but not the long "
        f"ones: it learns what its gradient reaches." if all(short_learned) else
        f"The plain RNN does not learn even the short lags ({SHORT[0]}-{SHORT[1]} steps "
        f"back: held-out loss {spread(short, 2)} against the mean's {constant_loss(SHORT):.2f}, "
        f"below {LEARNED:g}x on {_seeds(short_learned)}), so its failure here is not only "
        f"its vanishing gradient: it does not pick the marked value out of the distractors "
        f"even a few steps back"
        + (f", which {_and([NAMES[a] for a in short_gated])} "
           f"{'does' if len(short_gated) == 1 else 'do'} on every seed "
           f"({_each(r, 'val_loss_short', 2, short_gated)})." if short_gated else "."))
    at_start = [a for a in NAMES
                if all(v < VANISHING_TIME for v in r.metric(a, "timestep_ratio_at_step0"))]
    factors = {a: [v ** (1 / (LENGTH - 1)) for v in r.metric(a, "timestep_ratio_at_step0")]
               for a in NAMES}  # the geometric-mean factor per timestep at step 0
    per_step = ", ".join(f"{NAMES[a]} x{spread(v, 2)}" for a, v in factors.items())
    gained = [a for a in GATED if all(e > 100 * s for e, s in zip(
        r.metric(a, "timestep_ratio_at_end"), r.metric(a, "timestep_ratio_at_step0"),
        strict=True))]
    learned_by = [a for a in GATED if all(_learned(r, a))]
    reason = (
        (f"at step 0 the first timestep gets less than {VANISHING_TIME:g} of the last one's "
         f"gradient in {_and([NAMES[a] for a in at_start])} on every seed ({start}); "
         if at_start else f"at step 0 the first timestep gets {start} of the last one's "
         f"gradient; ")
        + f"per timestep the gradient is multiplied by {per_step}. At PyTorch's default init "
        f"an LSTM's forget gate and a GRU's update gate start near sigmoid(0) = 0.5, so "
        f"their state decays about as fast as the plain RNN's; a forget bias of 1 keeps "
        f"sigmoid(1) = 0.73 per step. "
        + (f"{_and([NAMES[a] for a in gained])} "
           f"{'raises' if len(gained) == 1 else 'raise'} the ratio over 100x by the end of "
           f"the run on every seed"
           + (f", while {'it learns' if len(gained) == 1 else 'they learn'} to recall the "
              f"marked value" if set(gained) <= set(learned_by) else "")
           + f"; the RNN ends at {spread(r.metric('rnn', 'timestep_ratio_at_end'), 2)}. "
           if gained else "No gated net raised its ratio 100x on every seed during the run. ")
        + control)
    ratio0 = [a / b for a, b in zip(r.metric("lstm_forget1", "timestep_ratio_at_step0"),
                                    r.metric("lstm", "timestep_ratio_at_step0"), strict=True)]
    repair = (
        (f"{_and([NAMES[a] for a in learned_by])} "
         f"{'learns' if len(learned_by) == 1 else 'learn'} the {LONG[0]}-step recall on every "
         f"seed in {steps} steps. " if learned_by else
         f"no gated net learned the {LONG[0]}-step recall on every seed in {steps} steps. ")
        + f"A forget-gate bias of 1 (bias_ih[H:2H] = 1, bias_hh[H:2H] = 0) gives the LSTM "
        f"{spread(ratio0, 2)}x the default LSTM's gradient at the first timestep at step 0 "
        f"and a held-out loss of {spread(r.metric('lstm_forget1', 'val_loss_long'), 2)} "
        f"(default init: {spread(r.metric('lstm', 'val_loss_long'), 2)}).")
    return Verdict(verdict, observed, reason, repair)


# --- arms and the experiment ------------------------------------------------------------
CLAIM_RNN = "vanishing gradients are common in plain RNNs (nn.RNN)"
CLAIM_LSTM = "vanishing gradients are rarer in LSTM"
CLAIM_GRU = "vanishing gradients are rarer in GRU"

SETUP = (f"one recurrent layer ({HIDDEN} hidden units, 2 inputs) + Linear({HIDDEN}, 1) on its "
         f"last output; {TRAIN_SEQUENCES} training sequences of {LENGTH} timesteps (data seed "
         f"{TRAIN_DATA_SEED}): a N(0, 1) value and a marker, 1 at one timestep 0-{LENGTH - 1} "
         f"steps before the last; target the marked value; MSE, Adam lr {LR:g}, shuffled "
         f"mini-batches of {BATCH}, {STEPS} steps; judged on {TEST_SEQUENCES} held-out "
         f"sequences (data seed {LONG_DATA_SEED}) with the marker {LONG[0]}-{LONG[1]} steps "
         f"back, {SHORT[0]}-{SHORT[1]} steps back as the control; the through-time ratio "
         f"measured on steps 0-7 and every {DETAIL_EVERY}th")


def _runner(variant: str, claim: str, doc: str) -> Callable[..., RunResult]:
    def run(seed: int = 0, steps: int = STEPS) -> RunResult:
        return train_arm(variant, claim, seed, steps)
    run.__doc__ = doc
    run.__name__ = run.__qualname__ = f"{variant}_run"
    return run


def _arm(name: str, claim: str, text: str, role: str) -> Arm:
    return Arm(name, claim, f"{SETUP}; {text}", _runner(name, claim, f"{SETUP}; {text}"),
               role=role)


ARMS = (
    _arm("rnn", CLAIM_RNN, "nn.RNN (tanh), default init.", "seed"),
    _arm("lstm", CLAIM_LSTM, "nn.LSTM, default init.", "repair"),
    _arm("gru", CLAIM_GRU, "nn.GRU, default init.", "repair"),
    _arm("lstm_forget1", "", f"nn.LSTM with forget-gate bias 1 (bias_ih_l0[{HIDDEN}:"
         f"{2 * HIDDEN}] = 1, bias_hh_l0[{HIDDEN}:{2 * HIDDEN}] = 0), otherwise default "
         f"init.", "repair"),
)

EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(EXP, "seeds 000/004", "Vanishing gradients through time: RNN, LSTM, GRU",
               "vanishing gradients are common in plain RNNs and rarer in LSTM and GRU",
               f"The seeds give no code. Equal size, equal task: {SETUP}. A net learned the "
               f"long dependency if its held-out loss {LONG[0]}-{LONG[1]} steps back is below "
               f"{LEARNED:g}x a constant prediction's. The gradient measure is gradwatch's "
               "through-time ratio: the gradient norm reaching the first timestep's input / "
               "the last one's. The marker says which value to keep (without it no gated net "
               "learned in budget); in training it is anywhere in the sequence, so the short "
               "lags teach what to keep. An LSTM with forget-gate bias 1 (a common practice "
               "the seeds do not mention) is run beside the default-init nets. The curves "
               "are the training loss of every step (all lags).",
               ARMS, _judge, cost_s=6.3, evidence="through_time"),
)
"""The recurrent-architecture claim, after the depth one (architectures.py)."""
