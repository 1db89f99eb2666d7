"""Seed 001's claim about ``model.eval()`` and ``torch.no_grad()`` (SEEDS.md section 5), measured.

The seed says that ``model.eval()`` switches Dropout (keep every unit) and BatchNorm (use
the running statistics) to inference behaviour; that forgetting it makes Dropout keep
dropping units, so the outputs differ run to run, and BatchNorm use the batch's statistics,
so the results jitter and in bad cases blow up; and that ``torch.no_grad()`` only turns
gradient tracking off (memory, speed), so evaluation wants both. It gives only the
two-line idiom, so the lab builds the obvious minimal experiment: an MLP with BatchNorm and
Dropout trained for a few dozen mini-batch steps under :func:`gradwatch.watch`, validated
after every epoch in one of three ways (the arms):

* ``no_grad_only``: ``with torch.no_grad(): model(x)``, without ``model.eval()`` (the
  mistake the seed warns about);
* ``eval_and_no_grad``: ``model.eval()`` and ``torch.no_grad()`` (the seed's idiom);
* ``eval_only``: ``model.eval()`` without ``torch.no_grad()``.

After training, the same trained model is measured in its arm's evaluation mode, unwatched:
two evaluations of the same held-out inputs (do they agree?), the accuracy over five
evaluations, the BatchNorm running statistics before and after one evaluation pass, the
same inputs in a different batch order with Dropout off (BatchNorm's own jitter), a batch
of 2 and of 1, and the bytes autograd saved for a backward that never comes.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

import gradwatch

from .core import (
    Arm,
    ArmResults,
    Experiment,
    RunResult,
    Verdict,
    deviating,
    most_seeds,
    percent,
    spread,
)

__all__ = ["EXPERIMENTS", "MODES", "DropoutBNNet", "evaluate", "task_data"]

N_FEATURES, HIDDEN, CLASSES = 10, 64, 4
N_TRAIN, N_VAL = 512, 256
BATCH, VAL_BATCH, EPOCHS = 32, 64, 4
DROPOUT = 0.3
LR = 0.01
DATA_SEED = 4321
REPEATS = 5  # evaluations of the held-out set per arm for the accuracy's range
MODES = ("no_grad_only", "eval_and_no_grad", "eval_only")
SAME = 1e-6  # relative L2 difference below which two evaluations count as identical


def task_data() -> tuple[torch.Tensor, ...]:
    """Training and held-out sets: 10 N(0, 1) features, 4 classes from two rules.

    class = 2 [x0 + 0.5 x1 > 0] + [x2 x3 > 0]; generator seed 4321 (the same for every
    torch seed, which only changes the model's init and the training's randomness).
    """
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(N_TRAIN + N_VAL, N_FEATURES, generator=g)
    y = 2 * (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] * x[:, 3] > 0).long()
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


class DropoutBNNet(nn.Sequential):
    """(Linear -> BatchNorm1d -> ReLU -> Dropout(0.3)) x 2 -> Linear(64, 4)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Linear(N_FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Dropout(DROPOUT),
            nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Dropout(DROPOUT),
            nn.Linear(HIDDEN, CLASSES))

    def norms(self) -> list[nn.BatchNorm1d]:
        return [m for m in self if isinstance(m, nn.BatchNorm1d)]


@contextlib.contextmanager
def _mode(model: nn.Module, mode: str, dropout_off: bool = False) -> Iterator[None]:
    """The arm's way of evaluating; the model is back in training mode afterwards."""
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; one of {MODES}")
    if mode != "no_grad_only":
        model.eval()
    if dropout_off:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
    grad = contextlib.nullcontext() if mode == "eval_only" else torch.no_grad()
    try:
        with grad:
            yield
    finally:
        model.train()


def evaluate(model: nn.Module, x: torch.Tensor, mode: str, batch: int = VAL_BATCH,
             order: torch.Tensor | None = None, dropout_off: bool = False) -> torch.Tensor:
    """Outputs for ``x`` evaluated the arm's way in batches (in ``order``, returned in the
    original order); ``dropout_off`` switches only Dropout to eval mode."""
    idx = order if order is not None else torch.arange(len(x))
    out = torch.empty(len(x), CLASSES)
    with _mode(model, mode, dropout_off):
        for i in range(0, len(x), batch):
            rows = idx[i: i + batch]
            out[rows] = model(x[rows]).detach()
    return out


def _bn_state(model: DropoutBNNet) -> list[torch.Tensor]:
    return [b.clone() for m in model.norms() for b in (m.running_mean, m.running_var)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    ref = float(b.norm())
    d = float((a - b).norm())
    return d / ref if ref > 0 else (0.0 if d == 0 else math.inf)


def _bn_change(before: list[torch.Tensor], model: DropoutBNNet) -> float:
    now = _bn_state(model)
    d = math.sqrt(sum(float((n - b).norm()) ** 2 for n, b in zip(now, before, strict=True)))
    ref = math.sqrt(sum(float(b.norm()) ** 2 for b in before))
    return d / ref


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(1) == y).float().mean())


