"""`gradwatch demo`: every lab experiment over 3 seeds, judged honestly (SEEDS.md section 7).

Seed 002's experiments are run here, arm by arm (the session fixture ``lab``); the end-to-end
tests at the end run `gradwatch demo` itself and are marked slow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gradwatch
from gradwatch import Report
from gradwatch.lab import EXPERIMENTS
from gradwatch.lab.core import ArmResults, RunResult, spread
from gradwatch.lab.main import main
from gradwatch.lab.seed002 import constant_prediction_loss, seed_data
from tests.conftest import LAB_LENGTH, LAB_SEEDS, DemoRun, LabRuns


def _kinds(run: RunResult) -> set[str]:
    return {f.kind for f in run.report.findings if f.severity in ("warning", "error")}


def test_seed_data_is_the_seeds_global_numpy_draw() -> None:
    state = np.random.get_state()
    try:
        np.random.seed(0)
        x = np.random.randn(100, 1)
        y = 3 * x + 2 + 0.5 * np.random.randn(100, 1)
    finally:
        np.random.set_state(state)
    sx, sy = seed_data()
    assert np.array_equal(sx.numpy(), x.astype(np.float32))
    assert np.array_equal(sy.numpy(), y.astype(np.float32))
    assert constant_prediction_loss() == pytest.approx(9.76, abs=0.01)


# --- SEEDS.md section 7: what really happens ------------------------------------------------
def test_default_init_relu_net_stalls_too_so_the_claim_only_partly_holds(lab: LabRuns) -> None:
    r, verdict = lab.experiment("sigmoid_vs_relu")
    assert verdict.verdict == "partly"
    for arm in ("sigmoid", "relu"):
        for run in r[arm]:
            assert run.final_loss == pytest.approx(constant_prediction_loss(), abs=0.02)
            assert "vanishing_gradient" in _kinds(run)
    assert EXPERIMENTS["sigmoid_vs_relu"].arm("relu_kaiming").role == "repair"
    assert all(run.final_loss < 0.5 for run in r["relu_kaiming"])
    assert "dead from step 0" in verdict.reason
    # the repair's text quotes the length the runs had, not the one the arm was written with
    assert f"after the same {len(r['relu_kaiming'][0].losses)} epochs" in verdict.repair


def test_clipping_on_an_infinite_norm_freezes_the_weights(lab: LabRuns) -> None:
    r, verdict = lab.experiment("large_init_clipping")
    assert verdict.verdict == "partly"
    assert all(math.isnan(v) for v in r.losses("no_clip"))  # NaN from step 1
    for run in r["no_clip"]:
        assert math.isfinite(run.losses[0]) and not math.isfinite(run.losses[1])
        assert "nonfinite" in _kinds(run)
    assert "is NaN from step 1 (every seed)" in verdict.observed
    for run in r["clip10"]:
        assert run.final_loss == pytest.approx(run.losses[0], rel=1e-6)  # frozen
        assert "loss_plateau" in _kinds(run)
    report = r["clip10"][0].report
    plateau = next(f for f in report.findings if f.kind == "loss_plateau")
    assert "clipping_on_infinite_norm" in [c.id for c in plateau.causes]
    assert all(r.id != "clip_grad_norm" for f in report.findings for r in f.remedies)
    assert all(run.final_loss < 2 for run in r["kaiming_lr0.01"])


def test_xavier_and_kaiming_learn_and_look_healthy(lab: LabRuns) -> None:
    r, verdict = lab.experiment("xavier_vs_kaiming")
    assert verdict.verdict == "holds"
    for arm in ("xavier", "kaiming"):
        for run in r[arm]:
            assert run.final_loss < 0.6
            assert _kinds(run) == set()


def _replace_losses(r: ArmResults, arm: str, edit: Any) -> ArmResults:
    """The same runs, but ``arm``'s losses edited by ``edit(k, losses)`` for run k."""
    out = ArmResults(r)
    out[arm] = [dataclasses.replace(run, losses=edit(k, list(run.losses)))
                for k, run in enumerate(r[arm])]
    return out


