"""Tiny real models and training loops shared by the tests."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.history import History, LayerInfo
from gradwatch.lab.core import ArmResults, RunResult, Verdict


def ran_until_settled(verified: dict, budget: int) -> bool:
    """A --verify re-run ran its whole budget, or stopped earlier because its outcome was
    settled, and says so."""
    if verified["steps"] == budget:
        return True
    return 0 < verified["steps"] < budget and "stopped after" in (verified.get("note") or "")


def run_plain(script: Path | str, *args: str) -> None:
    """The script in this process without gradwatch, as ``python script args`` runs it."""
    saved = sys.argv[:]
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv[:] = saved


def seed_data() -> tuple[torch.Tensor, torch.Tensor]:
    """SEEDS.md section 6: X ~ N(0,1) (100x1), y = 3X + 2 + 0.5 noise, numpy seed 0."""
    rng = np.random.RandomState(0)
    x = rng.randn(100, 1)
    y = 3 * x + 2 + 0.5 * rng.randn(100, 1)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def deep_net(act: Callable[[], nn.Module], init: Callable[[torch.Tensor], object] | None = None,
             depth: int = 10, width: int = 10, n_in: int = 1) -> nn.Sequential:
    """SEEDS.md section 6's network: ``depth`` x (Linear + act), then Linear(width, 1)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(n_in if i == 0 else width, width)
        if init is not None:
            init(lin.weight)
        layers += [lin, act()]
    head = nn.Linear(width, 1)
    if init is not None:
        init(head.weight)
    return nn.Sequential(*layers, head)


def train_full_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int,
                     clip: float | None = None, optimizer: str = "sgd",
                     **watch_options: object) -> gradwatch.Report:
    """Full-batch MSE training under ``gradwatch.watch``; returns the report."""
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    with gradwatch.watch(model, opt, **watch_options) as gw:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
            opt.step()
    return gw.report()


def kaiming_relu_mlp(n_in: int = 8, width: int = 64, hidden: int = 3) -> nn.Sequential:
    """A healthy ReLU MLP: Kaiming-normal weights, zero biases, a linear head to 1 output."""
    layers: list[nn.Module] = []
    for i in range(hidden):
        lin = nn.Linear(n_in if i == 0 else width, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class PreNormBlock(nn.Module):
    """x + MLP(LayerNorm(x)): the residual block of modern deep nets."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def residual_layernorm_mlp(n_in: int = 16, width: int = 32, blocks: int = 6,
                           n_out: int = 2) -> nn.Sequential:
    """Thirteen linear layers deep, with skips and LayerNorm: a healthy deep net."""
    return nn.Sequential(nn.Linear(n_in, width), *[PreNormBlock(width) for _ in range(blocks)],
                         nn.LayerNorm(width), nn.Linear(width, n_out))


# --------------------------------------------------------------------------- the lab
# The lab tests run the experiment arms they check, in this process, each (experiment, arm,
# seed, length) once per session (the ``lab`` fixture): test_demo.py, test_lab_*.py and
# test_activations.py share the runs. An arm's length is the demo's unless LAB_LENGTH
# shortens it.

LAB_SEEDS = (0, 1, 2)  # gradwatch demo's seeds (DEFAULT_SEEDS = 3)

LAB_LENGTH: dict[str, dict[str, int]] = {
    # The sigmoid and default-init ReLU nets sit at the constant-prediction loss from step
    # ~100 on, with the same findings as after 500 epochs, and the Kaiming repair is below
    # 0.4 on every seed by step 200: the verdict (partly) and every number the tests check
    # are settled. xavier_vs_kaiming keeps its 500 epochs: Xavier's loss is not monotonic
    # and is below 0.6 on every seed only at the end. The other experiments are short already
    # (30-100 steps, under 3 s for all arms and seeds), and their verdicts need the whole
    # run (the RNN's cliff comes late; dead units must stay dead for the whole run).
    "sigmoid_vs_relu": {"steps": 200},
}


class LabRuns:
    """The lab runs made by this session's tests: each (experiment, arm, seed, length) once.

    Get it through the session fixture ``lab`` (this module is imported twice, as
    ``conftest`` and as ``tests.conftest``; the fixture is one object for every test)."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str, int, tuple[tuple[str, int], ...]], RunResult] = {}

    def run(self, experiment: str, arm: str, seed: int, **length: int) -> RunResult:
        """One arm of a lab experiment with one torch seed. ``length`` (``steps=`` or
        ``epochs=``) defaults to LAB_LENGTH's for the experiment, else the demo's."""
        from gradwatch.lab import EXPERIMENTS

        length = length or LAB_LENGTH.get(experiment, {})
        key = (experiment, arm, seed, tuple(sorted(length.items())))
        if key not in self._runs:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as lab.runner.run_lab runs them
            try:
                self._runs[key] = EXPERIMENTS[experiment].arm(arm).run(seed, **length)
            finally:
                torch.set_num_threads(threads)
        return self._runs[key]

    def experiment(self, name: str, seeds: tuple[int, ...] = LAB_SEEDS,
                   **length: int) -> tuple[ArmResults, Verdict]:
        """Every arm of one lab experiment over ``seeds``, and its judge's verdict: what
        ``gradwatch demo`` runs and judges for it (with LAB_LENGTH's shorter runs)."""
        from gradwatch.lab import EXPERIMENTS

        exp = EXPERIMENTS[name]
        results = ArmResults({arm.name: [self.run(name, arm.name, seed, **length)
                                         for seed in seeds] for arm in exp.arms})
        return results, exp.judge(results)


@pytest.fixture(scope="session")
def lab() -> LabRuns:
    """The session's lab runs (LabRuns): the lab tests run the arms they check here."""
    return LabRuns()


# --------------------------------------------------------------------------- the demo
# `gradwatch demo` itself (every lab experiment, 3 seeds: the README's main job) is run only
# by the end-to-end tests that use the demo_run fixture; they must be marked slow. When one
# is selected, the demo starts in a subprocess at collection, on the second core, and those
# tests run last; nothing else reads its output.


def _not_json(token: str) -> None:
    raise AssertionError(f"lab.json is not strict JSON: it holds {token}")


class DemoRun:
    """One `gradwatch demo` subprocess and, once it has finished, what it produced."""

    def __init__(self) -> None:
        out = Path(tempfile.mkdtemp(prefix="gradwatch-demo-test-")) / "demo"
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradwatch", "demo", "--out", str(out)],
            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.code: int | None = None
        self.stdout = self.stderr = ""
        self.lab: dict[str, Any] | None = None

    def wait(self) -> DemoRun:
        if self.code is None:
            self.stdout, self.stderr = self.proc.communicate(timeout=900)
            self.code = self.proc.returncode
            lab = self.out / "lab.json"
            self.lab = json.loads(lab.read_text(encoding="utf-8"),
                                  parse_constant=_not_json) if lab.exists() else None
        return self

    def close(self) -> None:
        if self.proc.poll() is None:  # the session ended early: do not leave it running
            self.proc.kill()
            self.proc.communicate()
        shutil.rmtree(self.out.parent, ignore_errors=True)


_DEMO: list[DemoRun] = []
_PENDING: list[Any] = []  # test modules whose subprocesses wait for the demo's core
_BACKGROUND: list[Any] = []  # what those modules started; closed at the end


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_demo: the test reads the session's "
                            "`gradwatch demo` run (added to every test using demo_run; such "
                            "a test must also be marked slow)")
    config.addinivalue_line("markers", "slow: a heavy test (pytest -m 'not slow' skips it)")