def _saved_bytes(model: nn.Module, x: torch.Tensor, mode: str) -> int:
    """Bytes of the tensors autograd keeps for backward during one evaluation pass."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        evaluate(model, x, mode)
    return total[0]


def _measure(model: DropoutBNNet, mode: str, x: torch.Tensor, y: torch.Tensor,
             seed: int) -> dict[str, float]:
    """Everything the claim is about, on the trained model, unwatched."""
    reference = copy.deepcopy(model)
    ref_out = evaluate(reference, x, "eval_and_no_grad")
    before = _bn_state(model)
    outs = [evaluate(model, x, mode)]
    bn_change = _bn_change(before, model)  # what one evaluation pass did to the statistics
    outs += [evaluate(model, x, mode) for _ in range(REPEATS - 1)]
    acc = [_accuracy(o, y) for o in outs]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
    bn_only = [evaluate(model, x, mode, dropout_off=True),
               evaluate(model, x, mode, order=order, dropout_off=True)]
    small = evaluate(model, x, mode, batch=2)
    small_bn = evaluate(model, x, mode, batch=2, dropout_off=True)
    try:
        evaluate(model, x[:1], mode, batch=1)
        batch1_error = 0.0
    except ValueError:  # BatchNorm in training mode needs more than one value per channel
        batch1_error = 1.0
    return {
        "output_rel_diff": _relative(outs[1], outs[0]),
        "output_max_abs_diff": float((outs[1] - outs[0]).abs().max()),
        "val_accuracy": acc[0],
        "val_accuracy_min": min(acc),
        "val_accuracy_max": max(acc),
        "eval_accuracy": _accuracy(ref_out, y),
        "rel_diff_from_eval": _relative(outs[0], ref_out),
        "bn_running_stats_change": bn_change,
        "bn_batch_order_rel_diff": _relative(bn_only[1], bn_only[0]),
        "batch2_accuracy": _accuracy(small, y),
        "batch2_bn_rel_diff_from_eval": _relative(small_bn, ref_out),
        "batch2_max_abs_output": float(small.abs().max()),
        "eval_max_abs_output": float(ref_out.abs().max()),
        "batch1_error": batch1_error,
        "saved_bytes": float(_saved_bytes(model, x, mode)),
    }


def train_arm(mode: str, seed: int, epochs: int = EPOCHS) -> RunResult:
    """Adam on mini-batches of 32 for ``epochs`` (4) epochs under gradwatch.watch, validating
    after every epoch the arm's way; then the measurements of :func:`_measure` on the trained
    model."""
    torch.manual_seed(seed)
    x, y, xv, yv = task_data()
    model = DropoutBNNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()
    losses: list[float] = []
    val_loss: list[float] = []
    with gradwatch.watch(model, optimizer) as gw:
        for _ in range(epochs):
            perm = torch.randperm(N_TRAIN)
            for i in range(0, N_TRAIN, BATCH):
                rows = perm[i: i + BATCH]
                optimizer.zero_grad()
                loss = criterion(model(x[rows]), y[rows])
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            val_loss.append(float(criterion(evaluate(model, xv, mode), yv)))
    report = gw.report()
    metrics = _measure(model, mode, xv, yv, seed)
    metrics["val_loss"] = val_loss[-1]
    f = next((f for f in report.findings if f.kind == "eval_mode"), None)
    metrics["gradwatch_eval_mode"] = float(f is not None and f.severity != "info")
    rel = f.evidence.get("output_rel_diff") if f is not None else None
    metrics["gradwatch_output_rel_diff"] = float(rel) if isinstance(rel, (int, float)) \
        else math.nan
    return RunResult(EXP, mode, CLAIMS[mode], losses[-1], losses, report, metrics)


EXP = "eval_mode"
CLAIMS = {
    "no_grad_only": ("without model.eval() Dropout keeps dropping units, so the outputs differ "
                     "every time, and BatchNorm uses the current batch's statistics, so the "
                     "results jitter and in bad cases blow up"),
    "eval_and_no_grad": ("model.eval() switches Dropout and BatchNorm to inference; "
                         "torch.no_grad() turns gradients off; evaluation uses both"),
    "eval_only": ("torch.no_grad() only turns gradient tracking off (saves memory, speeds "
                  "up): model.eval() alone gives the inference outputs, with a graph kept"),
}


def _gradwatch_text(r: ArmResults) -> str:
    """gradwatch's eval_mode finding on the mistake, and whether the repairs are clean."""
    f = r.finding("no_grad_only", "eval_mode")
    n = len(r["no_grad_only"])
    found = sum("eval_mode" in k for k in r.kinds("no_grad_only"))
    clean = {arm: sum("eval_mode" not in k for k in r.kinds(arm))
             for arm in ("eval_and_no_grad", "eval_only")}
    text = f"gradwatch reports eval_mode on {found} of {n} seeds of no_grad_only"
    if f is not None:
        ev = f.evidence
        text += (f" (seed 0: {ev.get('no_grad_forwards_in_training_mode')} no-grad forwards "
                 f"with {', '.join(f.layers)} in training mode; the first one's output differs "
                 f"from eval mode by {100 * (ev.get('output_rel_diff') or 0):.3g}% relative L2; "
                 f"BatchNorm running statistics changed by "
                 f"{100 * (ev.get('bn_first_pass_change') or 0):.3g}% over the first pass; "
                 f"causes: {', '.join(c.id for c in f.causes)})")
    return text + "; none on " + ", ".join(
        f"{arm} ({clean[arm]} of {n} clean)" for arm in clean)


