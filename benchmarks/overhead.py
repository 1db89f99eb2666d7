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
import contextlib
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
from models import CASES, GPU_CASES, Case
from peers import PEERS, Batch, describe, loss_of, scratch, unavailable
from torch import nn

import gradwatch
from gradwatch.measure.monitor import Options

WARMUP_STEPS = 8  # a fresh watch measures everything on steps 0-7; keep them out of timing
BARE_BACKWARD = torch.autograd.backward  # captured before any watch wraps it



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
    detail_every: int = 0  # gradwatch's detail interval while timed (0: a peer)

    @staticmethod
    def per_step(seconds: np.ndarray) -> float:
        """Robust mean step time: median over repeats at each cadence position, then mean."""
        return float(np.median(seconds, axis=0).mean())

    def ratio(self, clock: str = "wall") -> float:
        """Watched / bare per-step time on ``clock`` ("wall" or "cpu")."""
        watched, bare = getattr(self, f"watched_{clock}"), getattr(self, f"bare_{clock}")
        return self.per_step(watched) / self.per_step(bare)

    def label(self) -> str:
        """The option set or peer, and the detail interval the budget kept while timed."""
        if not self.detail_every or self.detail_every == NEVER:
            return self.variant
        return f"{self.variant} d/{self.detail_every}"

    def plain(self) -> list[float]:
        """Watched/bare ratio of the total wall time of each repeat (one cadence or more)."""
        return (self.watched_wall.sum(axis=1) / self.bare_wall.sum(axis=1)).tolist()


NEVER = 1 << 30  # a detail interval no benchmark reaches: detail steps only at 0-7

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "every=4": {"every": 4},
    "detail_every=64": {"detail_every": 64},
    "detail_every=4": {"detail_every": 4},
    "sync_every=16": {"sync_every": 16},
    # The same watch without its forward-side extensions (activation sites, recurrent
    # gradients through time, eval-mode checks): the difference to "default" is their cost.
    "no_forward_side": {"forward_side": False},
    # Everything measured on every step: the detail steps' own cost, undiluted.
    "detail_every=1": {"detail_every": 1, "overhead": None},
    # Gradient norms and the loss every step, nothing else (detail steps and the
    # forward side off): the per-step floor of the hooks.
    "norms_only": {"detail_every": NEVER, "overhead": None, "forward_side": False},
}


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (the default) or Adam, with ordinary settings."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)


def make_batches(case: Case, device: torch.device, n: int = 4) -> list[Batch]:
    """A few fixed batches, cycled: no data loading in the timed loop."""
    g = torch.Generator().manual_seed(0)

    def one() -> Batch:
        if case.tokens:  # next-token prediction: targets are the inputs shifted by one
            ids = torch.randint(0, case.classes, (case.batch, case.input_shape[0] + 1),
                                generator=g)
            return ids[:, :-1], ids[:, 1:]
        return (torch.randn((case.batch, *case.input_shape), generator=g),
                torch.randint(0, case.classes, (case.batch,), generator=g))
    return [(x.to(device), y.to(device)) for x, y in (one() for _ in range(n))]


def one_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch,
             backward: Callable[[torch.Tensor], None]) -> None:
    """The loop under test: forward and loss (bf16 autocast on CUDA), backward, step,
    zero_grad."""
    backward(loss_of(model, batch))
    opt.step()
    opt.zero_grad(set_to_none=True)


def watched_backward(loss: torch.Tensor) -> None:
    """``loss.backward()``, which gradwatch intercepts while the watch is open."""
    loss.backward()


def cadence(options: dict[str, Any]) -> int:
    """Steps after which a watched loop's cost pattern repeats."""
    o = Options(**options)
    return math.lcm(o.sync_every, 1 if o.detail_every == NEVER else o.detail_every, o.every)