def test_seed002_verdicts_quote_the_runs_numbers_not_numbers_written_in_advance(
        lab: LabRuns) -> None:
    """The starting losses and the first NaN step in the texts are read from the runs:
    hand the judges other runs and they quote other numbers."""
    r, verdict = lab.experiment("xavier_vs_kaiming")
    judge = EXPERIMENTS["xavier_vs_kaiming"].judge
    starts = [run.losses[0] for run in r["xavier"]]
    assert f"(from {spread(starts)} and " in verdict.observed
    other = judge(_replace_losses(r, "xavier", lambda k, v: [500.0 + k, *v[1:]]))
    assert "(from 501 (500-502 over 3 seeds) and " in other.observed
    assert other.verdict == verdict.verdict and other.reason == verdict.reason

    r, verdict = lab.experiment("large_init_clipping")
    judge = EXPERIMENTS["large_init_clipping"].judge
    later = judge(_replace_losses(r, "no_clip", lambda k, v: [*[v[0]] * (3 + k),
                                                               *v[3 + k:]]))
    assert "is NaN from steps 3-5 (every seed)" in later.observed
    assert "is NaN from step 1 " not in later.observed


# --- the command line -------------------------------------------------------------------------
def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv, command="lab")
    return code, out.getvalue(), err.getvalue()


def test_lab_runs_one_experiment_and_writes_its_json(tmp_path: Path) -> None:
    code, out, _ = _main(["large_init_clipping", "--seeds", "3", "--out", str(tmp_path / "o"),
                          "--json", str(tmp_path / "lab.json"), "--quiet"])
    assert code == 0
    lab = json.loads((tmp_path / "lab.json").read_text())
    assert [e["name"] for e in lab["experiments"]] == ["large_init_clipping"]
    assert out.strip() == str((tmp_path / "o" / "index.html").resolve())


def test_lab_lists_experiments_and_refuses_bad_arguments(tmp_path: Path) -> None:
    code, out, _ = _main(["--list"])
    assert code == 0 and all(name in out for name in EXPERIMENTS)
    code, _, err = _main(["no_such_experiment", "--out", str(tmp_path)])
    assert code == 2 and "unknown experiment 'no_such_experiment'" in err
    code, _, err = _main(["--seeds", "0", "--out", str(tmp_path)])
    assert code == 2 and "--seeds must be at least 1" in err
    target = tmp_path / "taken.txt"
    target.write_text("not a folder")
    code, _, err = _main(["--out", str(target)])
    assert code == 2 and "existing file" in err
    assert target.read_text() == "not a folder"
    assert _main(["--seeds", "abc"])[0] == 2
    assert _main(["--help"])[0] == 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_shows_experiment_arm_seed_and_time_left_only_on_a_terminal() -> None:
    from gradwatch.lab.runner import Progress

    tty = _Terminal()
    bar = Progress(10.0, stream=tty)
    bar.show("sigmoid_vs_relu (seed 002 #1) · relu · seed 1")
    bar.advance(5.0)
    bar.show("sigmoid_vs_relu (seed 002 #1) · relu · seed 2")
    bar.clear()
    text = tty.getvalue()
    assert "relu · seed 2" in text and "s left" in text
    assert text.endswith("\r")  # the line is wiped, the verdicts print on a clean line
    piped = io.StringIO()
    Progress(10.0, stream=piped).show("anything")
    assert piped.getvalue() == ""
    quiet = _Terminal()
    Progress(10.0, stream=quiet, enabled=False).show("anything")
    assert quiet.getvalue() == ""


# --- the end-to-end run of `gradwatch demo` (slow) --------------------------------------------
def _experiment(demo: DemoRun, name: str) -> dict[str, Any]:
    assert demo.lab is not None, demo.stderr
    return next(e for e in demo.lab["experiments"] if e["name"] == name)


