"""``gradwatch run --verify`` per failure kind: the verified top remedy measurably fixes it.

Each test copies a user-style training script from ``tests/scripts`` into its own folder,
runs ``python -m gradwatch run train.py ... --verify`` there in a subprocess, and reads the
JSON report: dead units from a -3 bias (``dying_relu``), a regression exploding on raw,
unscaled features (``exploding_gradient``, ``loss_divergence``), a tanh layer saturated by
the same features (``saturated_activation``), and a validation loop that forgets
``model.eval()`` (``eval_mode``). The stalled and the overflowing seed nets are in
``test_verify.py``.
"""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ran_until_settled

SCRIPTS = Path(__file__).parent / "scripts"
TIMEOUT_S = 300


def verify_run(tmp_path: Path, name: str, *args: str) -> tuple[dict[str, Any], str, Path]:
    """Run ``tests/scripts/<name>``, copied to tmp_path, under ``gradwatch run --verify``."""
    script = tmp_path / "train.py"
    script.write_bytes((SCRIPTS / name).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "run", str(script), *args,
                           "--json", "report.json", "--verify"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "report.json").read_text()), proc.stderr, script


def finding_of(report: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(f for f in report["findings"] if f["kind"] == kind)


def verified(report: dict[str, Any], kind: str, remedy_id: str) -> dict[str, Any]:
    return next(r["verified"] for r in finding_of(report, kind)["remedies"]
                if r["id"] == remedy_id)


def assert_ranked(report: dict[str, Any]) -> None:
    """Every problem finding's verified remedies come ordered by measured effect: those that
    helped (better, or fixed with the loss unchanged) first, the finding gone before not,
    then the one settled as repaired in fewer steps, then by improvement; the ones gradwatch
    could not run last."""
    rank = {"better": 0, "fixed": 0, "no_effect": 1, "worse": 2, "diagnostic": 3, "failed": 3,
            "not_applicable": 4, "not_finished": 5, "not_tried": 5}
    for finding in report["findings"]:
        if finding["severity"] == "info":
            continue
        ranked = [r["verified"] for r in finding["remedies"] if "verified" in r]
        statuses = [rank[v["status"]] for v in ranked]
        assert statuses == sorted(statuses), (finding["kind"], statuses)
        helped = [(not v["finding_gone"],
                   v["steps"] if v.get("settled") == "repaired" else math.inf,
                   -v["improvement"]) for v in ranked
                  if v["status"] in ("better", "fixed") and v["improvement"] is not None]
        assert helped == sorted(helped), finding["kind"]


def assert_untouched(tmp_path: Path, script: Path, name: str) -> None:
    """The user's script is unchanged and only the asked-for report was written beside it."""
    assert script.read_bytes() == (SCRIPTS / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "train.py"]


def script_data(name: str, maker: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data the script trains on, made by its own function with its own seed."""
    make = runpy.run_path(str(SCRIPTS / name))[maker]
    torch.manual_seed(0)
    return make(n)


@pytest.mark.slow  # re-runs the script in several processes
def test_positive_bias_revives_units_dead_from_a_negative_bias(tmp_path: Path) -> None:
    name = "train_dead_bias.py"
    report, stderr, script = verify_run(tmp_path, name, "--budget", "80", "--sparse-layers",
                                        "0,2")
    assert report["run"]["steps"] == 80 and report["verify"]["deterministic"] is True
    finding = finding_of(report, "dying_relu")
    # Both hidden layers' biases start at -3: the first kills every unit of the ReLU it
    # feeds, and the second dead layer behind it is reported with it, not again.
    assert finding["severity"] == "error"
    assert finding["evidence"]["site"] == "1" and finding["evidence"]["feeding_layer"] == "0"
    assert finding["evidence"]["dead_fraction"] == 1.0
    assert len([f for f in report["findings"] if f["kind"] == "dying_relu"]) == 1
    assert "large_negative_bias" in {c["id"] for c in finding["causes"]}
    best = finding["remedies"][0]
    assert best["id"] in ("positive_bias_init", "leaky_relu")
    # So the bias re-init resets both set biases: one alone would leave the net dead.
    assert best["id"] != "positive_bias_init" or best["params"]["layers"] == ["0", "2"]
    v = best["verified"]
    assert v["status"] == "better" and v["finding_gone"] is True and ran_until_settled(v, 80)
    # Without a remedy the net predicts a constant: its loss is the target's variance once
    # the constant is learnt, and above it before (the re-run may settle before that).
    _, y = script_data(name, "make_data", 512)
    var = float(y.var(unbiased=False))
    assert var * 0.99 <= v["loss_before"] <= var * 1.1
    assert v["loss_after"] < v["loss_before"] / 2
    assert v["improvement"] == pytest.approx(v["loss_before"] / v["loss_after"])
    assert v["changes"], "the re-run says what it changed"
    # LeakyReLU(0.01) alone leaves units 3 below zero with a slope of 0.01: within the
    # budget the loss does not move, so it cannot be the measured best.
    leaky = verified(report, "dying_relu", "leaky_relu")
    assert leaky["loss_after"] > 0.9 * leaky["loss_before"]
    # The dying_relu detector no longer sees ReLUs once they are LeakyReLUs, but a finding
    # that goes while the loss stays is no fix here (only for eval_mode).
    assert leaky["status"] == "no_effect"
    # Every problem's best remedy helps and makes it go (the vanishing gradient that the
    # dead layer causes too).
    for f in report["findings"]:
        if f["severity"] != "info":
            top = f["remedies"][0]["verified"]
            assert top["status"] == "better" and top["finding_gone"] is True, f["kind"]
    assert_ranked(report)
    assert f"verified best: {best['id']}, loss {v['loss_before']:.3g} -> " in stderr
    assert_untouched(tmp_path, script, name)


@pytest.mark.slow  # re-runs the script in several processes
def test_standardising_raw_features_fixes_the_exploding_regression(tmp_path: Path) -> None:
    name = "train_unscaled.py"
    # Every remedy the exploding gradient's finding offers that gradwatch can apply, and the
    # lower learning rate; the dead units' re-inits are left out to keep the pass short.
    report, stderr, script = verify_run(
        tmp_path, name, "--budget", "60",
        "--verify-remedies", "standardize_inputs,lower_learning_rate,clip_grad_norm")
    assert report["run"]["steps"] == 80 and report["verify"]["deterministic"] is True
    finding = finding_of(report, "exploding_gradient")
    assert finding["severity"] in ("warning", "error")
    assert "unscaled_inputs" in {c["id"] for c in finding["causes"]}
    offered = {r["id"] for r in finding["remedies"]}
    # No clipping: the very first gradient is already huge against the weights, and a
    # threshold measured on it would change nothing.
    assert "standardize_inputs" in offered and "clip_grad_norm" not in offered
    best = finding["remedies"][0]
    assert best["id"] in ("standardize_inputs", "lower_learning_rate")
    v = best["verified"]
    assert v["status"] == "better" and v["finding_gone"] is True and ran_until_settled(v, 60)
    x, y = script_data(name, "make_houses", 1024)
    # Without a remedy the loss blows up by orders of magnitude over the prices' variance
    # and stays there; with it the model fits well below that variance.
    assert v["loss_before"] is not None and v["loss_before"] > 1e4
    assert v["loss_after"] is not None and math.isfinite(v["loss_after"])
    assert v["loss_after"] < 0.5 * float(y.var(unbiased=False))
    assert v["improvement"] == pytest.approx(v["loss_before"] / v["loss_after"])
    if best["id"] == "standardize_inputs":
        # Measured on the run: the raw features' overall mean and spread.
        assert float(best["params"]["mean"]) == pytest.approx(float(x.mean()), rel=0.1)
        assert float(best["params"]["std"]) == pytest.approx(float(x.std()), rel=0.1)
    # Remedies not asked for were not re-run.
    for f in report["findings"]:
        for r in f["remedies"]:
            if "verified" in r:
                assert set(r["id"].split("+")) <= {"standardize_inputs",
                                                   "lower_learning_rate", "clip_grad_norm"}
    # The blow-up's own updates size the lower rate now, so it is offered (cut one decade).
    divergence = finding_of(report, "loss_divergence")
    assert {"standardize_inputs", "lower_learning_rate"} <= {r["id"] for r in
                                                            divergence["remedies"]}
    assert_ranked(report)
    assert f"verified best: {best['id']}, loss " in stderr
    assert_untouched(tmp_path, script, name)


@pytest.mark.slow  # re-runs the script in several processes
def test_standardising_raw_features_revives_the_saturated_tanh_layer(tmp_path: Path) -> None:
    name = "train_unscaled.py"
    report, stderr, script = verify_run(tmp_path, name, "--act", "tanh")
    assert report["run"]["steps"] == 80 and report["verify"]["deterministic"] is True
    finding = finding_of(report, "saturated_activation")
    # Raw features of scale ~60 put the tanh right after the first layer at +-1.
    assert finding["severity"] == "error"
    assert finding["evidence"]["saturated_fraction"] > 0.9
    best = finding["remedies"][0]
    assert best["id"] == "standardize_inputs"
    v = best["verified"]
    assert v["status"] == "better" and v["finding_gone"] is True and ran_until_settled(v, 80)
    assert v["loss_after"] < v["loss_before"] / 2
    assert v["improvement"] == pytest.approx(v["loss_before"] / v["loss_after"])
    # Normalising after the first layer helps too, but settles later than fixing the inputs
    # (or leaves the finding): it is ranked after it, or was not re-run once the inputs'
    # fix repaired the finding.
    norm = verified(report, "saturated_activation", "batch_norm")
    assert norm["status"] in ("better", "not_tried")
    if norm["status"] == "better":
        assert not norm["finding_gone"] or norm["steps"] >= v["steps"]
    assert_ranked(report)
    assert "verified best: standardize_inputs, loss " in stderr
    assert_untouched(tmp_path, script, name)


@pytest.mark.slow  # re-runs the script in several processes
def test_eval_for_no_grad_forwards_fixes_the_forgotten_model_eval(tmp_path: Path) -> None:
    name = "train_forgot_eval.py"
    report, stderr, script = verify_run(tmp_path, name, "--epochs", "10")
    assert report["run"]["steps"] == 40 and report["verify"]["deterministic"] is True
    finding = finding_of(report, "eval_mode")
    assert finding["severity"] == "warning"
    best = finding["remedies"][0]
    assert best["id"] == "call_model_eval"
    v = best["verified"]
    # model.eval() changes the validation forwards, not training: the finding goes, and the
    # training loss stays about where it was (dropout draws other masks, nothing more).
    assert v["status"] in ("better", "fixed") and v["finding_gone"] is True
    assert ran_until_settled(v, 40) and v.get("finding_in_baseline", True) is True
    assert v["loss_before"] is not None and v["loss_after"] is not None
    assert v["improvement"] == pytest.approx(v["loss_before"] / v["loss_after"])
    assert v["improvement"] > 1 / 1.1
    assert any("eval mode" in c for c in v["changes"])
    # Re-estimating the BatchNorm statistics needs the training data: not run, ranked last.
    rest = [r for r in finding["remedies"] if r["id"] == "recompute_bn_statistics"]
    assert all(r["verified"]["status"] == "not_applicable" for r in rest)
    assert_ranked(report)
    assert "verified best: call_model_eval, loss " in stderr
    assert_untouched(tmp_path, script, name)
