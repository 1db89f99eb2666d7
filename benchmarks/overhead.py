"""Per-step overhead of ``gradwatch.watch`` against a bare training loop, measured in one run.

Two identical copies of a model train in one process with a realistic minibatch loop
(forward, loss, backward, ``optimizer.step()``, ``zero_grad()``): one bare, one inside
``gradwatch.watch`` (one watch for the whole measurement, as in a real run). They take
turns step by step (``--block`` steps per turn), in alternating order (bare-watched,
watched-bare, ...), so a busy machine slows both alike. Warm-up steps, and the first 8
steps of the watch (which measure everything), are not timed; attaching and closing the
watch are reported separately.

The watched loop's cost repeats with its cadence (a detailed step every ``detail_every``
steps, a host copy every ``sync_every``). The per-step time is the mean over one cadence
of the median, over repeats, of the step at each position of the cadence: other
processes only ever add time, and the medians drop it. ``ratio`` = watched / bare of those
per-step times; process CPU time and the plain ratio of total times are shown too.
CPU only: on a GPU, timing single steps needs a synchronisation that changes the loop.

The bare copy calls ``torch.autograd.backward`` as it was before any watch existed:
while a watch is open gradwatch wraps that function for every model in the process.

    python benchmarks/overhead.py            # 5 repeats of 64 steps, all models and variants
    python benchmarks/overhead.py --quick    # 2 repeats, the two MLPs, default options only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.measure.monitor import Options

Batch = tuple[torch.Tensor, torch.Tensor]
WARMUP_STEPS = 8  # a fresh watch measures everything on steps 0-7; keep them out of timing
BARE_BACKWARD = torch.autograd.backward  # captured before any watch wraps it


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to benchmark: how to build it and what its batches look like."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    classes: int = 10


@dataclasses.dataclass
class Row:
    """Per-step timings of one model and one set of watch options."""

    case: str
    params: int
    variant: str
    period: int  # steps after which the watched loop's cost pattern repeats
    bare_wall: np.ndarray  # seconds, (cadences timed, period): column = position in cadence
    watched_wall: np.ndarray
    bare_cpu: np.ndarray
    watched_cpu: np.ndarray
    attach_close_s: float
    history_bytes: int
    device_bytes: int

    @staticmethod
    def per_step(seconds: np.ndarray) -> float:
        """Robust mean step time: median over repeats at each cadence position, then mean."""
        return float(np.median(seconds, axis=0).mean())

    def ratio(self, clock: str = "wall") -> float:
        """Watched / bare per-step time on ``clock`` ("wall" or "cpu")."""
        watched, bare = getattr(self, f"watched_{clock}"), getattr(self, f"bare_{clock}")
        return self.per_step(watched) / self.per_step(bare)

    def plain(self) -> list[float]:
        """Watched/bare ratio of the total wall time of each repeat (one cadence or more)."""
        return (self.watched_wall.sum(axis=1) / self.bare_wall.sum(axis=1)).tolist()


def mlp(in_features: int, width: int, hidden_layers: int, classes: int = 10) -> nn.Sequential:
    """A plain ReLU MLP with Kaiming-uniform (PyTorch default) init."""
    layers: list[nn.Module] = [nn.Linear(in_features, width), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def small_cnn(classes: int = 10) -> nn.Sequential:
    """Three conv + BatchNorm + ReLU blocks and a linear head, for 3x32x32 inputs."""
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


class SequenceClassifier(nn.Module):
    """A 2-layer LSTM read at its last step: exercises the per-timestep gradient probe."""

    def __init__(self, features: int = 32, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class TokenEncoder(nn.Module):
    """A 2-layer Transformer encoder (functional ReLU and dropout inside), mean-pooled."""

    def __init__(self, features: int = 32, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.proj = nn.Linear(features, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=128, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x)).mean(1))


CASES = {
    "mlp-1m": Case("mlp-1m", lambda: mlp(256, 512, 4), (256,), 256),
    "mlp-10m": Case("mlp-10m", lambda: mlp(1024, 1664, 4), (1024,), 256),
    "cnn": Case("cnn", small_cnn, (3, 32, 32), 128),
    "lstm": Case("lstm", SequenceClassifier, (50, 32), 64),
    "transformer": Case("transformer", TokenEncoder, (32, 32), 64),
}

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "every=4": {"every": 4},
    "detail_every=64": {"detail_every": 64},
    "detail_every=4": {"detail_every": 4},
    "sync_every=16": {"sync_every": 16},
    # The same watch without its forward-side extensions (activation sites, recurrent
    # gradients through time, eval-mode checks): the difference to "default" is their cost.
    "no_forward_side": {"forward_side": False},
}


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (the default) or Adam, with ordinary settings."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)


def make_batches(case: Case, n: int = 4) -> list[Batch]:
    """A few fixed batches, cycled: no data loading in the timed loop."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn((case.batch, *case.input_shape), generator=g),
             torch.randint(0, case.classes, (case.batch,), generator=g)) for _ in range(n)]


