"""Bad input never crashes gradwatch: it gets the documented error, and nothing is left behind.

Property-based (hypothesis): random option values for ``watch``, random threshold tables,
every threshold at any value of its valid range on real runs' histories, and random JSON
documents (and real reports with one part replaced by random JSON) for ``Report.load``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules import module as module_hooks

import gradwatch
from gradwatch.measure.monitor import Monitor
from gradwatch.report import build_report
from gradwatch.thresholds import Thresholds, resolve_thresholds, valid_range
from gradwatch.watch import OPTION_NAMES

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

ANY_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                                                                  allow_infinity=False),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=24)


def no_hooks_left() -> None:
    assert not module_hooks._global_forward_hooks
    assert not module_hooks._global_forward_pre_hooks
    assert torch.autograd.backward is gradwatch.measure.probes._ORIGINAL_BACKWARD


# --------------------------------------------------------------------------- watch options
@FAST
@given(st.dictionaries(st.sampled_from([*OPTION_NAMES, "sync", "Every", ""]), ANY_SCALAR,
                       max_size=4))
def test_watch_takes_any_options_or_raises_a_documented_error(options: dict[str, Any]) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        gw = gradwatch.watch(model, opt, **options)
    except (TypeError, ValueError) as exc:
        assert str(exc), "an error must say what was wrong"
        assert not model._forward_hooks and not opt._optimizer_step_pre_hooks
        no_hooks_left()
        return
    with gw:
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    assert gw.report().run["steps"] == 1
    no_hooks_left()


# --------------------------------------------------------------------------- thresholds
@FAST
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Thresholds)]
                                       + ["vanishing", "MIN_STEPS"]), ANY_SCALAR, max_size=5))
def test_threshold_tables_are_valid_or_refused(overrides: dict[str, Any]) -> None:
    try:
        direct = Thresholds(**overrides)
    except (TypeError, ValueError):
        direct = None
    try:
        t = resolve_thresholds(None, overrides)
    except (TypeError, ValueError) as exc:
        assert "threshold" in str(exc)
        assert direct is None, "the constructor took what resolve_thresholds refused"
        return
    assert direct == t
    for field in dataclasses.fields(t):
        value = getattr(t, field.name)
        assert value in valid_range(field.name), (field.name, value)
        assert isinstance(value, int if field.type in ("int", int) else float)


def in_range(name: str) -> st.SearchStrategy[float | int]:
    """Any value threshold ``name`` accepts (its ends included where the range is closed)."""
    closed_low, low, high, closed_high = valid_range(name)._parts()
    field = next(f for f in dataclasses.fields(Thresholds) if f.name == name)
    if field.type in ("int", int):
        first = int(low) if closed_low else math.floor(low) + 1
        return st.integers(first, first + 200)
    low, high = max(low, -1e12), min(high, 1e12)
    return st.floats(low, high, exclude_min=not closed_low, exclude_max=not closed_high,
                     allow_nan=False)


@pytest.fixture(scope="module")
def finished_monitors() -> list[Monitor]:
    """Three real runs: a vanishing sigmoid stack, an exploding regression, dead ReLUs."""
    monitors = []
    torch.manual_seed(0)
    x = torch.randn(64, 1)
    y = 3 * x + 2
    for make, lr, inputs in (
            (lambda: nn.Sequential(*[m for _ in range(6) for m in (nn.LazyLinear(8),
                                                                    nn.Sigmoid())],
                                   nn.Linear(8, 1)), 0.01, x),
            (lambda: nn.Linear(1, 1), 0.9, x * 10),
            (lambda: nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1)), 3.0, x)):
        model = make()
        model(inputs)  # materialise lazy layers
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        with gradwatch.watch(model, opt) as gw:
            for _ in range(60):
                opt.zero_grad()
                nn.functional.mse_loss(model(inputs), y).backward()
                opt.step()
        monitors.append(gw.monitor)
    return monitors


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_every_threshold_anywhere_in_its_range_judges_without_error(
        finished_monitors: list[Monitor], data: st.DataObject) -> None:
    names = data.draw(st.lists(st.sampled_from([f.name for f in dataclasses.fields(Thresholds)]),
                               min_size=1, max_size=8, unique=True))
    overrides = {name: data.draw(in_range(name), label=name) for name in names}
    thresholds = resolve_thresholds(None, overrides)
    for monitor in finished_monitors:
        judged = copy.copy(monitor)
        judged.thresholds = thresholds
        report = build_report(judged)
        assert report.run["detector_errors"] == [], (overrides, report.run["detector_errors"])
        report.summary()
        report.to_html()


def test_threshold_errors_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"'min_steps' must be a whole number in \[2, inf\)"):
        Thresholds(min_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'explosion_lr_reduction' must be in \[1, inf\)"):
        Thresholds().replace(explosion_lr_reduction=0)
    for name in ("exploding_depth_ratio", "exploding_grad_to_weight", "input_scale_high",
                 "plateau_window", "min_steps"):
        with pytest.raises(ValueError, match=name):
            resolve_thresholds(None, {name: 0})
    assert Thresholds(min_steps=3.0).min_steps == 3  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Report.load
@pytest.fixture(scope="module")
def saved_report(finished_monitors: list[Monitor]) -> dict[str, Any]:
    return json.loads(build_report(finished_monitors[0]).to_json())


def load_or_refuse(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document), encoding="utf-8")
    try:
        report = gradwatch.Report.load(path)
    except ValueError as exc:
        assert str(exc).startswith("not a gradwatch report: "), exc
        return
    repr(report)
    report.summary()
    report.to_html()
    json.loads(report.to_json())
    assert all(f.kind in gradwatch.KINDS for f in report.findings)


@FAST
@given(JSON)
def test_random_json_is_refused_with_a_value_error(tmp_path: Path, document: Any) -> None:
    load_or_refuse(tmp_path / "r.json", document)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a JSON value (dict keys and list indices), depth first."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += paths(v, (*prefix, i))
    return out


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_report_with_any_part_replaced_loads_or_is_refused(
        tmp_path: Path, saved_report: dict[str, Any], data: st.DataObject) -> None:
    document = copy.deepcopy(saved_report)
    where = data.draw(st.sampled_from(paths(document)[1:]), label="path")
    replacement = data.draw(JSON, label="value")
    parent = document
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = replacement
    load_or_refuse(tmp_path / "r.json", document)


@pytest.mark.parametrize("content", [b"[1, 2, 3]", b'{"schema": "gradwatch.report/v1"}',
                                     b"\xff\xfe\x00", b"", b"[" * 100_000, b"not json"])
def test_malformed_files_are_value_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"^not a gradwatch report: "):
        gradwatch.Report.load(path)


def test_a_report_without_a_duration_or_cadence_renders(saved_report: dict[str, Any]) -> None:
    """The contract allows ``run.duration_s`` null and an older report has no
    ``run.cadence``: both pages render without them (found by the property test above)."""
    document = copy.deepcopy(saved_report)
    document["run"]["duration_s"] = None
    document["run"].pop("cadence", None)
    report = gradwatch.Report(document)
    assert "steps, run completed" in report.summary() and " in None" not in report.summary()
    assert "cost:" not in report.summary()
    assert "<html" in report.to_html()