def interleave(steps: dict[str, Callable[[int], None]], phase: dict[str, Callable[[int], int]],
               shape: tuple[int, int], block: int, cuda: bool
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Wall and CPU seconds of every step of the two loops ("bare" and "watched"), by
    (cadence, position): turns of ``block`` steps, in alternating order, so that whatever
    else the machine does slows both alike. On CUDA a turn is timed as a whole between two
    synchronisations (``block`` is then one cadence) and each of its steps gets the mean."""
    wall = {kind: np.empty(shape) for kind in steps}
    cpu = {kind: np.empty(shape) for kind in steps}
    total, period = shape[0] * shape[1], shape[1]
    done = dict.fromkeys(steps, 0)
    for turn in range(-(-total // block)):
        for kind in ("bare", "watched") if turn % 2 == 0 else ("watched", "bare"):
            n = min(block, total - done[kind])
            spans = [n] if cuda else [1] * n
            for span in spans:
                ks = range(done[kind], done[kind] + span)
                first = phase[kind](ks.start)  # before the span runs: consecutive steps
                phases = [(first + i) % period for i in range(span)]
                if cuda:
                    torch.cuda.synchronize()
                w, c = time.perf_counter(), time.process_time()
                for k in ks:
                    steps[kind](k)
                if cuda:
                    torch.cuda.synchronize()
                w, c = (time.perf_counter() - w) / span, (time.process_time() - c) / span
                for k, p in zip(ks, phases, strict=True):
                    wall[kind][k // period, p], cpu[kind][k // period, p] = w, c
                done[kind] += span
    return wall, cpu


def run_case(case: Case, variant: str, options: dict[str, Any], steps: int, repeats: int,
             optimizer: str, block: int = 1, device: str = "cpu", settle: int = 0) -> Row:
    """Train a bare copy of ``case``'s model and a watched one (``gradwatch.watch`` with
    ``options``, or the peer named ``variant``), taking turns of ``block`` steps; ``settle``
    untimed steps first, so that a long run's cadence (the overhead budget) is timed."""
    torch.manual_seed(0)
    dev = torch.device(device)
    bare = case.build().to(dev)
    watched = copy.deepcopy(bare)
    bare_opt, watched_opt = make_optimizer(optimizer, bare), make_optimizer(optimizer, watched)
    batches = make_batches(case, dev)
    peer = PEERS.get(variant)
    options = dict(options)
    forward_side = options.pop("forward_side", True)
    # A peer that costs the same every step is still timed in cadences of 64 steps, so that
    # the median is over repeats at each position and a rare slow step (a flush) counts.
    period = (peer.period if peer.period > 1 else 64) if peer else cadence(options)
    cuda = dev.type == "cuda"

    def bare_step(k: int) -> None:
        one_step(bare, bare_opt, batches[k % len(batches)], BARE_BACKWARD)

    def plain_step(k: int) -> None:
        one_step(watched, watched_opt, batches[k % len(batches)], watched_backward)

    for k in range(2 * WARMUP_STEPS):  # allocator, optimizer state, first-call paths
        bare_step(k)
        plain_step(k)
    history_bytes = device_bytes = -1
    detail_every = 0
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        if peer is not None:
            peer_step, close = peer.start(watched, watched_opt, stack.enter_context(scratch()))
            stack.callback(close)

            def watched_step(k: int) -> None:
                peer_step(batches[k % len(batches)], k)

            def position(k: int) -> int:
                return k
        else:
            gw = stack.enter_context(gradwatch.watch(watched, watched_opt, **options))
            if not forward_side:
                gw.monitor.extensions.clear()
            watched_step = plain_step

            def position(k: int) -> int:
                return gw.monitor.step
        attach = time.perf_counter() - started
        for k in range(WARMUP_STEPS + settle):
            bare_step(k)
            watched_step(k)
        if peer is None and gw.monitor.cadence.interval != NEVER:
            # the cadence reached after settling (the budget may stretch it)
            period = math.lcm(period, gw.monitor.cadence.interval)
        cycles = -(-steps // period)  # whole cadences per repeat: every position sampled alike
        shape = (repeats * cycles, period)  # row: one cadence; column: position in cadence
        block = period if cuda else block
        wall, cpu = interleave({"bare": bare_step, "watched": watched_step},
                               {"bare": lambda k: k, "watched": position}, shape, block, cuda)
        if peer is None:
            # Device buffers (sync_every rows of statistics) live on the monitor until close.
            buffers = gw.monitor.buffers.buf
            device_bytes = sum(b.element_size() * b.numel() for b in buffers.values())
            history_bytes = gw.monitor.history.nbytes()
            detail_every = gw.monitor.cadence.interval
        closing = time.perf_counter()
    attach += time.perf_counter() - closing
    if peer is None and gw.monitor.errors:
        raise RuntimeError(f"gradwatch reported internal errors: {gw.monitor.errors}")
    return Row(case.name, sum(p.numel() for p in bare.parameters()), variant, period,
               wall["bare"], wall["watched"], cpu["bare"], cpu["watched"], attach,
               history_bytes, device_bytes, detail_every)


def format_table(rows: list[Row]) -> str:
    """One line per model and watch options or peer."""
    head = (f"{'model':<11} {'params':>11} {'watch / peer':<19} {'bare ms':>8} "
            f"{'watched ms':>10} {'ratio':>6} {'cpu ratio':>9} {'plain (range)':>20} "
            f"{'attach+close':>12} {'history':>9} {'dev buf':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        plain = r.plain()
        plain_text = f"{statistics.median(plain):.3f} ({min(plain):.2f}-{max(plain):.2f})"
        memory = (f"{'-':>9} {'-':>7}" if r.history_bytes < 0 else
                  f"{r.history_bytes / 2**20:>6.2f} MB {r.device_bytes / 2**10:>4.0f} KB")
        lines.append(
            f"{r.case:<11} {r.params:>11,} {r.label():<19} "
            f"{1e3 * r.per_step(r.bare_wall):>8.2f} {1e3 * r.per_step(r.watched_wall):>10.2f} "
            f"{r.ratio('wall'):>5.3f}x {r.ratio('cpu'):>8.3f}x {plain_text:>20} "
            f"{1e3 * r.attach_close_s:>9.1f} ms {memory}")
    return "\n".join(lines)


LEGEND = """\
ratio         watched / bare per-step wall time (robust mean: median over repeats at each
              step of the cadence, then the mean over the cadence); target <= 1.03x.
              A peer's row: the same copy under that tool instead of gradwatch
cpu ratio     the same on process CPU time
plain         watched / bare total time, median and range over cadences: a wide range means
              a busy machine (more --repeats help)
attach+close  one-off cost of entering and leaving the watch (not in the per-step times)
history       gw.monitor.history.nbytes(): host memory, bounded whatever the run length
dev buf       device buffers holding sync_every steps of statistics
d/N           gradwatch's detail steps were every N-th while timed (the overhead budget
              stretches 16 on long runs: --settle)"""


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
    p.add_argument("--models", nargs="*", default=None,
                   help=f"models to run: {', '.join(CASES)} (default: all; --quick: the two "
                        f"MLPs); with --gpu: {', '.join(GPU_CASES)}")
    p.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=None,
                   help="extra option sets (default: all; --quick: none; --gpu: "
                        "detail_every=1 and norms_only)")
    p.add_argument("--variant-models", nargs="+", default=None,
                   help="models the option sets run on (default: mlp-1m; --gpu: gpt-124m)")
    p.add_argument("--peers", nargs="*", choices=sorted(PEERS), default=None,
                   help="other tools, each on its own copy, as ratios to the same bare loop "
                        "(default: all; --quick: none; --gpu: all but wandb-all-1)")
    p.add_argument("--peer-models", nargs="+", default=None,
                   help="models the peers run on (default: mlp-1m; --gpu: gpt-124m)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="SGD with momentum 0.9 (default) or Adam")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--gpu", action="store_true",
                   help="on CUDA: the GPT-style models (8192 tokens a step, bf16 autocast), "
                        "each turn one cadence timed between two synchronisations")
    p.add_argument("--settle", type=int, default=None,
                   help="untimed steps inside the watch before timing (default 0; --gpu: "
                        "2048): a long run's steady state, where the overhead budget has "
                        "stretched the detail cadence (it may from step 1024 on)")
    p.add_argument("--list", action="store_true",
                   help="print the models, option sets and peers (and why a peer cannot "
                        "run here), then exit")
    args = p.parse_args(argv)
    cases = GPU_CASES if args.gpu else CASES
    for name in (args.models or []) + (args.peer_models or []) + (args.variant_models or []):
        if name not in cases:
            p.error(f"unknown model {name!r} (choose from {', '.join(cases)})")
    if args.quick:
        args.repeats = 2
        args.models = ["mlp-1m", "mlp-10m"] if args.models is None else args.models
        args.variants = [] if args.variants is None else args.variants
        args.peers = [] if args.peers is None else args.peers
    if args.gpu:
        args.variants = (["detail_every=1", "norms_only"] if args.variants is None
                         else args.variants)
        args.peers = ([p for p in PEERS if p != "wandb-all-1"] if args.peers is None
                      else args.peers)
    args.settle = (2048 if args.gpu else 0) if args.settle is None else args.settle
    args.models = list(cases) if args.models is None else args.models
    args.variants = list(VARIANTS)[1:] if args.variants is None else args.variants
    args.peers = list(PEERS) if args.peers is None else args.peers
    args.peer_models = args.peer_models or ["gpt-124m" if args.gpu else "mlp-1m"]
    args.variant_models = args.variant_models or ["gpt-124m" if args.gpu else "mlp-1m"]
    if min(args.steps, args.repeats, args.block) < 1 or args.settle < 0:
        p.error("--steps, --repeats and --block must be >= 1, --settle >= 0")
    return args


def print_list() -> None:
    """The models, option sets and peers (``--list``)."""
    for title, cases in (("models", CASES), ("--gpu models", GPU_CASES)):
        print(f"{title}: " + ", ".join(f"{c.name} (batch {c.batch}, input {c.input_shape})"
                                       for c in cases.values()))
    print("option sets: " + ", ".join(VARIANTS))
    print("peers:")
    for peer in describe():
        status = peer["unavailable"] or "available"
        print(f"  {peer['name']:<20} every {peer['period']:>3} steps: {status}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table; exit 0."""
    args = parse_args(argv)
    if args.list:
        print_list()
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device here", file=sys.stderr)
        return 2
    cases = GPU_CASES if args.gpu else CASES
    where = (torch.cuda.get_device_name() + ", bf16 autocast") if args.gpu else \
        f"{torch.get_num_threads()} thread(s){'' if args.threads else ' (torch default)'}"
    print(f"gradwatch {gradwatch.__version__}, torch {torch.__version__}, {where}, "
          f"optimizer {args.optimizer}, {args.steps} timed steps x {args.repeats} repeats, "
          f"warm-up excluded", flush=True)
    rows: list[Row] = []
    skipped: list[str] = []
    jobs = [(cases[m], "default", VARIANTS["default"]) for m in args.models]
    jobs += [(cases[m], v, VARIANTS[v]) for m in args.variant_models
             for v in args.variants if v != "default"]
    for m in args.peer_models:
        for name in args.peers:
            why = unavailable(PEERS[name], cases[m].build(), device)
            if why:
                skipped.append(f"{name} on {m}: {why}")
            else:
                jobs.append((cases[m], name, {}))
    for case, variant, options in jobs:
        started = time.perf_counter()
        rows.append(run_case(case, variant, options, args.steps, args.repeats, args.optimizer,
                             args.block, device, args.settle))
        print(f"  {case.name} [{variant}] done in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
    print(flush=True)
    print(format_table(rows))
    for line in skipped:
        print(f"not run: {line}")
    print()
    print(LEGEND)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
