"""Which steps are measured in detail, kept within an overhead budget.

Gradient norms and the loss are measured every step (``every``); weights, updates and
activations only on *detail* steps: steps 0-7 and every ``interval``-th step after. The
cadence times gradwatch's own work -- the host time inside its hooks (one
``perf_counter`` pair per outermost hook call) plus PyTorch's cost of calling a hook,
and, on CUDA, the device time of its kernels with events on one sampled detail and one
sampled plain step per window, read back only once they have completed (no sync) -- and,
at every host copy (``sync_every`` steps), stretches the interval so that gradwatch's share
of the step stays within ``Options.overhead``.

The interval is always ``detail_every`` x a power of two, so the detail steps of a
stretched cadence are a subset of the unstretched ones, and a host copy never needs to
know when the interval changed. It never grows past ``1 / DENSITY`` of the steps run
so far: the detectors judge persistence as a share of the run, which needs detail
rows spread over all of it, so short runs keep the full cadence.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

__all__ = ["Cadence", "hook_call_cost"]

WARMUP = 8
"""Steps 0-7: always detail, and left out of the timing (first calls allocate, compile
and read the graph)."""
MAX_STRETCH = 6
"""The interval grows to at most ``detail_every`` x 2**6 (1024 steps at the default 16)."""
DENSITY = 32
"""At most every ``step / 32``-th step is skipped: at step 4096 the interval is <= 128."""
SMOOTHING = 0.5
"""Weight of the newest window in the running cost estimates."""

_HOOK_CALL_S: float | None = None


def hook_call_cost() -> float:
    """Seconds PyTorch spends calling one Python forward hook (measured once per
    process on an ``nn.Identity``, with and without a no-op hook, ~2 ms): the part of a hook's
    cost gradwatch cannot time from inside it. Call it before gradwatch registers any
    hook (a ``gradwatch run`` would watch the module's call)."""
    global _HOOK_CALL_S
    if _HOOK_CALL_S is None:
        layer, x = nn.Identity(), torch.zeros(1, 1)  # no parameters: no RNG drawn

        def per_call(n: int = 200) -> float:
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(n):
                    layer(x)
                best = min(best, (time.perf_counter() - start) / n)
            return best

        with torch.no_grad():
            bare = per_call()
            handle = layer.register_forward_hook(lambda *_: None)
            try:
                hooked = per_call()
            finally:
                handle.remove()
        _HOOK_CALL_S = max(0.0, hooked - bare)
    return _HOOK_CALL_S


class Cadence:
    """The detail cadence and gradwatch's measured share of the step."""

    def __init__(self, detail_every: int, budget: float | None, sync_every: int) -> None:
        self.base = detail_every
        self.interval = detail_every
        self.budget = budget
        self.sync_every = sync_every
        self.changes: list[tuple[int, int]] = [(0, detail_every)]  # (from step, interval)
        self.hook_call_s = hook_call_cost()  # now: before gradwatch's own hooks exist
        self.proposed = detail_every  # the next window's interval (ranks agree on it)
        # the clock: the outermost hook call being timed
        self.depth = 0
        self.t0 = 0.0
        self.spent = 0.0  # gradwatch host seconds, whole run
        self.calls = 0  # outermost hook calls, whole run
        self._mark = (0.0, 0)  # (spent, calls) at the last step boundary
        self._last_end: float | None = None
        # the current window: [host seconds, steps] of detail and plain steps, wall seconds
        self._window = {True: [0.0, 0], False: [0.0, 0]}
        self._wall = 0.0
        self._flush_s = 0.0
        # running estimates (seconds per step), None until measured
        self.cost: dict[bool, float | None] = {True: None, False: None}
        self.user_s: float | None = None
        self.flush_s = 0.0
        # whole run, steps >= WARMUP
        self.total_gw = 0.0
        self.total_wall = 0.0
        self.total_steps = 0
        self.detail_steps = 0
        # device time (CUDA): event pairs per sampled step, read once complete
        self.device: torch.device | None = None
        #: (detail?, step) of the step whose hooks record CUDA events, else None
        self.sampling: tuple[bool, int] | None = None
        self._events: list[tuple[tuple[bool, int], Any, Any]] = []
        self._sampled = {True: False, False: False}
        self.device_cost: dict[bool, float | None] = {True: None, False: None}

    def is_detail(self, step: int) -> bool:
        return step < WARMUP or step % self.interval == 0

    # ------------------------------------------------------------------ the clock
    def enter(self) -> None:
        """An outermost hook call begins (``guarded`` calls it; nested calls do not)."""
        self.t0 = time.perf_counter()
        if self.sampling is not None:
            self._record(begin=True)

    def leave(self) -> None:
        self.spent += time.perf_counter() - self.t0
        self.calls += 1
        if self.sampling is not None:
            self._record(begin=False)

    def _record(self, begin: bool) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if begin:
            self._events.append((self.sampling, event, None))
        elif self._events and self._events[-1][2] is None:
            key, start, _ = self._events[-1]
            self._events[-1] = (key, start, event)

    def end_step(self, step: int, detail: bool) -> None:
        """Step ``step`` was committed (called inside a timed hook: its time so far counts)."""
        now = time.perf_counter()
        spent = self.spent + (now - self.t0 if self.depth else 0.0)
        host = spent - self._mark[0] + (self.calls - self._mark[1]) * self.hook_call_s
        self._mark = (spent, self.calls)
        wall = now - self._last_end if self._last_end is not None else 0.0
        self._last_end = now
        self.sampling = None
        if step < WARMUP:
            return
        window = self._window[detail]
        window[0] += host
        window[1] += 1
        self._wall += wall
        self.total_gw += host
        self.total_wall += wall
        self.total_steps += 1
        self.detail_steps += detail
        # The next step: sample its device time if none of its kind was sampled yet.
        if self.device is not None and self.device.type == "cuda":
            nxt = self.is_detail(step + 1)
            if not self._sampled[nxt]:
                self._sampled[nxt] = True
                self.sampling = (nxt, step + 1)

    def flushed(self, seconds: float) -> None:
        """A host copy took ``seconds`` (timed inside a hook: moved out of the step's cost)."""
        self._flush_s += seconds
        self._mark = (self._mark[0] + seconds, self._mark[1])
        self.total_gw += seconds

    # ------------------------------------------------------------------ the budget
    def propose(self, step: int) -> None:
        """At a host copy: fold the window into the estimates; choose the next interval."""
        for detail, (host, n) in self._window.items():
            if n:
                old = self.cost[detail]
                self.cost[detail] = host / n if old is None else \
                    SMOOTHING * host / n + (1 - SMOOTHING) * old
        n = self._window[True][1] + self._window[False][1]
        if n:
            user = max(0.0, self._wall - self._window[True][0] - self._window[False][0]
                       - self._flush_s) / n
            self.user_s = user if self.user_s is None else \
                SMOOTHING * user + (1 - SMOOTHING) * self.user_s
            self.flush_s = self._flush_s / self.sync_every
        self._window = {True: [0.0, 0], False: [0.0, 0]}
        self._wall = self._flush_s = 0.0
        self._read_events()
        self.proposed = self._choose(step)

    def _per_step(self, detail: bool) -> float | None:
        host, device = self.cost[detail], self.device_cost[detail]
        if host is None:
            return device
        return host if device is None else max(host, device)

    def share(self, interval: int) -> float | None:
        """gradwatch's estimated share of a step at ``interval`` (None: not measured yet)."""
        plain, detail = self._per_step(False), self._per_step(True)
        if plain is None or detail is None or not self.user_s:
            return None
        extra = max(0.0, detail - plain)
        return (plain + extra / interval + self.flush_s) / self.user_s

    def _choose(self, step: int) -> int:
        if self.budget is None:
            return self.base
        ceiling = self.base
        while ceiling * 2 <= self.base << MAX_STRETCH and \
                ceiling * 2 * DENSITY <= step:
            ceiling *= 2
        interval = self.base
        while interval < ceiling:
            share = self.share(interval)
            if share is None or share <= self.budget:
                break
            interval *= 2
        # Shrink back only with room to spare, so that noise does not flip it each window.
        if interval < self.interval:
            share = self.share(interval)
            if share is not None and share > 0.8 * self.budget:
                interval = min(self.interval, ceiling)
        return interval

    def apply(self, step: int) -> None:
        """From ``step`` on (a host-copy boundary), measure in detail at the proposed
        interval (under torch.distributed: the largest any rank proposed)."""
        if self.proposed != self.interval:
            self.interval = self.proposed
            self.changes.append((step, self.interval))

    def _read_events(self) -> None:
        """Device seconds of each sampled step whose events have all completed (``query``
        never waits); a step still running is read at a later copy."""
        steps: dict[tuple[bool, int], list[tuple[Any, Any]]] = {}
        for key, start, end in self._events:
            steps.setdefault(key, []).append((start, end))
        self._events = []
        for key, pairs in steps.items():
            if any(end is None or not end.query() for _, end in pairs):
                self._events += [(key, start, end) for start, end in pairs]
                continue
            seconds = sum(start.elapsed_time(end) for start, end in pairs) / 1000.0
            old = self.device_cost[key[0]]
            self.device_cost[key[0]] = seconds if old is None else \
                SMOOTHING * seconds + (1 - SMOOTHING) * old
            self._sampled[key[0]] = False

    # ------------------------------------------------------------------ the report
    def facts(self, every: int) -> dict[str, Any]:
        """What the report says about the cadence used and what gradwatch cost."""
        share = self.total_gw / max(self.total_wall - self.total_gw, 1e-12) \
            if self.total_steps else None
        plain, detail = self._per_step(False), self._per_step(True)
        return {
            "every": every, "sync_every": self.sync_every,
            "detail_every": [{"from_step": s, "every": i} for s, i in self.changes],
            "density": DENSITY, "detail_steps_timed": self.detail_steps,
            "overhead_budget": self.budget,
            "overhead": None if share is None else round(share, 5),
            "overhead_steps": self.total_steps,
            "cost_ms": {"plain_step": None if plain is None else round(plain * 1e3, 4),
                        "detail_step": None if detail is None else round(detail * 1e3, 4),
                        "user_step": None if self.user_s is None
                        else round(self.user_s * 1e3, 4)},
            "device_timed": any(v is not None for v in self.device_cost.values()),
        }
