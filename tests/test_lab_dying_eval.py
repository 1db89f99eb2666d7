"""The lab's dying-ReLU (seed 000) and eval-mode (seed 001) experiments: run over three
seeds, their verdicts and the numbers behind them, and gradwatch's findings on every arm.

Each experiment runs here, every arm over the demo's seeds, with the demo's lengths
(the session fixture ``lab``: each run once per session).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import LAB_SEEDS, LabRuns

from gradwatch.findings import jsonable
from gradwatch.lab import EXPERIMENTS, seed000, seed001
from gradwatch.lab.core import ArmResults, Verdict
from gradwatch.lab.runner import Progress, run_experiment

SEEDS = LAB_SEEDS


@pytest.fixture(scope="module")
def high_lr(lab: LabRuns) -> tuple[ArmResults, Verdict]:
    return lab.experiment("dying_relu_high_lr")


@pytest.fixture(scope="module")
def negative_bias(lab: LabRuns) -> tuple[ArmResults, Verdict]:
    return lab.experiment("dying_relu_negative_bias")


@pytest.fixture(scope="module")
def eval_mode(lab: LabRuns) -> tuple[ArmResults, Verdict]:
    return lab.experiment("eval_mode")


def _severities(r: ArmResults, arm: str, kind: str) -> list[str | None]:
    return [next((f.severity for f in run.report.findings if f.kind == kind), None)
            for run in r[arm]]


def test_experiments_are_registered_after_seed002() -> None:
    names = list(EXPERIMENTS)
    assert names.index("xavier_vs_kaiming") < names.index("dying_relu_high_lr") < \
        names.index("dying_relu_negative_bias") < names.index("eval_mode")
    for exp in (*seed000.EXPERIMENTS, *seed001.EXPERIMENTS):
        assert EXPERIMENTS[exp.name] is exp
        assert any(a.role == "repair" for a in exp.arms)


# --------------------------------------------------------------------- high learning rate
def test_high_lr_kills_relu_units_and_only_the_lower_lr_repairs_it(high_lr) -> None:
    r, verdict = high_lr
    assert verdict.verdict == "holds"
    dead, ctrl_dead = r.metric("relu_lr0.3", "dead_fraction"), \
        r.metric("relu_lr0.01", "dead_fraction")
    assert all(d >= 0.75 for d in dead), dead
    assert all(d <= 0.2 for d in ctrl_dead), ctrl_dead
    high, ctrl = r.losses("relu_lr0.3"), r.losses("relu_lr0.01")
    assert all(h > 10 * c for h, c in zip(high, ctrl, strict=True)), (high, ctrl)
    # Almost no unit comes back once it has been dead for a while.
    assert all(v <= 2 for v in r.metric("relu_lr0.3", "revived_units"))
    # gradwatch's dead fraction is the direct count; it flags the high-lr runs only.
    for arm in ("relu_lr0.3", "relu_lr0.01", "relu_bias+0.1_lr0.3"):
        for own, gw in zip(r.metric(arm, "dead_fraction"),
                           r.metric(arm, "gradwatch_dead_fraction"), strict=True):
            assert abs(own - gw) <= 0.1, (arm, own, gw)
    # Most units die in the first steps; the few left keep the loss falling (at 10x the
    # control's), so the dead units are a warning: capacity lost, training not stopped.
    assert _severities(r, "relu_lr0.3", "dying_relu") == ["warning"] * len(SEEDS)
    dying = [f for run in r["relu_lr0.3"] for f in run.report.findings
             if f.kind == "dying_relu"]
    assert dying and all(f.evidence["still_learning"] is not None for f in dying)
    assert all(k is None or k == "info" for k in _severities(r, "relu_lr0.01", "dying_relu"))
    f = r.finding("relu_lr0.3", "dying_relu")
    assert f.evidence["site"] == "3" and f.evidence["dead_since_step"] <= 8
    assert "learning_rate_too_high" in {c.id for c in f.causes}
    # The ReLU-family swaps have no dead units (no site to count) and LeakyReLU beats the
    # dead net; a positive bias init at the same lr does not stop the units dying.
    for arm in ("leaky_relu_lr0.3", "prelu_lr0.3", "elu_lr0.3"):
        assert all(math.isnan(v) for v in r.metric(arm, "dead_fraction"))
        assert "dying_relu" not in set().union(*r.kinds(arm))
    assert all(lk < h for lk, h in zip(r.losses("leaky_relu_lr0.3"), high, strict=True))
    assert "leaky_relu_lr0.3 improves on the ReLU net" in verdict.repair
    assert all(lk > 2 * c for lk, c in zip(r.losses("leaky_relu_lr0.3"), ctrl, strict=True))
    assert all(d >= 0.5 for d in r.metric("relu_bias+0.1_lr0.3", "dead_fraction"))
    assert "the lower learning rate (lr 0.01) removes the cause" in verdict.repair
    assert re.search(r"relu_bias\+0\.1_lr0\.3 (does|do) not help", verdict.repair)
    assert "%" in verdict.observed and "over 3 seeds" in verdict.observed


# --------------------------------------------------------------------- negative bias
def test_negative_bias_kills_the_layer_and_a_lower_lr_cannot_revive_it(negative_bias) -> None:
    r, verdict = negative_bias
    assert verdict.verdict == "holds"
    assert r.metric("relu_bias-3", "dead_fraction") == [1.0] * len(SEEDS)
    for loss in r.losses("relu_bias-3") + r.losses("relu_bias-3_lr0.001"):
        assert abs(loss - seed000.constant_prediction_loss()) < 0.01 * \
            seed000.constant_prediction_loss()
    assert r.metric("relu_bias-3_lr0.001", "dead_fraction") == [1.0] * len(SEEDS)
    assert r.metric("relu_bias-3", "revived_units") == [0] * len(SEEDS)
    assert all(v < 0.1 for v in r.losses("relu_bias+0.1"))
    for arm in ("leaky_relu_bias-3", "prelu_bias-3", "elu_bias-3"):
        assert all(v < 0.5 for v in r.losses(arm)), arm
        assert all(v < 1 for v in r.metric(arm, "negative_fraction")), arm  # units revived
    assert all(v <= 0.05 for v in r.metric("elu_bias-3", "negative_fraction"))
    f = r.finding("relu_bias-3", "dying_relu")
    assert f.severity == "error"
    ev = f.evidence.get("sites", [f.evidence])[0]
    assert ev["dead_fraction"] == 1.0 and ev["dead_since_step"] == 0
    assert ev["bias_dead_mean"] == pytest.approx(-3.0)
    assert f.causes[0].id == "large_negative_bias"
    assert "every unit is <= 0 for every sample from step 0," in verdict.reason
    assert "relu_bias-3_lr0.001 does not help" in verdict.repair
    assert "loss of predicting the mean of y" in verdict.observed


# --------------------------------------------------------------------- eval mode
def test_forgetting_eval_makes_outputs_random_and_the_repair_is_exact(eval_mode) -> None:
    r, verdict = eval_mode
    # Everything measured holds except the blow-up, which training-mode BatchNorm cannot do.
    assert verdict.verdict == "partly"
    assert "the blow-up does not happen" in verdict.observed
    bad, good, graph = "no_grad_only", "eval_and_no_grad", "eval_only"
    assert all(v > 0.2 for v in r.metric(bad, "output_rel_diff"))
    assert r.metric(good, "output_rel_diff") == [0.0] * len(SEEDS)
    assert r.metric(graph, "output_rel_diff") == [0.0] * len(SEEDS)
    for acc, ref in zip(r.metric(bad, "val_accuracy"), r.metric(bad, "eval_accuracy"),
                        strict=True):
        assert acc < ref - 0.02, (acc, ref)
    assert all(hi > lo for hi, lo in zip(r.metric(bad, "val_accuracy_max"),
                                         r.metric(bad, "val_accuracy_min"), strict=True))
    # BatchNorm: batch-dependent outputs, statistics rewritten by evaluating, batch of 1 refused.
    assert all(v > 0.05 for v in r.metric(bad, "bn_batch_order_rel_diff"))
    assert all(v > 0.5 for v in r.metric(bad, "batch2_bn_rel_diff_from_eval"))
    assert all(v > 0 for v in r.metric(bad, "bn_running_stats_change"))
    assert r.metric(good, "bn_running_stats_change") == [0.0] * len(SEEDS)
    assert r.metric(bad, "batch1_error") == [1.0] * len(SEEDS)
    assert r.metric(good, "batch1_error") == [0.0] * len(SEEDS)
    assert all(a <= b for a, b in zip(r.metric(bad, "batch2_max_abs_output"),
                                      r.metric(bad, "eval_max_abs_output"), strict=True))
    # eval() without no_grad: the same outputs, but a graph is kept.
    assert r.metric(graph, "rel_diff_from_eval") == [0.0] * len(SEEDS)
    assert r.metric(good, "saved_bytes") == [0.0] * len(SEEDS)
    assert all(v > 100_000 for v in r.metric(graph, "saved_bytes"))


def test_gradwatch_finds_the_forgotten_eval_and_nothing_on_the_repairs(eval_mode) -> None:
    r, verdict = eval_mode
    assert _severities(r, "no_grad_only", "eval_mode") == ["warning"] * len(SEEDS)
    for arm in ("eval_and_no_grad", "eval_only"):
        assert r.kinds(arm, "info", "warning", "error") == [set()] * len(SEEDS), arm
    f = r.finding("no_grad_only", "eval_mode")
    assert f.layers == ["1", "3", "5", "7"]
    assert f.evidence["no_grad_forwards_in_training_mode"] == \
        seed001.EPOCHS * seed001.N_VAL // seed001.VAL_BATCH
    assert f.evidence["output_rel_diff"] > 0.2 and f.evidence["batchnorm_stats_updated"]
    assert [c.id for c in f.causes] == ["dropout_active_in_eval",
                                        "batchnorm_stats_updated_by_eval"]
    assert "gradwatch reports eval_mode on 3 of 3 seeds" in verdict.reason


def test_runner_writes_the_eval_mode_entry_as_strict_json(tmp_path: Path) -> None:
    exp = EXPERIMENTS["eval_mode"]
    entry = run_experiment(exp, [0], tmp_path, Progress(0, enabled=False))
    text = json.dumps(jsonable(entry), allow_nan=False)
    data = json.loads(text)
    arms = {a["name"]: a for a in data["arms"]}
    assert list(arms) == ["no_grad_only", "eval_and_no_grad", "eval_only"]
    assert arms["no_grad_only"]["runs"][0]["metrics"]["gradwatch_eval_mode"] == 1.0
    assert arms["eval_only"]["summary"]["saved_bytes"]["median"] > 0
    assert (tmp_path / "eval_mode" / "no_grad_only-seed0.html").is_file()
    assert data["verdict"] in ("holds", "partly", "does not hold")


def test_the_dying_screen_shows_every_relu_arms_dead_units(
        tmp_path: Path, high_lr: tuple[ArmResults, Verdict]) -> None:
    """The claim is about dead units: the first screen plots each ReLU arm's largest dead
    fraction over the run (from its report), beside the loss; LeakyReLU/PReLU/ELU have none."""
    from gradwatch.lab.page import render_lab_page
    from gradwatch.lab.runner import LAB_SCHEMA, experiment_entry, lab_json

    r, _ = high_lr
    entry = experiment_entry(EXPERIMENTS["dying_relu_high_lr"], r, SEEDS, tmp_path)
    entry = json.loads(lab_json({"experiments": [entry]}))["experiments"][0]
    page = render_lab_page({"schema": LAB_SCHEMA, "seeds": list(SEEDS),
                            "experiments": [entry]})
    first = page.split("<section class='exp'")[1].split("<details>")[0]
    assert first.count("<svg") == 3  # loss, dead units, the seed arm's gradient flow
    chart = first[first.index("Dead ReLU units: the largest share in any layer"):]
    chart = chart[: chart.index("</svg>")]
    arms = {a["name"]: a for a in entry["arms"]}
    for name, arm in arms.items():
        has = all(run["dead_units"] for run in arm["runs"])
        assert has == name.startswith("relu"), name
        assert (f">{name}<" in chart) == has, name
    # each arm has one colour on both charts, also where the other arms have no curve
    def legend_color(svg: str, name: str) -> str:
        found = re.search(rf'stroke="(#[0-9a-fA-F]+)" stroke-width="2.5"[^>]*/>\s*<text'
                          rf'[^>]*>(?:<title>[^<]*</title>)?{re.escape(name)}<', svg)
        assert found, name
        return found.group(1)

    loss = first[: first.index("Dead ReLU units: the largest share")]
    for name in ("relu_lr0.3", "relu_lr0.01", "relu_bias+0.1_lr0.3"):
        assert legend_color(loss, name) == legend_color(chart, name), name
    # the seed arm's curve is its report's worst site at each measured step
    run, report = arms["relu_lr0.3"]["runs"][0], r["relu_lr0.3"][0].report
    sites = report.series["dead_fraction"].values()
    worst = [max(v[k] for v in sites if v[k] is not None)
             for k in range(len(report.series["site_step"]))]
    assert run["dead_units"]["fraction"] == worst and max(worst) > 0.5
