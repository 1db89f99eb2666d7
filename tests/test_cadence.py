"""The overhead budget (``watch(..., overhead=0.01)``, ``measure/cadence.py``): gradwatch
times its own work, stretches the detail cadence of long runs to keep its share of the step,
keeps short runs at the full cadence, and says in the report what it measured how often."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.report import Report


def _train(steps: int, kill_at: int | None = None, **options: object) -> Report:
    """A small ReLU net, full-batch SGD; at ``kill_at`` the first layer's bias is pushed to
    -20: its units die (and, without gradient, stay dead)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    with gradwatch.watch(model, opt, **options) as gw:
        for step in range(steps):
            if step == kill_at:
                with torch.no_grad():
                    model[0].bias.fill_(-20.0)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return gw.report()


def _detail_rule(cadence: dict, step: int) -> bool:
    every = [c["every"] for c in cadence["detail_every"] if c["from_step"] <= step][-1]
    return step < 8 or step % every == 0


def test_a_long_run_over_budget_stretches_the_detail_cadence_within_the_density_floor() -> None:
    # A tiny net's step is a fraction of a millisecond: gradwatch's hooks are far more
    # than 1% of it, so the cadence stretches -- but never past 1 detail step in 32 run.
    report = _train(2200)
    c = report.run["cadence"]
    assert c["overhead_budget"] == 0.01
    assert c["overhead"] > 0.01  # measured, not assumed
    changes = c["detail_every"]
    assert changes[0] == {"from_step": 0, "every": 16}
    assert len(changes) >= 2, changes
    for before, after in itertools.pairwise(changes):
        assert after["every"] in (before["every"] * 2, before["every"] // 2)
        assert after["from_step"] % 64 == 0  # at a host copy
        assert after["every"] * c["density"] <= after["from_step"]
    detail = report.series["detail_step"]
    assert all(_detail_rule(c, s) for s in detail)
    assert max(detail) > 2000  # still measured late in the run
    # fewer detail steps than the fixed cadence (2200 / 16 = 138)
    assert c["detail_steps_timed"] < 2200 // 16
    summary = " ".join(report.summary().split())
    assert "over its 1% budget" in summary and "stretched from every 16th step" in summary


def test_within_budget_or_without_one_the_cadence_stays_fixed() -> None:
    for options in ({"overhead": 0.9}, {"overhead": None}):
        report = _train(1200, **options)
        c = report.run["cadence"]
        assert c["detail_every"] == [{"from_step": 0, "every": 16}], options
        assert report.series["detail_step"][8:12] == [16, 32, 48, 64]
        assert c["overhead"] is not None and c["overhead"] > 0
    assert "within its 90% budget" in " ".join(_train(200, overhead=0.9).summary().split())


def test_a_short_run_keeps_the_full_cadence_whatever_the_budget() -> None:
    report = _train(500, overhead=1e-6)
    assert report.run["cadence"]["detail_every"] == [{"from_step": 0, "every": 16}]


def test_units_dying_late_in_a_stretched_run_are_still_found() -> None:
    healthy = _train(2200, overhead=1e-6)
    assert "dying_relu" not in healthy.kinds()
    report = _train(2200, kill_at=1700, overhead=1e-6)
    assert len(report.run["cadence"]["detail_every"]) >= 2  # stretched before the jump
    dying = [f for f in report.findings if f.kind == "dying_relu"]
    assert dying, [f.kind for f in report.findings]
    assert dying[0].first_step >= 1700 and dying[0].severity != "info"


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, True, "1%"])
def test_a_bad_budget_is_refused_with_what_is_allowed(bad: object) -> None:
    with pytest.raises(ValueError, match="'overhead' must be a fraction of the step"):
        _train(1, overhead=bad)


def test_the_command_line_takes_a_budget_or_off(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import torch\nfrom torch import nn\nm = nn.Linear(4, 1)\n"
                      "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                      "for _ in range(20):\n    opt.zero_grad()\n"
                      "    m(torch.randn(8, 4)).pow(2).mean().backward()\n    opt.step()\n")
    out = tmp_path / "r.json"
    for value, budget in (("off", None), ("0.2", 0.2)):
        done = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--quiet",
                               "--overhead", value, "--json", str(out), str(script)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert Report.load(out).run["cadence"]["overhead_budget"] == budget
    done = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--overhead", "2",
                           str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--overhead" in done.stderr and "(0, 1]" in done.stderr


def test_device_time_on_cuda_is_read_from_events_only_once_they_completed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: torch.cuda.Event is replaced by a stand-in whose completion the test
    controls, to check the bookkeeping a CUDA run relies on -- one sampled step of each
    kind per window, no read (so no sync) before ``query()`` is true, and a device time
    larger than the host time raises the cost the budget sees."""
    from gradwatch.measure.cadence import Cadence

    done: list[bool] = [False]
    clock = [0.0]

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at = -1.0

        def record(self) -> None:
            self.at = clock[0]

        def query(self) -> bool:
            return done[0]

        def elapsed_time(self, end: Event) -> float:
            assert done[0], "read before the event completed: that would sync"
            return (end.at - self.at) * 1000.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    c = Cadence(detail_every=16, budget=0.01, sync_every=64)
    c.device = torch.device("cuda")  # a device object, no CUDA needed to make one
    for step in range(64):
        for _ in range(2):  # two hook calls a step, each 5 ms of device work
            c.depth += 1
            c.enter()
            clock[0] += 0.005
            c.depth -= 1
            c.leave()
        c.end_step(step, c.is_detail(step))
    sampled = {key for key, _, _ in c._events}
    assert sampled == {(False, 9), (True, 16)}  # the first plain and detail step after 0-7
    c.propose(64)
    assert c.device_cost == {True: None, False: None}  # not complete: not read
    done[0] = True
    c.propose(128)
    assert c.device_cost[True] == pytest.approx(0.010) and \
        c.device_cost[False] == pytest.approx(0.010)
    assert c._events == []
