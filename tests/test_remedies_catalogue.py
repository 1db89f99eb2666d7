"""The remedy catalogue and the cause ids against what the detectors really emit: no unknown
id, no orphaned entry, and every remedy's code compiles and runs on a small model."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import deep_net, seed_data, train_full_batch
from torch import nn

import gradwatch
from gradwatch.judge import registry as causes
from gradwatch.remedies import CATALOGUE, remedy

PACKAGE = Path(gradwatch.__file__).parent
SOURCES = sorted((PACKAGE / "judge").rglob("*.py"))



def calls(name: str) -> list[ast.Call]:
    """Every call of ``name(...)`` in the detectors and causes, as syntax trees."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id == name:
                found.append(node)
    return found


def id_pattern(arg: ast.expr) -> re.Pattern[str]:
    """The ids a first argument can produce: a literal, or an f-string's fixed parts."""
    if isinstance(arg, ast.Constant):
        return re.compile(re.escape(arg.value))
    assert isinstance(arg, ast.JoinedStr), ast.dump(arg)
    parts = [re.escape(v.value) if isinstance(v, ast.Constant) else "[a-z]+"
             for v in arg.values]
    return re.compile("".join(parts))


def emitted_remedies() -> dict[str, set[str]]:
    """Remedy id -> the keyword parameters detectors pass with it."""
    out: dict[str, set[str]] = {}
    for call in calls("remedy"):
        assert isinstance(call.args[0], ast.Constant), "remedy ids must be literals"
        out.setdefault(call.args[0].value, set()).update(k.arg for k in call.keywords if k.arg)
    return out


# --------------------------------------------------------------------------- static
def test_every_remedy_a_detector_names_exists_and_none_is_orphaned() -> None:
    named = emitted_remedies()
    assert set(named) - set(CATALOGUE) == set(), "named by a detector, missing in catalogue"
    assert set(CATALOGUE) - set(named) == set(), "in the catalogue, named by no detector"


def test_every_cause_id_is_declared_and_every_declared_id_is_emitted() -> None:
    patterns = [id_pattern(c.args[0]) for c in calls("Cause")]
    assert patterns
    for pattern in patterns:
        assert any(pattern.fullmatch(i) for i in causes.CAUSE_IDS), pattern.pattern
    for cause_id in causes.CAUSE_IDS:
        assert any(p.fullmatch(cause_id) for p in patterns), f"{cause_id} is never emitted"
    assert len(set(causes.CAUSE_IDS)) == len(causes.CAUSE_IDS)


def sample(param: str) -> Any:
    """A plausible measured value for a remedy parameter, as detectors pass them."""
    return {"nonlinearity": "relu", "old": "(nn.Sigmoid, nn.Tanh)", "width": 10, "depth": 3,
            "max_norm": 4.8, "lr": 0.001, "factor": 0.1, "old_lr": "0.01",
            "measured": "0.5", "target": "0.001", "mean": "0.5", "std": "2",
            "layer": "2", "bias": "-3", "site": "3"}.get(param, "1")


def namespace() -> dict[str, Any]:
    """What remedy code refers to: a small model, its optimizer, a batch and a loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.Sigmoid(), nn.Linear(10, 10), nn.Tanh(),
                          nn.Linear(10, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    loss_fn = nn.functional.mse_loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = loss_fn(model(x), y)
    loss.backward()
    return {"torch": torch, "nn": nn, "model": model, "optimizer": optimizer, "x": x, "y": y,
            "loss_fn": loss_fn, "loss": loss, "n_in": 4, "n_out": 1}


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("remedy_id", sorted(CATALOGUE))
def test_remedy_code_compiles_and_runs_with_the_parameters_detectors_pass(
        remedy_id: str) -> None:
    """Rendered with exactly the parameters detectors pass (a missing one raises KeyError),
    then run against a small model: the model still computes a finite output."""
    params = {p: sample(p) for p in emitted_remedies().get(remedy_id, set())}
    r = remedy(remedy_id, **params)
    assert r.id == remedy_id and r.text and r.code
    env = namespace()
    exec(compile(r.code, f"<remedy {remedy_id}>", "exec"), env)  # our own catalogue's code
    assert torch.isfinite(env["model"](env["x"])).all()


def test_unknown_remedy_id_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown remedy 'nope'; known: kaiming_init"):
        remedy("nope")


# --------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def pathological() -> list[gradwatch.Report]:
    """Short real runs that between them raise every gradient-side finding."""
    x, y = seed_data()
    reports = []
    torch.manual_seed(0)
    reports.append(train_full_batch(deep_net(nn.Sigmoid), x, y, lr=0.01, steps=120))
    for clip in (None, 10.0):
        torch.manual_seed(0)
        model = deep_net(nn.ReLU, lambda w: nn.init.normal_(w, 0, 10))
        reports.append(train_full_batch(model, x, y, lr=0.1, steps=30, clip=clip))
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    reports.append(train_full_batch(model, 1000 + 300 * x, y, lr=1.5e-6, steps=40))
    return reports


def test_real_findings_use_declared_causes_and_runnable_remedies(
        pathological: list[gradwatch.Report]) -> None:
    kinds = set()
    for report in pathological:
        assert report.run["internal_errors"] == []
        for f in report.findings:
            kinds.add(f.kind)
            for c in f.causes:
                assert c.id in causes.CAUSE_IDS, c.id
            for r in f.remedies:
                assert r.id in CATALOGUE
                compile(r.code, f"<{f.kind}: {r.id}>", "exec")
    assert {"vanishing_gradient", "exploding_gradient", "nonfinite", "loss_plateau",
            "loss_divergence"} <= kinds