def one_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch,
             backward: Callable[[torch.Tensor], None]) -> None:
    """The loop under test: forward, loss, backward, step, zero_grad."""
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    backward(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)


def watched_backward(loss: torch.Tensor) -> None:
    """``loss.backward()``, which gradwatch intercepts while the watch is open."""
    loss.backward()


def timed(step: Callable[[int], None], k: int) -> tuple[float, float]:
    """Wall and process-CPU seconds of step ``k`` (on CPU every op has finished on return)."""
    wall, cpu = time.perf_counter(), time.process_time()
    step(k)
    return time.perf_counter() - wall, time.process_time() - cpu


def cadence(options: dict[str, Any]) -> int:
    """Steps after which a watched loop's cost pattern repeats."""
    o = Options(**options)
    return math.lcm(o.sync_every, o.detail_every, o.every)


def run_case(case: Case, variant: str, options: dict[str, Any], steps: int, repeats: int,
             optimizer: str, block: int = 1) -> Row:
    """Train a bare and a watched copy of ``case``'s model, taking turns of ``block`` steps."""
    torch.manual_seed(0)
    bare = case.build()
    watched = copy.deepcopy(bare)
    bare_opt, watched_opt = make_optimizer(optimizer, bare), make_optimizer(optimizer, watched)
    batches = make_batches(case)
    options = dict(options)
    forward_side = options.pop("forward_side", True)
    period = cadence(options)
    cycles = -(-steps // period)  # whole cadences per repeat: every position sampled alike
    shape = (repeats * cycles, period)  # row: one cadence; column: position in the cadence
    wall = {"bare": np.empty(shape), "watched": np.empty(shape)}
    cpu = {"bare": np.empty(shape), "watched": np.empty(shape)}

    def bare_step(k: int) -> None:
        one_step(bare, bare_opt, batches[k % len(batches)], BARE_BACKWARD)

    def watched_step(k: int) -> None:
        one_step(watched, watched_opt, batches[k % len(batches)], watched_backward)

    for k in range(2 * WARMUP_STEPS):  # allocator, optimizer state, first-call paths
        bare_step(k)
        watched_step(k)
    started = time.perf_counter()
    with gradwatch.watch(watched, watched_opt, **options) as gw:
        if not forward_side:
            gw.monitor.extensions.clear()
        attach = time.perf_counter() - started
        for k in range(WARMUP_STEPS):
            bare_step(k)
            watched_step(k)
        total = repeats * cycles * period
        done = {"bare": 0, "watched": 0}
        for turn in range(-(-total // block)):
            # Take turns of ``block`` steps, in alternating order, so that whatever else
            # the machine is doing slows both loops alike.
            for kind in ("bare", "watched") if turn % 2 == 0 else ("watched", "bare"):
                step = bare_step if kind == "bare" else watched_step
                for _ in range(min(block, total - done[kind])):
                    k = done[kind]
                    phase = (gw.monitor.step if kind == "watched" else k) % period
                    wall[kind][k // period, phase], cpu[kind][k // period, phase] = \
                        timed(step, k)
                    done[kind] += 1
        # Device buffers (sync_every rows of statistics) live on the monitor until close.
        buffers = gw.monitor.buffers.buf
        device_bytes = sum(b.element_size() * b.numel() for b in buffers.values())
        closing = time.perf_counter()
    attach += time.perf_counter() - closing
    if gw.monitor.errors:
        raise RuntimeError(f"gradwatch reported internal errors: {gw.monitor.errors}")
    return Row(case.name, sum(p.numel() for p in bare.parameters()), variant, period,
               wall["bare"], wall["watched"], cpu["bare"], cpu["watched"], attach,
               gw.monitor.history.nbytes(), device_bytes)


def format_table(rows: list[Row]) -> str:
    """One line per model and option set."""
    head = (f"{'model':<8} {'params':>10} {'options':<16} {'bare ms':>8} {'watched ms':>10} "
            f"{'ratio':>6} {'cpu ratio':>9} {'plain (range)':>20} {'attach+close':>12} "
            f"{'history':>9} {'dev buf':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        plain = r.plain()
        plain_text = f"{statistics.median(plain):.3f} ({min(plain):.2f}-{max(plain):.2f})"
        lines.append(
            f"{r.case:<8} {r.params:>10,} {r.variant:<16} "
            f"{1e3 * r.per_step(r.bare_wall):>8.2f} {1e3 * r.per_step(r.watched_wall):>10.2f} "
            f"{r.ratio('wall'):>5.3f}x {r.ratio('cpu'):>8.3f}x {plain_text:>20} "
            f"{1e3 * r.attach_close_s:>9.1f} ms "
            f"{r.history_bytes / 2**20:>6.2f} MB {r.device_bytes / 2**10:>4.0f} KB")
    return "\n".join(lines)


LEGEND = """\
ratio         watched / bare per-step wall time (robust mean: median over repeats at each
              step of the cadence, then the mean over the cadence); target <= 1.10x
cpu ratio     the same on process CPU time
plain         watched / bare total time, median and range over cadences: a wide range means
              a busy machine (more --repeats help)
attach+close  one-off cost of entering and leaving the watch (not in the per-step times)
history       gw.monitor.history.nbytes(): host memory, bounded whatever the run length
dev buf       device buffers holding sync_every steps of statistics"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` sets smaller defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--steps", type=int, default=64,
                   help="timed steps per repeat, rounded up to whole cadences (64 steps at the "
                        "default options; default 64)")
    p.add_argument("--repeats", type=int, default=5,
                   help="repeats: samples of each cadence position (default 5)")
    p.add_argument("--block", type=int, default=1,
                   help="steps each loop runs before the other takes its turn (default 1: "
                        "strict alternation, steadiest on a busy machine; 64 keeps a small "
                        "model warm in cache as a lone run would)")
    p.add_argument("--quick", action="store_true",
                   help="2 repeats, the two MLPs, default options only")
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=None,
                   help="models to run (default: all; --quick: the two MLPs)")
    p.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=None,
                   help="extra option sets, run on mlp-1m (default: all; --quick: none)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="SGD with momentum 0.9 (default) or Adam")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 2
        args.models = args.models or ["mlp-1m", "mlp-10m"]
        args.variants = [] if args.variants is None else args.variants
    args.models = args.models or list(CASES)
    args.variants = list(VARIANTS)[1:] if args.variants is None else args.variants
    if min(args.steps, args.repeats, args.block) < 1:
        p.error("--steps, --repeats and --block must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table; exit 0."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"gradwatch {gradwatch.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)"
          f"{'' if args.threads else ' (torch default)'}, optimizer {args.optimizer}, "
          f"{args.steps} timed steps x {args.repeats} repeats, warm-up excluded", flush=True)
    rows: list[Row] = []
    jobs = [(CASES[m], "default", VARIANTS["default"]) for m in args.models]
    jobs += [(CASES["mlp-1m"], v, VARIANTS[v]) for v in args.variants if v != "default"]
    for case, variant, options in jobs:
        started = time.perf_counter()
        rows.append(run_case(case, variant, options, args.steps, args.repeats, args.optimizer,
                             args.block))
        print(f"  {case.name} [{variant}] done in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
    print(flush=True)
    print(format_table(rows))
    print()
    print(LEGEND)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
