"""Seed 000's dying-ReLU claims (SEEDS.md section 3), measured, with the proposed remedies.

The seed says that a ReLU unit whose input is <= 0 for every sample outputs 0 for any input
and never recovers, that this is more likely with a higher learning rate and with a larger
negative bias, and proposes a lower learning rate, a positive bias, LeakyReLU, PReLU and
ELU. It gives no code, so the lab builds the obvious minimal experiment: a two-hidden-layer
ReLU MLP (8 -> 32 -> 32 -> 1) trained full batch with Adam and MSE on a fixed regression
task (256 points made in code), and two experiments:

1. ``dying_relu_high_lr``: Adam lr 0.3 instead of 0.01; repairs at lr 0.3 (LeakyReLU, PReLU,
   ELU, positive bias init) and the lower learning rate itself;
2. ``dying_relu_negative_bias``: the second hidden layer's bias set to -3 at
   initialisation; repairs with that bias (LeakyReLU, PReLU, ELU, a 10x lower learning
   rate) and a positive bias init.

Besides gradwatch's report, each run measures its own per-step dead mask on the Linear
outputs that feed the activations (pre-activation <= 0 for every sample: for ReLU a dead
unit; for LeakyReLU/PReLU/ELU a unit in the negative region, which still passes a gradient),
so that gradwatch's ``dying_relu`` finding can be checked against a direct count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

import gradwatch

from .core import (
    Arm,
    ArmResults,
    Experiment,
    RunResult,
    Verdict,
    at_steps,
    deviating,
    fit,
    most_seeds,
    percent,
    spread,
)

__all__ = ["EXPERIMENTS", "ReluMLP", "task_data", "train_arm"]

N_SAMPLES, N_FEATURES, HIDDEN = 256, 8, 32
STEPS = 100
LR, LR_HIGH, LR_LOW = 0.01, 0.3, 0.001
NEGATIVE_BIAS, POSITIVE_BIAS = -3.0, 0.1
DEAD_SHARE = 0.25  # a site with at least this share of dead units has a dying-ReLU problem
REVIVE_AFTER = 10  # a unit dead this many steps in a row that is alive at the end "revived"
DATA_SEED = 1234
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "prelu": nn.PReLU, "elu": nn.ELU}
NAMES = {"relu": "ReLU", "leaky_relu": "LeakyReLU(0.01)", "prelu": "PReLU", "elu": "ELU"}


def task_data() -> tuple[torch.Tensor, torch.Tensor]:
    """256 points, 8 N(0, 1) features, y = sin(2 x0) + x1 x2 + 0.5 x3 (generator seed 1234)."""
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=g)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.5 * x[:, 3:4]
    return x, y


@functools.cache
def constant_prediction_loss() -> float:
    """MSE of predicting the mean of y for every input (2.09): the loss of a net whose hidden
    units are all dead, since its output is then its last bias. Computed on first use, never
    at import (see ``recurrent.constant_loss``)."""
    return float(task_data()[1].var(unbiased=False))


class ReluMLP(nn.Sequential):
    """Linear(8, 32) -> act -> Linear(32, 32) -> act -> Linear(32, 1); PyTorch's default init.

    Layers ``0`` and ``2`` feed the activations ``1`` and ``3`` (gradwatch's site names).
    """

    def __init__(self, activation: str = "relu") -> None:
        act = ACTIVATIONS[activation]
        super().__init__(nn.Linear(N_FEATURES, HIDDEN), act(), nn.Linear(HIDDEN, HIDDEN),
                         act(), nn.Linear(HIDDEN, 1))

    @property
    def feeding(self) -> tuple[nn.Linear, nn.Linear]:
        """The two Linear layers whose outputs are the activations' inputs."""
        return self[0], self[2]  # type: ignore[return-value]


def _revived(masks: list[torch.Tensor], final: torch.Tensor) -> int:
    """Units dead on REVIVE_AFTER consecutive steps at some point that are alive at the end."""
    if len(masks) < REVIVE_AFTER:
        return 0
    stacked = torch.stack(masks).int()  # steps x units
    run = torch.zeros_like(stacked[0])
    longest = torch.zeros_like(run)
    for row in stacked:
        run = (run + 1) * row
        longest = torch.maximum(longest, run)
    return int(((longest >= REVIVE_AFTER) & ~final).sum())


def _gradwatch_dead(report: gradwatch.Report) -> float:
    """The last dead fraction gradwatch measured, max over ReLU sites (NaN without sites)."""
    last = []
    for values in report.series.get("dead_fraction", {}).values():
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if finite:
            last.append(finite[-1])
    return max(last) if last else math.nan


def train_arm(experiment: str, variant: str, claim: str, seed: int, activation: str = "relu",
              lr: float = LR, bias: float | None = None, bias_layers: tuple[int, ...] = (2,),
              steps: int = STEPS) -> RunResult:
    """Full-batch Adam + MSE for ``steps`` (STEPS) steps under gradwatch.watch, counting dead
    units.

    ``bias``, when given, is written into the bias of the Linear layers ``bias_layers`` right
    after the model is built (the rest is PyTorch's default init).
    """
    torch.manual_seed(seed)
    x, y = task_data()
    model = ReluMLP(activation)
    if bias is not None:
        with torch.no_grad():
            for i in bias_layers:
                model[i].bias.fill_(bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    masks: list[list[torch.Tensor]] = [[], []]

    def recorder(k: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object, out: torch.Tensor) -> None:
            masks[k].append((out.detach() <= 0).all(0))
        return hook

    handles = [layer.register_forward_hook(recorder(k)) for k, layer in enumerate(model.feeding)]
    try:
        losses, report = fit(model, optimizer, x, y, steps)
        with torch.no_grad():  # the state after the last update, on the whole data set
            model(x)
    finally:
        for h in handles:
            h.remove()
    final = [m[-1] for m in masks]
    negative = max(float(f.float().mean()) for f in final)
    dead_units = sum(int(f.sum()) for f in final)
    peak = max(float(torch.stack(m[:-1]).float().mean(1).max()) for m in masks)
    revived = sum(_revived(m[:-1], f) for m, f in zip(masks, final, strict=True))
    relu = activation == "relu"
    metrics = {
        # ReLU: units that output 0 for every sample; others: units whose pre-activation is
        # <= 0 for every sample (they would be dead under ReLU but still pass a gradient).
        "dead_fraction": negative if relu else math.nan,
        "negative_fraction": negative,
        "peak_dead_fraction": peak if relu else math.nan,
        "dead_units": dead_units if relu else math.nan,
        "revived_units": revived if relu else math.nan,
        "gradwatch_dead_fraction": _gradwatch_dead(report),
        "gradwatch_dying_relu": float(any(f.kind == "dying_relu" and f.severity != "info"
                                          for f in report.findings)),
    }
    return RunResult(experiment, variant, claim, losses[-1], losses, report, metrics)


def _arm(experiment: str, variant: str, claim: str, **kwargs: object
         ) -> Callable[[int], RunResult]:
    def run(seed: int = 0, steps: int = STEPS) -> RunResult:
        return train_arm(experiment, variant, claim, seed, steps=steps,
                         **kwargs)  # type: ignore[arg-type]
    run.__doc__ = f"{experiment}, arm {variant}: {kwargs}"
    return run


_SETUP = (f"Linear({N_FEATURES}, {HIDDEN}) -> {{act}} -> Linear({HIDDEN}, {HIDDEN}) -> {{act}} "
          f"-> Linear({HIDDEN}, 1), PyTorch's default init; full-batch MSE on y = sin(2 x0) + "
          f"x1 x2 + 0.5 x3 ({N_SAMPLES} points, {N_FEATURES} N(0, 1) features, generator seed "
          f"{DATA_SEED}); Adam, {STEPS} steps")


def _desc(act: str = "relu", lr: float = LR, bias: str = "") -> str:
    return _SETUP.format(act=NAMES[act]) + f", lr {lr:g}" + (f"; {bias}" if bias else "") + "."


def _dying_text(r: ArmResults, arm: str) -> str:
    """What gradwatch said about the dead units of one run (seed 0), from its evidence."""
    f = r.finding(arm, "dying_relu")
    if f is None:
        return "gradwatch (seed 0) reports no dying_relu finding"
    sites = f.evidence.get("sites") or [f.evidence]
    where = "; ".join(
        f"site {s.get('site')}: {s.get('dead_units')} of {s.get('units')} units dead from step "
        f"{s.get('dead_since_step')}, mean bias on them {_num(s.get('bias_init_mean'))} at the "
        f"start and {_num(s.get('bias_dead_mean'))} at the end" for s in sites)
    causes = ", ".join(c.id for c in f.causes) or "no cause named"
    return f"gradwatch (seed 0): dying_relu {f.severity} ({where}; causes: {causes})"


def _num(x: object) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) else "?"


def _gradwatch_agrees(r: ArmResults, arm: str) -> str:
    """Whether gradwatch's last dead fraction matches the direct count on every seed."""
    own, gw = r.metric(arm, "dead_fraction"), r.metric(arm, "gradwatch_dead_fraction")
    same = all(abs(a - b) <= 0.1 for a, b in zip(own, gw, strict=True))
    return (f"gradwatch's last measured dead fraction, {percent(gw)}, "
            + ("agrees with the direct count" if same else
               f"differs from the direct count ({percent(own)})"))


def _first_update(r: ArmResults, arm: str, layer: str = "2") -> list[float]:
    """Per seed: the first step's update / weight norm of ``layer`` (the second Linear)."""
    out = []
    for run in r[arm]:
        ratios = run.report.series["update_ratio"].get(layer) or [None]
        out.append(math.nan if ratios[0] is None else float(ratios[0]))
    return out


def _findings_count(r: ArmResults, arm: str, kind: str) -> int:
    return sum(kind in k for k in r.kinds(arm))


def _repairs(r: ArmResults, arms: list[str], reference: list[float], broken: list[float],
             ) -> tuple[list[str], list[str], list[str], str]:
    """Sort repair arms into: reach the reference loss (within 2x on most seeds), improve
    on the broken arm (below half its loss on most seeds), do not help; and a line each."""
    works, helps, fails, lines = [], [], [], []
    for arm in arms:
        loss = r.losses(arm)
        reach = most_seeds([math.isfinite(v) and v <= 2 * ref
                       for v, ref in zip(loss, reference, strict=True)])
        better = most_seeds([math.isfinite(v) and v < 0.5 * b
                        for v, b in zip(loss, broken, strict=True)])
        (works if reach else helps if better else fails).append(arm)
        neg = r.metric(arm, "negative_fraction")
        lines.append(f"{arm}: loss {spread(loss)}, units <= 0 on every sample {percent(neg)}")
    return works, helps, fails, "; ".join(lines)


def _they(arms: list[str], singular: str, plural: str) -> str:
    """``a, b do`` / ``a does``: the arm names with the verb in the right number."""
    return f"{', '.join(arms)} {singular if len(arms) == 1 else plural}"


def _verdict(*parts: bool) -> str:
    return "holds" if all(parts) else "partly" if any(parts) else "does not hold"


# --- 1. a high learning rate -----------------------------------------------------------
EXP1 = "dying_relu_high_lr"
CLAIM_HIGH_LR = ("with a higher learning rate ReLU units are more likely to die: once a unit "
                 "gets a negative input for every sample it outputs 0 for any input and never "
                 "recovers; convergence slows or stops")
HIGH_LR_REPAIRS = ("relu_lr0.01", "leaky_relu_lr0.3", "prelu_lr0.3", "elu_lr0.3",
                   "relu_bias+0.1_lr0.3")


def _revival(r: ArmResults, arm: str) -> tuple[list[bool], str]:
    """Per seed: did (almost) no dead unit come back (at most 10% of those dead at the
    end); and a sentence with the counts."""
    revived, dead = r.metric(arm, "revived_units"), r.metric(arm, "dead_units")
    never = [v <= 0.1 * max(d, 1) for v, d in zip(revived, dead, strict=True)]
    return never, (f"units dead for {REVIVE_AFTER}+ steps in a row that were alive again at "
                   f"the end: {spread(revived)} per run, against {spread(dead)} dead at the end"
                   f"{deviating(never)}")


def _judge_high_lr(r: ArmResults) -> Verdict:
    high, ctrl = r.losses("relu_lr0.3"), r.losses("relu_lr0.01")
    dead, dead_ctrl = r.metric("relu_lr0.3", "dead_fraction"), \
        r.metric("relu_lr0.01", "dead_fraction")
    kills = [d >= DEAD_SHARE and d >= dc + 0.2 for d, dc in zip(dead, dead_ctrl, strict=True)]
    worse = [not math.isfinite(h) or h > 2 * c for h, c in zip(high, ctrl, strict=True)]
    never, revival = _revival(r, "relu_lr0.3")
    verdict = _verdict(most_seeds(kills), most_seeds(worse), most_seeds(never))
    repairs = [a for a in HIGH_LR_REPAIRS if a != "relu_lr0.01"]
    works, helps, fails, lines = _repairs(r, repairs, ctrl, high)
    n = len(high)
    jumps = {a: _findings_count(r, a, "loss_divergence") for a in ("relu_lr0.3", *repairs)}
    jumpy = [a for a in repairs if a.split("_lr")[0] in ACTIVATIONS and jumps[a]]
    return Verdict(
        verdict,
        f"at lr {LR_HIGH:g} the ReLU net ends with {percent(dead)} of a hidden layer's units dead "
        f"(the worse of the two layers; peak during training "
        f"{percent(r.metric('relu_lr0.3', 'peak_dead_fraction'))}) against {percent(dead_ctrl)} at "
        f"lr {LR:g}{deviating(kills)}; its loss ends at {spread(high)} against {spread(ctrl)}"
        f"{deviating(worse)}; {revival}.",
        f"Adam's first update at lr {LR_HIGH:g} moves the second layer's weights by "
        f"{spread(_first_update(r, 'relu_lr0.3'))}x their own norm (gradwatch's update/weight "
        f"ratio at step 0): Adam steps each weight by about the learning rate whatever the "
        f"gradient's size, more than the weights' own scale (default init bound "
        f"1/sqrt(fan_in) = {1 / math.sqrt(HIDDEN):.2f} for the second layer): the loss jumps "
        f"(gradwatch: "
        f"loss_divergence on {jumps['relu_lr0.3']} of {n} seeds) and the second layer's biases "
        f"and weights are pushed to where most units are <= 0 for every sample; those output 0, "
        f"get no gradient, and only changes of the first layer can bring one back. "
        f"{_dying_text(r, 'relu_lr0.3')}. {_gradwatch_agrees(r, 'relu_lr0.3')}."
        + (" LeakyReLU/PReLU/ELU keep a gradient for negative inputs, so no unit is dead, but "
           "the same oversized steps remain (loss_divergence: "
           + ", ".join(f"{a} {jumps[a]}/{n}" for a in jumpy) + ")." if jumpy else ""),
        f"the lower learning rate (lr {LR:g}) removes the cause: loss {spread(ctrl)}, "
        f"{percent(dead_ctrl)} dead. At lr {LR_HIGH:g}: "
        + (f"{_they(works, 'reaches', 'reach')} that loss; " if works else "no other repair "
           "reaches that loss; ")
        + (f"{_they(helps, 'improves', 'improve')} on the ReLU net but "
           f"{'stays' if len(helps) == 1 else 'stay'} well above it; "
           if helps else "")
        + (f"{_they(fails, 'does', 'do')} not help (below half the ReLU net's loss on too few "
           f"seeds)" if fails else "")
        + f". {lines}.")


# --- 2. a large negative bias ------------------------------------------------------------
EXP2 = "dying_relu_negative_bias"
CLAIM_NEG_BIAS = ("with a larger negative bias ReLU units are more likely to die and never "
                  "recover; convergence slows or stops")
NEG_BIAS_REPAIRS = ("relu_bias-3_lr0.001", "leaky_relu_bias-3", "prelu_bias-3", "elu_bias-3",
                    "relu_bias+0.1")


def _pre_activation_spread(r: ArmResults, arm: str) -> str:
    """The dead site's pre-activation std at gradwatch's first measurement (seed 0)."""
    f = r.finding(arm, "dying_relu")
    sites = (f.evidence.get("sites") or [f.evidence]) if f is not None else []
    std = [s.get("pre_activation_std", {}).get("first") for s in sites]
    std = [v for v in std if isinstance(v, (int, float))]
    return f"std {_num(max(std))} at gradwatch's first measurement" if std else "small"


def _dead_since(r: ArmResults, arm: str) -> str:
    """`` from step 0``: since when gradwatch saw the most-dead site dead, on every seed
    (``""`` when it reported no dying_relu)."""
    since = []
    for k in range(len(r[arm])):
        f = r.finding(arm, "dying_relu", k)
        sites = (f.evidence.get("sites") or [f.evidence]) if f is not None else []
        if sites:
            worst = max(sites, key=lambda s: s.get("dead_fraction", 0))
            since.append(worst.get("dead_since_step", math.nan))
    return f" from {at_steps(since)}" if since else ""


def _judge_negative_bias(r: ArmResults) -> Verdict:
    broken, healthy = r.losses("relu_bias-3"), r.losses("relu_bias+0.1")
    dead = r.metric("relu_bias-3", "dead_fraction")
    kills = [d >= DEAD_SHARE for d in dead]
    stalls = [math.isfinite(v) and abs(v - constant_prediction_loss())
              < 0.05 * constant_prediction_loss() for v in broken]
    worse = [not math.isfinite(b) or b > 2 * h for b, h in zip(broken, healthy, strict=True)]
    never, revival = _revival(r, "relu_bias-3")
    verdict = _verdict(most_seeds(kills), most_seeds(worse), most_seeds(never))
    repairs = [a for a in NEG_BIAS_REPAIRS if a != "relu_bias+0.1"]
    works, helps, fails, lines = _repairs(r, repairs, healthy, broken)
    low_lr = r.metric("relu_bias-3_lr0.001", "dead_fraction")
    return Verdict(
        verdict,
        f"with bias {NEGATIVE_BIAS:g} on the second hidden layer {percent(dead)} of a layer's "
        f"units are dead at the end{deviating(kills)}; the loss ends at {spread(broken)}"
        + (f", the loss of predicting the mean of y ({constant_prediction_loss():.2f})"
           if most_seeds(stalls) else "")
        + f", against {spread(healthy)} with bias +{POSITIVE_BIAS:g}{deviating(worse)}; "
        f"{revival}.",
        f"that layer's pre-activation is its bias plus a weighted sum of the first layer's "
        f"non-negative outputs, whose spread ({_pre_activation_spread(r, 'relu_bias-3')}) is "
        f"far smaller than {-NEGATIVE_BIAS:g}: every unit is <= 0 for every sample"
        f"{_dead_since(r, 'relu_bias-3')}, "
        f"the layer outputs 0, the net's output is its last bias, and no gradient reaches the "
        f"layers below, whatever the learning rate. {_dying_text(r, 'relu_bias-3')}. "
        f"{_gradwatch_agrees(r, 'relu_bias-3')}.",
        f"not setting the bias negative: both hidden biases at +{POSITIVE_BIAS:g} give loss "
        f"{spread(healthy)}. With the bias at {NEGATIVE_BIAS:g}: "
        + (f"{_they(works, 'reaches', 'reach')} that loss; " if works else "no other repair "
           "reaches that loss; ")
        + (f"{_they(helps, 'revives', 'revive')} the units (a gradient passes for negative "
           f"inputs, where ReLU passes none) but {'stays' if len(helps) == 1 else 'stay'} "
           f"well above it; " if helps else "")
        + (f"{_they(fails, 'does', 'do')} not help" if fails else "")
        + (f" (a lower learning rate cannot revive a unit that gets no gradient: "
           f"{percent(low_lr)} dead)" if "relu_bias-3_lr0.001" in fails else "")
        + f". {lines}.")


_BIAS2 = f"the second hidden Linear's bias filled with {NEGATIVE_BIAS:g} after init"
_POS = f"both hidden Linear biases filled with +{POSITIVE_BIAS:g} after init"


def _arms() -> dict[str, Arm]:
    return {
        "relu_lr0.3": Arm("relu_lr0.3", CLAIM_HIGH_LR, _desc(lr=LR_HIGH),
                          _arm(EXP1, "relu_lr0.3", CLAIM_HIGH_LR, lr=LR_HIGH)),
        "relu_lr0.01": Arm("relu_lr0.01", "", _desc(lr=LR) + " The control, and the seed's "
                           "remedy 'a lower learning rate'.",
                           _arm(EXP1, "relu_lr0.01", "", lr=LR), role="repair"),
        **{f"{act}_lr0.3": Arm(f"{act}_lr0.3", "", _desc(act, LR_HIGH),
                               _arm(EXP1, f"{act}_lr0.3", "", activation=act, lr=LR_HIGH),
                               role="repair")
           for act in ("leaky_relu", "prelu", "elu")},
        "relu_bias+0.1_lr0.3": Arm("relu_bias+0.1_lr0.3", "", _desc(lr=LR_HIGH, bias=_POS),
                                   _arm(EXP1, "relu_bias+0.1_lr0.3", "", lr=LR_HIGH,
                                        bias=POSITIVE_BIAS, bias_layers=(0, 2)), role="repair"),
        "relu_bias-3": Arm("relu_bias-3", CLAIM_NEG_BIAS, _desc(bias=_BIAS2),
                           _arm(EXP2, "relu_bias-3", CLAIM_NEG_BIAS, bias=NEGATIVE_BIAS)),
        "relu_bias-3_lr0.001": Arm("relu_bias-3_lr0.001", "", _desc(lr=LR_LOW, bias=_BIAS2),
                                   _arm(EXP2, "relu_bias-3_lr0.001", "", lr=LR_LOW,
                                        bias=NEGATIVE_BIAS), role="repair"),
        **{f"{act}_bias-3": Arm(f"{act}_bias-3", "", _desc(act, bias=_BIAS2),
                                _arm(EXP2, f"{act}_bias-3", "", activation=act,
                                     bias=NEGATIVE_BIAS), role="repair")
           for act in ("leaky_relu", "prelu", "elu")},
        "relu_bias+0.1": Arm("relu_bias+0.1", "", _desc(bias=_POS),
                             _arm(EXP2, "relu_bias+0.1", "", bias=POSITIVE_BIAS,
                                  bias_layers=(0, 2)), role="repair"),
    }


_A = _arms()
_NO_CODE = ("The seed gives no code: the lab builds the obvious minimal experiment. ")
EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(EXP1, "seed 000", "Dying ReLU: a high learning rate",
               "ReLU units die more easily with a higher learning rate: a unit whose input is "
               "<= 0 for every sample outputs 0 for any input and never recovers, and "
               "convergence slows or stops. Remedies: a lower learning rate, a positive bias, "
               "LeakyReLU, PReLU, ELU",
               _NO_CODE + _desc(lr=LR_HIGH) + f" The control is the same net at Adam's usual lr "
               f"{LR:g}. Dead units are counted directly (pre-activation <= 0 for every sample, "
               f"at every step) and by gradwatch. Repairs at lr {LR_HIGH:g}: LeakyReLU, PReLU, "
               f"ELU, both hidden biases at +{POSITIVE_BIAS:g}.",
               (_A["relu_lr0.3"], *(_A[a] for a in HIGH_LR_REPAIRS)), _judge_high_lr,
               cost_s=2.0, evidence="dead_units"),
    Experiment(EXP2, "seed 000", "Dying ReLU: a large negative bias",
               "ReLU units die more easily with a larger negative bias, and never recover. "
               "Remedies: a positive bias, a lower learning rate, LeakyReLU, PReLU, ELU",
               _NO_CODE + _desc(bias=_BIAS2) + f" Repairs with that bias: LeakyReLU, PReLU, "
               f"ELU, a 10x lower lr ({LR_LOW:g}); and the positive bias init (+"
               f"{POSITIVE_BIAS:g} on both hidden layers) instead of it.",
               (_A["relu_bias-3"], *(_A[a] for a in NEG_BIAS_REPAIRS)), _judge_negative_bias,
               cost_s=2.0, evidence="dead_units"),
)
"""Seed 000's dying-ReLU experiments: a high learning rate, a large negative bias."""
