"""Where gradwatch's time goes: cProfile of a watched training loop, gradwatch's functions only.

    python benchmarks/profile_watch.py --model transformer --steps 256

Prints the loop's total time, then gradwatch's functions by their own time (tottime) and by
cumulative time, as a share of the loop; the step's own work (forward, backward, optimizer)
is everything else.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from models import CASES
from overhead import WARMUP_STEPS, make_batches, make_optimizer, one_step, watched_backward

import gradwatch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", choices=sorted(CASES), default="transformer")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    case = CASES[args.model]
    model = case.build()
    opt = make_optimizer("sgd", model)
    batches = make_batches(case, torch.device("cpu"))
    with gradwatch.watch(model, opt):
        for k in range(2 * WARMUP_STEPS):
            one_step(model, opt, batches[k % len(batches)], watched_backward)
        prof = cProfile.Profile()
        started = time.perf_counter()
        prof.enable()
        for k in range(args.steps):
            one_step(model, opt, batches[k % len(batches)], watched_backward)
        prof.disable()
        total = time.perf_counter() - started
    print(f"{args.model}: {args.steps} watched steps, {1e3 * total / args.steps:.2f} ms/step "
          f"under cProfile (which inflates Python-heavy code)")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).sort_stats(key)
        stats.print_stats("gradwatch", args.top)
        print(out.getvalue().split("\n", 6)[-1] if key == "tottime" else out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