def _zero_or(values: list[float], text: Callable[[list[float]], str] = spread) -> str:
    """``0`` when every value measured is 0, else the values as ``text`` writes them."""
    return "0" if all(v == 0 for v in values) else text(values)


def _judge(r: ArmResults) -> Verdict:
    bad, good, graph = "no_grad_only", "eval_and_no_grad", "eval_only"
    differs = [v > SAME for v in r.metric(bad, "output_rel_diff")]
    stable = [v <= SAME for v in r.metric(good, "output_rel_diff") +
              r.metric(graph, "output_rel_diff")]
    jitter = [v > SAME for v in r.metric(bad, "bn_batch_order_rel_diff")]
    stats_moved = [v > 0 for v in r.metric(bad, "bn_running_stats_change")]
    kept_change = r.metric(good, "bn_running_stats_change") + \
        r.metric(graph, "bn_running_stats_change")
    stats_kept = [v == 0 for v in kept_change]
    same_outputs = [v <= SAME for v in r.metric(graph, "rel_diff_from_eval")]
    memory = [g == 0 and e > 0 for g, e in zip(r.metric(good, "saved_bytes"),
                                                r.metric(graph, "saved_bytes"), strict=True)]
    ratio = [a / b if b > 0 else math.inf for a, b in zip(
        r.metric(bad, "batch2_max_abs_output"), r.metric(bad, "eval_max_abs_output"),
        strict=True)]
    blows_up = [v > 10 for v in ratio]
    core = [most_seeds(differs), all(stable), most_seeds(jitter), most_seeds(stats_moved),
            all(stats_kept), all(same_outputs), all(memory)]
    verdict = "holds" if all(core) and most_seeds(blows_up) else \
        "partly" if any(core) else "does not hold"
    acc_bad, acc_ref = r.metric(bad, "val_accuracy"), r.metric(bad, "eval_accuracy")
    range_bad = [hi - lo for hi, lo in zip(r.metric(bad, "val_accuracy_max"),
                                           r.metric(bad, "val_accuracy_min"), strict=True)]
    kib = [v / 1024 for v in r.metric(graph, "saved_bytes")]
    kib_no_grad = [v / 1024 for v in r.metric(good, "saved_bytes")]
    batch1 = sum(v == 1.0 for v in r.metric(bad, "batch1_error"))
    n = len(acc_bad)
    summary = ("every part of the claim measured holds" if all(core) and most_seeds(blows_up) else
               "Dropout's and BatchNorm's effects and no_grad's role hold as claimed; the "
               "blow-up does not happen" if all(core) else "see the numbers")
    return Verdict(
        verdict,
        f"{summary}. Dropout: without model.eval() two evaluations of the same {N_VAL} "
        f"held-out inputs differ by {percent(r.metric(bad, 'output_rel_diff'))} (relative L2)"
        f"{deviating(differs)}; "
        f"with model.eval() they are identical{deviating(stable)}. The same trained model "
        f"scores {percent(acc_bad)} accuracy without model.eval() and {percent(acc_ref)} with it, "
        f"and over {REPEATS} evaluations without it the accuracy moves by "
        f"{spread([100 * v for v in range_bad])} points. BatchNorm: with Dropout off, the "
        f"same inputs in another batch order differ by "
        f"{percent(r.metric(bad, 'bn_batch_order_rel_diff'))}{deviating(jitter)}; in batches of "
        f"2 they differ from eval mode by {percent(r.metric(bad, 'batch2_bn_rel_diff_from_eval'))} "
        f"(accuracy with Dropout on: {percent(r.metric(bad, 'batch2_accuracy'))}); a batch of 1 "
        f"raises ValueError on {batch1} of {n} seeds; one evaluation pass moves the running "
        f"statistics by {percent(r.metric(bad, 'bn_running_stats_change'))} ("
        f"{_zero_or(kept_change, percent)} with model.eval(){deviating(stats_kept)}). "
        f"Blow-up: the largest |output| in batches of 2 "
        f"is {spread(ratio)} times eval mode's: "
        f"{'a blow-up' + deviating(blows_up) if most_seeds(blows_up) else 'none'}. no_grad: "
        f"model.eval() alone gives the same outputs as with torch.no_grad()"
        f"{deviating(same_outputs)}, but autograd keeps {spread(kib)} KiB per evaluation pass "
        f"for a backward that never comes ({_zero_or(kib_no_grad, lambda v: spread(v) + ' KiB')}"
        f" under no_grad{deviating(memory)}).",
        f"in training mode each Dropout(p={DROPOUT}) zeroes a fresh random {DROPOUT:.0%} of its "
        f"inputs on every call and scales the rest by 1/(1-p), and each BatchNorm normalises "
        f"with the mean and variance of the batch it is given, then mixes them into its "
        f"running statistics (momentum 0.1): a sample's output depends on the random draw "
        f"and on its batch mates, and evaluating rewrites the statistics inference will use. "
        f"Training-mode BatchNorm cannot blow up by itself: a value normalised with its own "
        f"batch's statistics is at most sqrt(batch - 1) in magnitude (1 in a batch of 2), and "
        f"a batch of 1 is refused, not blown up. {_gradwatch_text(r)}.",
        f"model.eval() before evaluating and model.train() after, with torch.no_grad() "
        f"around it: identical outputs on every evaluation, accuracy "
        f"{percent(r.metric(good, 'val_accuracy'))}, running statistics untouched, no graph kept "
        f"({_zero_or(r.metric(good, 'saved_bytes'))} bytes saved for backward).")