@pytest.mark.slow
def test_demo_runs_every_experiment_over_three_seeds_and_writes_every_file(
        demo_run: DemoRun) -> None:
    assert demo_run.code == 0, demo_run.stderr
    lab = demo_run.lab
    assert lab is not None and lab["schema"] == "gradwatch.lab/v1"
    assert lab["seeds"] == [0, 1, 2]
    assert [e["name"] for e in lab["experiments"]] == list(EXPERIMENTS)
    for exp in lab["experiments"]:
        assert exp["verdict"] in ("holds", "does not hold", "partly")
        for key in ("claim", "observed", "reason", "repair", "source", "setup"):
            assert exp[key], (exp["name"], key)
        for arm in exp["arms"]:
            assert [r["seed"] for r in arm["runs"]] == [0, 1, 2]
            for run in arm["runs"]:
                assert (demo_run.out / run["report_html"]).is_file()
                report = Report.load(demo_run.out / run["report_json"])
                assert report.run["status"] == "completed"
    index = (demo_run.out / "index.html").read_text(encoding="utf-8")
    for exp in lab["experiments"]:
        for arm in exp["arms"]:
            assert all(run["report_html"] in index for run in arm["runs"])
    # Under 3 minutes on 2 cores, as the README promises (the test machine may be busier).
    assert lab["duration_s"] < 180, lab["duration_s"]


@pytest.mark.slow
def test_stdout_gives_each_verdict_and_where_the_page_is(demo_run: DemoRun) -> None:
    text = demo_run.stdout
    for exp in demo_run.lab["experiments"]:  # type: ignore[index]
        assert f"[{exp['name']}]" in text
        assert f"verdict:  {exp['verdict'].upper()}" in text
    assert text.rstrip().splitlines()[-1] == f"index: {(demo_run.out / 'index.html').resolve()}"


@pytest.mark.slow
def test_lab_json_and_the_saved_reports_give_back_every_verdict(demo_run: DemoRun) -> None:
    """lab.json and the runs' saved reports are a faithful record: each experiment's judge,
    given the runs rebuilt from them, gives the demo's verdict word for word.

    Each run keeps its final loss, metrics and full report; non-finite numbers, null in the
    JSON, come back as NaN. ``losses`` has the run's ``steps`` entries, from the entry's
    loss curve (at most 200 points, the first and last step among them): each step takes
    the value of the last step the curve kept."""
    assert demo_run.code == 0 and demo_run.lab is not None, demo_run.stderr[-3000:]
    assert demo_run.lab["seeds"] == list(LAB_SEEDS)

    def number(value: Any) -> Any:
        return math.nan if value is None else value

    def losses(run: dict[str, Any]) -> list[float]:
        curve = dict(zip(run["loss_curve"]["step"], run["loss_curve"]["loss"], strict=True))
        assert 0 in curve and run["steps"] - 1 in curve
        out: list[float] = []
        for step in range(run["steps"]):
            out.append(number(curve[step]) if step in curve else out[-1])
        return out

    for name, exp in EXPERIMENTS.items():
        entry = _experiment(demo_run, name)
        results = ArmResults()
        for arm in entry["arms"]:
            results[arm["name"]] = [
                RunResult(name, arm["name"], arm["claim"], number(run["final_loss"]),
                          losses(run),
                          gradwatch.Report.load(demo_run.out / run["report_json"]),
                          {k: number(v) for k, v in run["metrics"].items()})
                for run in arm["runs"]]
        assert dataclasses.asdict(exp.judge(results)) == {
            k: entry[k] for k in ("verdict", "observed", "reason", "repair")}, name


@pytest.mark.slow
def test_the_shortened_lab_runs_give_the_demos_verdicts(demo_run: DemoRun,
                                                        lab: LabRuns) -> None:
    """The experiments the tests run with fewer steps (conftest.LAB_LENGTH) reach the
    verdict the demo reaches at full length, with the same findings on every run."""
    assert demo_run.code == 0 and demo_run.lab is not None, demo_run.stderr[-3000:]
    assert LAB_LENGTH
    for name in LAB_LENGTH:
        entry = _experiment(demo_run, name)
        r, verdict = lab.experiment(name)
        assert verdict.verdict == entry["verdict"], name
        for arm in entry["arms"]:
            assert [_kinds(run) for run in r[arm["name"]]] == [
                {f["kind"] for f in run["findings"] if f["severity"] in ("warning", "error")}
                for run in arm["runs"]], (name, arm["name"])
