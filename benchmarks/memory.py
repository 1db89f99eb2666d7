"""gradwatch's memory as a run grows: host (history, excerpts) and device buffers.

A tiny MLP (32-32-32-10, batch 32) trains inside one ``gradwatch.watch`` for ``--steps``
steps; after 1k, 10k and 100k steps (the checkpoints up to ``--steps``) it prints
``history.nbytes()`` (the downsampled per-step and detail series), the excerpts' kept and
recent rows, the device buffers (``sync_every`` rows of statistics) and the process's resident
memory (and after 50k). The history is bounded: each series grows to its capacity, then
halves its resolution when full. The per-step series (``capacity`` = 2048 rows) is full after
2048 steps, the detail-step series (a quarter of it, one row every ``detail_every`` = 16
steps) after 8192: the host state is flat from there on (10k -> 100k).

    python benchmarks/memory.py                 # 1k, 10k, 100k steps (~2 min on 2 cores)
    python benchmarks/memory.py --steps 10000   # 1k and 10k only
    python benchmarks/memory.py --gpu           # the same on CUDA (device memory measured)
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.watch import Watch

CHECKPOINTS = (1_000, 10_000, 50_000, 100_000)


def rss_mb() -> float:
    """The process's resident memory now (Linux /proc), in MB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def state(gw: Watch) -> dict[str, float]:
    """gradwatch's state in bytes: host (history, excerpts) and device buffers."""
    m = gw.monitor
    device = sum(b.element_size() * b.numel() for b in m.buffers.buf.values())
    return {"history": m.history.nbytes(), "excerpts": m.history.excerpts.nbytes(),
            "device": device}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--steps", type=int, default=CHECKPOINTS[-1])
    p.add_argument("--gpu", action="store_true", help="run on CUDA")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device here", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 32, generator=g).to(device),
                torch.randint(0, 10, (32,), generator=g).to(device)) for _ in range(16)]
    checkpoints = [c for c in CHECKPOINTS if c <= args.steps] or [args.steps]
    print(f"gradwatch {gradwatch.__version__}, torch {torch.__version__}, {device}: "
          f"tiny MLP, {sum(q.numel() for q in model.parameters()):,} parameters")
    print(f"{'steps':>8} {'history':>10} {'excerpts':>10} {'host total':>11} "
          f"{'device buf':>11} {'process RSS':>12} {'s':>6}")
    totals = {}
    started = time.perf_counter()
    with gradwatch.watch(model, opt) as gw:
        for k in range(1, checkpoints[-1] + 1):
            x, y = batches[k % len(batches)]
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k in checkpoints:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                s = state(gw)
                totals[k] = s["history"] + s["excerpts"]
                print(f"{k:>8,} {s['history'] / 2**10:>7.1f} KB {s['excerpts'] / 2**10:>7.1f} KB "
                      f"{totals[k] / 2**10:>8.1f} KB {s['device'] / 2**10:>8.1f} KB "
                      f"{rss_mb():>9.1f} MB {time.perf_counter() - started:>6.0f}", flush=True)
    if gw.monitor.errors:
        raise RuntimeError(f"gradwatch reported internal errors: {gw.monitor.errors}")
    for a in (10_000, 50_000):
        if a in totals and 100_000 in totals:
            growth = totals[100_000] / totals[a] - 1
            print(f"host state {a // 1000}k -> 100k steps: {100 * growth:+.1f}% "
                  f"(target: within 5%): {'met' if abs(growth) <= 0.05 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
