"""Tiny real models and training loops shared by the tests."""

from __future__ import annotations

import json
import os
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


# --------------------------------------------------------------------------- the demo
# `gradwatch demo` (every lab experiment, 3 seeds) is the README's main job; several test
# files read its output. It runs once per session, in a subprocess started as soon as
# collection shows a test that needs it, so that it uses the second core while the other
# tests run on the first.
DEMO_TESTS = ("test_demo.py", "test_html_render.py")


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
            self.lab = json.loads(lab.read_text(encoding="utf-8")) if lab.exists() else None
        return self


_DEMO: list[DemoRun] = []


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    if not _DEMO and any(item.path.name in DEMO_TESTS for item in items):
        _DEMO.append(DemoRun())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for run in _DEMO:
        if run.proc.poll() is None:  # the session ended early: do not leave it running
            run.proc.kill()
            run.proc.communicate()
        shutil.rmtree(run.out.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_run() -> DemoRun:
    """The session's `gradwatch demo` run, finished."""
    if not _DEMO:
        _DEMO.append(DemoRun())
    return _DEMO[0].wait()


# tests/scripts/ holds training scripts that `gradwatch run` executes in a subprocess;
# --doctest-modules must not import (and so run) them.
collect_ignore = ["scripts"]

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
