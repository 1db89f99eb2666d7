"""What attaching costs as a model grows: must be linear in its layers.

For stacks of 250 to 2000 ``Linear(4, 4)`` layers, the time of ``gradwatch.watch(model, opt)``
(attach), of ``gradwatch run``'s adoption of a model at its first forward (a ``Monitor`` with
the process-wide probes), and of building the report after a few steps, each against one
bare training step of the same model measured in the same run. Target: attaching 2000 layers
costs well under 20 bare steps, and doubling the layers at most about doubles every column
(``growth``: time at n layers / time at n/2).

    python benchmarks/attach.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gradwatch
from gradwatch.measure.monitor import Monitor
from gradwatch.measure.probes import INTERCEPTOR, GlobalProbes, Handles
from gradwatch.watch import default_extensions

TARGET_STEPS = 20.0  # attach(2000 layers) must stay well under this many bare steps


def _stack(n: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)])
    return model, torch.optim.SGD(model.parameters(), lr=1e-3), torch.randn(8, 4)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _timed(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(n: int, repeats: int) -> dict[str, float]:
    model, opt, x = _stack(n)
    _step(model, opt, x)  # warm-up
    bare = _timed(lambda: _step(model, opt, x), repeats)

    def attach_watch() -> None:
        gradwatch.watch(model, opt).close()

    def adopt_run() -> None:
        monitor, handles = Monitor(discover=True, extensions=default_extensions()), Handles()
        GlobalProbes(monitor, handles, lambda obj: None)
        handles.add(INTERCEPTOR.register(monitor))
        try:
            with torch.no_grad():
                model(x)  # the first forward adopts the model
        finally:
            handles.remove()
            monitor.close()

    with gradwatch.watch(model, opt) as gw:
        for _ in range(3):
            _step(model, opt, x)
    return {"bare_step": bare, "watch": _timed(attach_watch, repeats),
            "run": _timed(adopt_run, repeats), "report": _timed(gw.report, repeats)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'layers':>6} {'bare step':>10} {'watch':>9} {'run':>9} {'report':>9} "
          f"{'watch/step':>10} {'growth':>22}")
    previous: dict[str, float] | None = None
    ok = True
    for n in ns.layers:
        m = measure(n, ns.repeats)
        growth = "" if previous is None else " ".join(
            f"{k[:1]}{m[k] / previous[k]:.1f}x" for k in ("watch", "run", "report"))
        ratio = m["watch"] / m["bare_step"]
        print(f"{n:>6} {m['bare_step'] * 1e3:>8.1f}ms {m['watch'] * 1e3:>7.1f}ms "
              f"{m['run'] * 1e3:>7.1f}ms {m['report'] * 1e3:>7.1f}ms {ratio:>9.1f}x "
              f"{growth:>22}")
        if n == max(ns.layers):
            ok = ratio < TARGET_STEPS and m["run"] / m["bare_step"] < TARGET_STEPS
        previous = m
    print(f"target: attaching {max(ns.layers)} layers < {TARGET_STEPS:.0f} bare steps: "
          f"{'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
