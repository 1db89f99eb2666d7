"""Repairs proved on whole scripts: the numerically safe form of a NaN-producing operation,
the learning rate a schedule collapsed, the learning-rate ladder, an activation swap with
the init that fits it, and ``gradwatch run --fix`` restarting a run with the remedy that
repairs it.

Each test copies a user-style script from ``tests/scripts`` into its own folder and runs
``python -m gradwatch run`` on it in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).parent / "scripts"
TIMEOUT_S = 400


def gradwatch_run(tmp_path: Path, name: str, *args: str) -> tuple[dict[str, Any], str, str]:
    """``gradwatch run`` on ``tests/scripts/<name>`` copied to tmp_path as train.py: the
    report, the script's stdout and gradwatch's stderr."""
    script = tmp_path / "train.py"
    script.write_bytes((SCRIPTS / name).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "run", *args, "--json",
                           "report.json", str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert script.read_bytes() == (SCRIPTS / name).read_bytes()  # never modified
    return json.loads((tmp_path / "report.json").read_text()), proc.stdout, proc.stderr


def finding_of(report: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(f for f in report["findings"] if f["kind"] == kind)


def script_line(name: str, text: str) -> int:
    """The line of ``tests/scripts/<name>`` that contains ``text``."""
    lines = (SCRIPTS / name).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


@pytest.mark.slow  # re-runs the script in several processes
def test_safe_ops_replaces_the_log_of_a_softmax_and_is_verified(tmp_path: Path) -> None:
    report, _, stderr = gradwatch_run(tmp_path, "train_log_softmax.py", "--verify")
    finding = finding_of(report, "nonfinite")
    # The loss stays finite; backward() turns log's infinite derivative at 0 into NaN.
    assert finding["evidence"]["origin"] == "backward"
    assert "invalid_backward_op" in {c["id"] for c in finding["causes"]}
    best = finding["remedies"][0]
    assert best["id"] == "safe_ops"
    v = best["verified"]
    assert v["status"] == "better" and v["finding_gone"] is True
    # Without it the loss is NaN; with it the loss falls from the first step's level.
    assert v["loss_before"] is None and v["loss_after"] is not None
    assert math.isfinite(v["loss_after"]) and v["loss_after"] < 1.0
    line = script_line("train_log_softmax.py", "log_probs = torch.log(")
    assert any(c.startswith("computed in the safe form: log(softmax(x, dim)) -> "
                            f"log_softmax(x, dim) at train.py:{line} (") for c in v["changes"])
    # Skipping NaN steps keeps the weights finite, but the NaN losses stay: when it ran
    # side by side with safe_ops it says so, else it was not re-run once safe_ops repaired.
    guard = next(r["verified"] for r in finding["remedies"]
                 if r["id"] == "guard_nonfinite_loss")
    assert guard["finding_gone"] is False or (
        guard["status"] == "not_tried" and "safe_ops (nonfinite) repaired it first" in
        guard["note"])
    detect = next(r["verified"] for r in finding["remedies"] if r["id"] == "detect_anomaly")
    assert detect["status"] in ("diagnostic", "not_tried")
    assert "verified best: safe_ops, loss not finite -> " in stderr


@pytest.mark.slow  # re-runs the script in several processes
def test_holding_the_rate_repairs_a_scheduler_stepped_every_batch(tmp_path: Path) -> None:
    report, _, stderr = gradwatch_run(tmp_path, "train_steplr_per_batch.py", "--verify")
    assert report["run"]["steps"] == 256
    finding = finding_of(report, "loss_plateau")
    # A warning: the weights still move, by about 1e-5 of the start's updates.
    assert finding["severity"] == "warning"
    collapsed = next(c for c in finding["causes"] if c["id"] == "learning_rate_collapsed")
    assert "fell from 0.05 (step 0)" in collapsed["text"]
    ev = finding["evidence"]
    # StepLR(10, 0.5) per batch: below 1/100 of the start (lr_collapse) after 7 halvings.
    assert ev["lr_peak"] == pytest.approx(0.05) and ev["lr_collapsed_from_step"] == 70
    assert ev["lr_max_in_window"] <= 0.05 * 1e-3
    best = finding["remedies"][0]
    assert best["id"] == "hold_learning_rate" and best["params"]["floor"] == "0.05"
    v = best["verified"]
    assert v["status"] == "better" and v["finding_gone"] is True and v["improvement"] >= 2
    # The re-run stopped once settled, before the end of the user's 256 steps.
    assert v["settled"] == "repaired" and v["steps"] < 256
    assert report["verify"]["baseline"] == "first run" and report["verify"]["budget"] == 256
    assert "verified best: hold_learning_rate" in stderr


@pytest.mark.slow  # runs the script three times over
def test_fix_restarts_the_run_with_the_remedy_that_repairs_it(tmp_path: Path) -> None:
    report, stdout, stderr = gradwatch_run(tmp_path, "train_steplr_per_batch.py", "--fix")
    fix = report["fix"]
    assert fix["restarted"] is True and fix["kind"] == "loss_plateau"
    assert fix["remedy"]["id"] == "hold_learning_rate"
    assert 64 <= fix["found_at_step"] < 256  # the first check, then a quarter apart
    assert fix["remedy"]["verified"]["finding_gone"] is True
    # The report is of the restarted run: whole, repaired, with what was changed.
    assert report["run"]["steps"] == 256 and report["run"]["status"] == "completed"
    assert not [f for f in report["findings"] if f["severity"] in ("warning", "error")]
    assert min(v for v in report["series"]["lr"] if v is not None) == pytest.approx(0.05)
    assert report["applied"]["status"] == "applied"
    # The user sees the restarted run's own output; its last epoch trained well below the
    # collapsed run's 0.42.
    last = [line for line in stdout.splitlines() if line.startswith("epoch 7:")][-1]
    assert float(last.split()[3]) < 0.25
    assert "fixed: loss_plateau found after" in stderr


@pytest.mark.slow  # re-runs the script in several processes
def test_the_rate_ladder_reaches_a_rate_that_trains(tmp_path: Path) -> None:
    # Adam at lr 3: one decade lower (0.3) still leaves a constant guess, two decades train.
    report, _, stderr = gradwatch_run(tmp_path, "train_adam_rate.py", "--verify")
    finding = finding_of(report, "loss_divergence")
    rungs = {float(r["params"]["lr"]): r for r in finding["remedies"]
             if r["id"] == "lower_learning_rate"}
    first = rungs[0.3]["verified"]  # the rate the blow-up calls for: cut by one decade
    assert first["status"] in ("no_effect", "worse") and first["loss_after"] > 1.0
    best = finding["remedies"][0]
    assert best["id"] == "lower_learning_rate" and best["params"]["ladder"] is True
    assert float(best["params"]["lr"]) == pytest.approx(0.03)
    v = best["verified"]
    assert v["status"] == "better" and v["finding_gone"] is True and v["improvement"] >= 2
    # It trains: well below the 4-class chance level ln 4 = 1.39 by the step it settled at.
    assert v["settled"] == "repaired" and v["loss_after"] < 0.5 and v["steps"] < 300
    # The dead units' finding is answered by the same re-run, not by another.
    dying = finding_of(report, "dying_relu")["remedies"][0]
    assert dying["id"] == "lower_learning_rate" and dying["verified"] == v
    assert "verified best: lower_learning_rate, loss " in stderr


@pytest.mark.slow  # re-runs the script in several processes
def test_an_activation_swap_with_its_init_repairs_the_deep_sigmoid_net(tmp_path: Path) -> None:
    report, _, _ = gradwatch_run(tmp_path, "train_deep_sigmoid.py", "--verify",
                                 "--verify-remedies", "leaky_relu,kaiming_init,xavier_init")
    finding = finding_of(report, "vanishing_gradient")
    assert {"sigmoid_in_deep_stack", "deep_plain_stack"} <= {c["id"] for c in finding["causes"]}
    verified = {r["id"]: r["verified"] for r in finding["remedies"] if "verified" in r}
    # Neither alone: LeakyReLU under the small default init, Kaiming under the sigmoid.
    for single in ("leaky_relu", "kaiming_init"):
        assert verified[single]["status"] == "no_effect", single
        assert verified[single]["finding_gone"] is False, single
    pair = finding["remedies"][0]
    assert pair["id"] == "leaky_relu+kaiming_init"
    assert [r["id"] for r in finding["remedies"]].count("leaky_relu+kaiming_init") == 1
    v = pair["verified"]
    assert v["status"] == "better" and v["finding_gone"] is True and v["settled"] == "repaired"
    # Chance level is ln 3 = 1.10: the pair learns, the run without it does not.
    assert v["loss_before"] > 1.0 and v["loss_after"] < 0.75
    assert any("LeakyReLU" in c for c in v["changes"]) and any("Kaiming" in c or "kaiming" in c
                                                              for c in v["changes"])


def test_the_fix_line_names_the_step_of_the_pass_that_found_what_it_repaired() -> None:
    """--fix verified twice (steps 64 and 80); the remedy repairs what the second pass found:
    the summary says 80, not the first pass's 64."""
    from gradwatch.report.text import _fix_lines

    fix = {"restarted": True, "found_at_step": 64, "kinds": ["loss_divergence"],
           "passes": [{"step": 64, "kinds": ["vanishing_gradient"], "repaired": []},
                      {"step": 80, "kinds": ["loss_divergence"], "repaired": ["loss_divergence"]}],
           "remedy": {"id": "clip_grad_norm", "verified": {"loss_before": 10.0,
                                                           "loss_after": 0.1, "steps": 80}}}
    text = " ".join(_fix_lines(fix, 100))
    assert "fixed: loss_divergence found after 80 steps; clip_grad_norm repaired it" in text
    # a report without passes (an older one) still says the first pass's step
    assert "found after 64 steps" in " ".join(_fix_lines({**fix, "passes": []}, 100))
