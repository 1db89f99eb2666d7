"""`gradwatch demo`: seed 002's experiments, run as written, and what gradwatch says on each."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gradwatch import Report
from gradwatch.lab import RUNS
from gradwatch.lab.demo import main
from gradwatch.lab.seed002 import seed_data

CONSTANT_PREDICTION_LOSS = 9.76  # variance of y: SEEDS.md section 7


def _strict_json(text: str) -> Any:
    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the whole demo once, in process, into a fresh folder."""
    out = tmp_path_factory.mktemp("demo") / "reports"  # does not exist yet: main creates it
    threads = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--out", str(out), "--seed", "0"])
    summary = _strict_json((out / "summary.json").read_text(encoding="utf-8"))
    runs = {(r["experiment"], r["variant"]): r for r in summary["runs"]}
    return {"code": code, "out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "summary": summary, "runs": runs, "threads_before": threads,
            "threads_after": torch.get_num_threads()}


def _report(demo: dict[str, Any], experiment: str, variant: str) -> Report:
    return Report.load(demo["out"] / f"{experiment}-{variant}.json")


def _kinds(entry: dict[str, Any]) -> dict[str, str]:
    return {f["kind"]: f["severity"] for f in entry["findings"]}


def test_seed_data_is_the_seeds_global_numpy_draw() -> None:
    state = np.random.get_state()
    try:
        np.random.seed(0)
        x = np.random.randn(100, 1)
        y = 3 * x + 2 + 0.5 * np.random.randn(100, 1)
    finally:
        np.random.set_state(state)
    tx, ty = seed_data()
    assert tx.dtype == ty.dtype == torch.float32
    assert torch.equal(tx, torch.FloatTensor(x)) and torch.equal(ty, torch.FloatTensor(y))


def test_demo_exits_zero_and_writes_every_file(demo: dict[str, Any]) -> None:
    assert demo["code"] == 0, demo["stderr"]
    out: Path = demo["out"]
    assert len(RUNS) == 6
    assert set(demo["runs"]) == {(v.experiment, v.name) for v in RUNS}
    for experiment, variant in demo["runs"]:
        stem = f"{experiment}-{variant}"
        html = (out / f"{stem}.html").read_text(encoding="utf-8")
        assert html.lstrip().lower().startswith("<!doctype html>")
        report = _report(demo, experiment, variant)
        assert report.run["status"] == "completed"
        assert report.run["steps"] == demo["runs"][(experiment, variant)]["epochs"]
    assert (out / "index.html").is_file()
    assert demo["summary"]["schema"] == "gradwatch.demo/v1"
    assert demo["threads_after"] == demo["threads_before"]


def test_index_links_every_report_and_lists_findings(demo: dict[str, Any]) -> None:
    index = (demo["out"] / "index.html").read_text(encoding="utf-8")
    for entry in demo["runs"].values():
        assert f"href='{entry['report_html']}'" in index
        assert f"href='{entry['report_json']}'" in index
        for f in entry["findings"]:
            assert f["kind"] in index
    assert "<script" not in index.lower()
    assert "PyTorch&#x27;s default init" in index  # text is escaped, not pasted raw


def test_default_init_sigmoid_and_relu_both_stall_at_constant_prediction(
        demo: dict[str, Any]) -> None:
    for variant in ("sigmoid", "relu"):
        entry = demo["runs"][("sigmoid_vs_relu", variant)]
        assert entry["epochs"] == 500
        assert entry["final_loss"] == pytest.approx(CONSTANT_PREDICTION_LOSS, abs=0.01)
        assert entry["first_loss"] > 12
        assert _kinds(entry).get("loss_plateau") in ("warning", "error"), entry["findings"]
    sigmoid = demo["runs"][("sigmoid_vs_relu", "sigmoid")]
    assert _kinds(sigmoid).get("vanishing_gradient") in ("warning", "error")


def test_large_init_without_clipping_overflows_in_the_forward_pass(demo: dict[str, Any]) -> None:
    entry = demo["runs"][("large_init_clipping", "no_clip")]
    assert entry["epochs"] == 50
    assert entry["final_loss"] is None  # NaN, written as null
    assert entry["first_loss"] > 1e20
    assert _kinds(entry).get("nonfinite") == "error"
    report = _report(demo, "large_init_clipping", "no_clip")
    nonfinite = next(f for f in report.findings if f.kind == "nonfinite")
    assert nonfinite.evidence["forward_overflowed"] is True
    assert nonfinite.first_step == 1  # step 0's loss is finite (about 5e26), NaN from step 1


def test_large_init_with_clipping_is_frozen_not_stable(demo: dict[str, Any]) -> None:
    entry = demo["runs"][("large_init_clipping", "clip10")]
    report = _report(demo, "large_init_clipping", "clip10")
    losses = report.series["loss"]
    assert len(losses) == 50 and len(set(losses)) == 1 and losses[0] > 1e20  # frozen
    assert entry["final_loss"] == entry["first_loss"]
    assert _kinds(entry).get("loss_plateau") == "error"
    assert any("clipping_on_infinite_norm" in f["causes"] for f in entry["findings"])


def test_clipping_is_never_recommended_for_the_overflowing_nets(demo: dict[str, Any]) -> None:
    for variant in ("no_clip", "clip10"):
        report = _report(demo, "large_init_clipping", variant)
        assert report.findings
        recommended = {r.id for f in report.findings for r in f.remedies}
        assert "clip_grad_norm" not in recommended, (variant, recommended)


def test_xavier_and_kaiming_learn_and_look_healthy(demo: dict[str, Any]) -> None:
    for variant in ("xavier", "kaiming"):
        entry = demo["runs"][("xavier_vs_kaiming", variant)]
        assert entry["epochs"] == 500
        assert entry["final_loss"] < 1
        problems = [f for f in entry["findings"] if f["severity"] in ("warning", "error")]
        assert problems == [], (variant, problems)


def test_stdout_tells_each_run_and_each_finding(demo: dict[str, Any]) -> None:
    text = demo["stdout"]
    for (experiment, variant), entry in demo["runs"].items():
        assert f"[{experiment} / {variant}]" in text
        for f in entry["findings"]:
            line = next(ln for ln in text.splitlines() if f["summary"] in ln)
            assert f["severity"] in line and f["kind"] in line
    assert text.rstrip().splitlines()[-1] == f"index: {(demo['out'] / 'index.html').resolve()}"


def test_out_that_is_a_file_is_refused_with_exit_2(tmp_path: Path) -> None:
    target = tmp_path / "taken.txt"
    target.write_text("not a folder")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--out", str(target)])
    assert code == 2
    assert "existing file" in stderr.getvalue()
    assert target.read_text() == "not a folder"


def test_usage_errors_return_2_and_help_returns_0() -> None:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["--seed", "abc"]) == 2
        assert main(["--help"]) == 0