_SETUP = (f"(Linear -> BatchNorm1d -> ReLU -> Dropout({DROPOUT})) x 2 -> Linear({HIDDEN}, "
          f"{CLASSES}), width {HIDDEN}, PyTorch's default init; {CLASSES}-class cross-entropy "
          f"on {N_FEATURES} N(0, 1) features (class = 2 [x0 + 0.5 x1 > 0] + [x2 x3 > 0]; "
          f"{N_TRAIN} training and {N_VAL} held-out points, generator seed {DATA_SEED}); Adam "
          f"lr {LR:g}, batches of {BATCH}, {EPOCHS} epochs ({EPOCHS * N_TRAIN // BATCH} steps), "
          f"a validation pass in batches of {VAL_BATCH} after every epoch")


def _runner(mode: str) -> Callable[..., RunResult]:
    def run(seed: int = 0, epochs: int = EPOCHS) -> RunResult:
        return train_arm(mode, seed, epochs)
    run.__doc__ = f"{EXP}, arm {mode}: train_arm({mode!r}, seed, epochs)"
    return run


_ARMS = (
    Arm("no_grad_only", CLAIMS["no_grad_only"],
        _SETUP + "; validation: with torch.no_grad(): model(x), without model.eval().",
        _runner("no_grad_only")),
    Arm("eval_and_no_grad", CLAIMS["eval_and_no_grad"],
        _SETUP + "; validation: model.eval(), with torch.no_grad(): model(x), then "
        "model.train().", _runner("eval_and_no_grad"), role="repair"),
    Arm("eval_only", CLAIMS["eval_only"],
        _SETUP + "; validation: model.eval(), model(x) with gradients on, then model.train().",
        _runner("eval_only")),
)
EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(EXP, "seed 001", "Evaluation: model.eval() vs torch.no_grad()",
               "model.eval() switches Dropout (keep every unit) and BatchNorm (use the running "
               "statistics) to inference. Forgetting it, Dropout keeps dropping units and the "
               "output differs every time, and BatchNorm uses the current batch's statistics, "
               "so results jitter and in bad cases blow up. torch.no_grad() only turns "
               "gradients off (memory, speed); the two are used together",
               "The seed gives only the idiom: the lab builds the obvious minimal experiment. "
               + _SETUP + ". The three arms differ only in the validation pass. After "
               "training, the trained model is measured unwatched in its arm's evaluation "
               f"mode: {REPEATS} evaluations of the held-out set, the BatchNorm running "
               "statistics before and after one pass, another batch order with Dropout off, "
               "batches of 2 and 1, and the bytes autograd saves during a pass.",
               _ARMS, _judge, cost_s=1.0),
)
"""Seed 001's eval-mode experiment."""