@pytest.hookimpl(trylast=True)  # after -k/-m/--deselect: start only what selected tests need
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Start the background work of the selected tests, and order the tests so that none
    waits while there is other work.

    A test module may define ``start_in_background()`` (idempotent): it starts the module's
    subprocesses and returns something with a ``close()``. It is called at once, unless a
    selected test needs the demo: then when the demo has finished (checked between tests)
    or when a test is about to wait for it, so that the demo keeps a core to itself. Order:
    the tests that need nothing in the background, then those modules, then the end-to-end
    tests of the demo.
    """
    for item in items:
        if "demo_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_demo)
        if item.get_closest_marker("needs_demo") and not item.get_closest_marker("slow"):
            raise pytest.UsageError(f"{item.nodeid} runs `gradwatch demo`: mark it slow")
    starters = list(dict.fromkeys(
        module for item in items
        if hasattr(module := getattr(item, "module", None), "start_in_background")))
    if not config.option.collectonly:
        if not _DEMO and any(item.get_closest_marker("needs_demo") for item in items):
            _DEMO.append(DemoRun())
        _PENDING.extend(starters)
        if not _DEMO:
            _start_pending()

    def group(item: pytest.Item) -> int:
        if item.get_closest_marker("needs_demo"):
            return 2
        return 1 if getattr(item, "module", None) in starters else 0

    items[:] = sorted(items, key=group)  # stable: the order within each group is kept


def _start_pending() -> None:
    while _PENDING:
        _BACKGROUND.append(_PENDING.pop(0).start_in_background())


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    if _PENDING and all(run.proc.poll() is not None for run in _DEMO):
        _start_pending()  # the demo has finished: its core is free


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for job in [*_DEMO, *_BACKGROUND]:
        job.close()


@pytest.fixture(scope="session")
def demo_run() -> DemoRun:
    """The session's `gradwatch demo` run, finished (only for tests marked slow)."""
    if not _DEMO:
        _DEMO.append(DemoRun())
    _start_pending()  # this process is about to wait: the other core can start them
    return _DEMO[0].wait()


# tests/scripts/ and tests/reliability/scripts/ hold training scripts that `gradwatch run`
# executes; --doctest-modules must not import (and so run) them.
collect_ignore = ["scripts", "reliability/scripts"]

# Tiny models run fastest on one thread, and two test processes (or CI's other jobs) on
# a 2-core machine otherwise fight over the cores.
torch.set_num_threads(1)


def linear_stack(n_layers: int, acts: list[str] | None = None, **extra: object) -> History:
    """An empty History of a Sequential of ``n_layers`` 10x10 Linear layers named 0, 2, 4...

    The scaffolding of the synthetic-history tests: they then record the steps they need.
    ``acts`` is the activation after each layer (ReLU, and none after the last, by
    default); ``extra`` sets further LayerInfo fields on every layer.
    """
    acts = acts or ["relu"] * (n_layers - 1) + ["none"]
    h = History()
    h.roots.append("Sequential")
    for i in range(n_layers):
        h.add_layer(LayerInfo(name=str(2 * i), type="Linear", params=110, root=0, order=i,
                              param_names=[f"{2 * i}.weight", f"{2 * i}.bias"], fan_in=10,
                              fan_out=10, activation=acts[i], **extra))  # type: ignore[arg-type]
    return h


def only(report: gradwatch.Report, kind: str) -> gradwatch.Finding:
    """The one finding of ``kind`` in ``report`` (fails, listing all findings, otherwise)."""
    found = [f for f in report.findings if f.kind == kind]
    assert len(found) == 1, [(f.kind, f.severity, f.summary) for f in report.findings]
    return found[0]


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return seed_data()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
