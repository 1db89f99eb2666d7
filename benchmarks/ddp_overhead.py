"""What gradwatch costs a DDP run on gloo (CPU): the same run with and without it, 2 ranks.

Two processes (``torch.multiprocessing``, gloo on 127.0.0.1) each train two identical
``DistributedDataParallel`` copies of an MLP on the same fixed batches: one bare, one inside
``gradwatch.watch`` (one watch for the whole measurement). They take turns of one cadence
(``sync_every`` = 64 steps, so each watched turn holds exactly one flush and its
``all_gather``), in alternating order, so a busy machine slows both alike. ``ratio`` is the
median over turns of watched / bare time per turn; ``exchange`` is the mean time of the
flush collective itself (``facts["distributed"]["exchange_s"]``). The bare copy calls
``torch.autograd.backward`` as it was before the watch wrapped it.

    python benchmarks/ddp_overhead.py               # 4 turns of 64 steps each
    python benchmarks/ddp_overhead.py --turns 8 --batch 256
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gradwatch

CADENCE = 64


def mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(256, 512), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = mlp()
    bare_net, watched_net = net, copy.deepcopy(net)
    bare = nn.parallel.DistributedDataParallel(bare_net)
    watched = nn.parallel.DistributedDataParallel(watched_net)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            for m in (bare, watched)}
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(args.batch, 256, generator=gen),
                torch.randint(0, 10, (args.batch,), generator=gen)) for _ in range(8)]
    original_backward = torch.autograd.backward

    def turn(model: nn.Module, backward: Any) -> float:
        opt = opts[id(model)]
        started = time.perf_counter()
        for i in range(CADENCE):
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(model(x), y)
            backward(loss)
            opt.step()
            opt.zero_grad()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"bare": [], "watched": []}
    with gradwatch.watch(watched, opts[id(watched)]) as gw:
        turn(bare, original_backward)  # warm-up: one cadence each (the first 8 steps of
        turn(watched, torch.autograd.backward)  # the watch measure everything)
        for k in range(args.turns):
            order = [("bare", bare, original_backward),
                     ("watched", watched, torch.autograd.backward)]
            for name, model, backward in order if k % 2 == 0 else order[::-1]:
                times[name].append(turn(model, backward))
    d = gw.report().to_dict()["facts"].get("distributed", {})
    if rank == 0:
        ratios = [w / b for w, b in zip(times["watched"], times["bare"], strict=True)]
        out.put({"bare_ms": 1e3 * statistics.median(times["bare"]) / CADENCE,
                 "watched_ms": 1e3 * statistics.median(times["watched"]) / CADENCE,
                 "ratio": statistics.median(ratios), "ratios": ratios,
                 "exchanges": d.get("exchanges"), "exchange_ms":
                     1e3 * d.get("exchange_s", 0.0) / max(1, d.get("exchanges") or 1)})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=4, help="timed turns per copy")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.spawn(worker, args=(2, port, args, out), nprocs=2, join=True)
    r = out.get()
    print(f"DDP on gloo, 2 ranks x 1 thread, MLP 256-512x4-10 (0.92 M parameters), batch "
          f"{args.batch}, {args.turns} turns of {CADENCE} steps")
    print(f"bare {r['bare_ms']:.2f} ms/step, watched {r['watched_ms']:.2f} ms/step, ratio "
          f"{r['ratio']:.3f} (turns: {', '.join(f'{x:.3f}' for x in r['ratios'])})")
    print(f"flush collective: {r['exchanges']} all_gather, {r['exchange_ms']:.2f} ms each")


if __name__ == "__main__":
    main()
