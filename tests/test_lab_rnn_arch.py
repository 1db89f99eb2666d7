"""The lab's RNN experiments (seed 003) and architecture experiments (seeds 000/004): each
run over three seeds through the lab's runner, their verdicts, the numbers behind them,
gradwatch's findings on every arm, and the lab.json entries as strict JSON.

Each experiment runs here, every arm over the demo's seeds, with the demo's lengths
(the session fixture ``lab``: each run once per session); the lab.json entries are the
runner's (lab.runner.experiment_entry) for those runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import LAB_SEEDS, LabRuns

from gradwatch.lab import EXPERIMENTS, architectures, seed003
from gradwatch.lab.core import ArmResults, Verdict, n_steps
from gradwatch.lab.runner import LAB_SCHEMA, experiment_entry, lab_json

SEEDS = LAB_SEEDS
Run = tuple[ArmResults, Verdict, str]


def _run(lab: LabRuns, name: str) -> Run:
    """One experiment over SEEDS: the judge's input, its verdict, the experiment's name."""
    return (*lab.experiment(name), name)


@pytest.fixture(scope="module")
def clipping(lab: LabRuns) -> Run:
    return _run(lab, "rnn_clipping")


@pytest.fixture(scope="module")
def relu_tanh(lab: LabRuns) -> Run:
    return _run(lab, "rnn_relu_vs_tanh")


@pytest.fixture(scope="module")
def depth(lab: LabRuns) -> Run:
    return _run(lab, "deep_architectures")


@pytest.fixture(scope="module")
def recurrent(lab: LabRuns) -> Run:
    return _run(lab, "recurrent_architectures")


def _findings(r: ArmResults, arm: str, kind: str, axis: str | None = None) -> list[Any]:
    """Per run: the warning/error finding of ``kind`` on ``axis`` (time or depth), or None."""
    return [next((f for f in run.report.findings if f.kind == kind and f.severity != "info"
                  and f.evidence.get("axis") == axis), None) for run in r[arm]]


def test_experiments_are_registered_after_seed002() -> None:
    names = list(EXPERIMENTS)
    assert names.index("xavier_vs_kaiming") < names.index("rnn_clipping") < \
        names.index("rnn_relu_vs_tanh") < names.index("deep_architectures") < \
        names.index("recurrent_architectures")
    for exp in (*seed003.EXPERIMENTS, *architectures.EXPERIMENTS):
        assert EXPERIMENTS[exp.name] is exp
        assert any(a.role == "repair" for a in exp.arms)
        assert any(a.role == "seed" and a.claim for a in exp.arms)
        assert "no code" in exp.setup  # the seeds give none: the setup says what was chosen


# --------------------------------------------------------------------- seed 003 #1
def test_rnn_falls_off_a_cliff_without_clipping(clipping: Run) -> None:
    r, verdict, _ = clipping
    assert all(math.isnan(v) for v in r.losses("no_clip"))
    # It learned first: the explosion comes after a good stretch.
    assert all(b < 0.8 * seed003.CONSTANT_PREDICTION_LOSS
               for b in r.metric("no_clip", "best_loss"))
    growth = [run.metrics["max_grad_norm"] / run.metrics["early_grad_norm"]
              for run in r["no_clip"]]
    assert all(g > 1e6 for g in growth), growth
    for f in _findings(r, "no_clip", "exploding_gradient"):
        assert f is not None and f.severity == "error"
        assert "learning_rate_too_high" in {c.id for c in f.causes}
    assert all("nonfinite" in k for k in r.kinds("no_clip"))
    # The cliff, through time: on most steps the first timestep gets a vanishing share of
    # the gradient, at the spike orders of magnitude more (briefly: gradwatch's persistent
    # through-time explosion finding stays silent, and the reason says so).
    median = r.metric("no_clip", "ratio_first_to_last_timestep")
    peak = r.metric("no_clip", "max_ratio_first_to_last_timestep")
    assert all(m < 1e-6 for m in median), median
    assert all(p > 1e6 * m for p, m in zip(peak, median, strict=True)), (peak, median)
    assert _findings(r, "no_clip", "exploding_gradient", "time") == [None] * len(SEEDS)
    assert "cliff through time" in verdict.reason
    # The flip lasts a step or two (every step is measured), and the reason says how long.
    flipped = [sum(1 for m in run.report.series["through_time"].values()
                   for v in m["ratio_first_to_last_timestep"] if v is not None and v >= 1)
               for run in r["no_clip"]]
    assert 0 < max(flipped) <= 3, flipped
    assert f"for {n_steps([n for n in flipped if n])} the recurrent weights" in verdict.reason
    # The weights are thrown far from where they started before the NaN.
    assert all(g > 100 for g in r.metric("no_clip", "rnn_weight_growth"))
    assert verdict.verdict == "partly"
    assert "NaN/Inf on 3 of 3 seeds" in verdict.observed
    assert "learning_rate_too_high" in verdict.reason


def test_clipping_at_15_keeps_the_rnn_finite_but_does_not_make_it_learn(clipping: Run) -> None:
    r, verdict, _ = clipping
    final = r.losses("clip15")
    assert all(math.isfinite(v) for v in final), final
    best = r.metric("clip15", "best_loss")
    # Diverged: the loss ends far above both its best and a constant prediction.
    assert all(v > 10 * b and v > 10 * seed003.CONSTANT_PREDICTION_LOSS
               for v, b in zip(final, best, strict=True)), (final, best)
    assert all(n >= 30 for n in r.metric("clip15", "clipped_steps"))
    assert all(f is not None for f in _findings(r, "clip15", "loss_divergence"))
    assert "it learned on 0 of 3 seeds" in verdict.observed


def test_a_lower_lr_repairs_the_rnn_and_gradwatchs_clip_threshold_mostly_does(
        clipping: Run) -> None:
    r, verdict, _ = clipping
    low = r.losses("lr0.05")
    assert all(v < 0.15 * seed003.CONSTANT_PREDICTION_LOSS for v in low), low
    assert all(k <= {"vanishing_gradient"} for k in r.kinds("lr0.05")), r.kinds("lr0.05")
    # gradwatch's threshold (the median norm of the first 5 steps) is ~10x below 15.
    thresholds = r.metric("clip_early_median", "clip_threshold")
    assert all(0.3 < t < 3 for t in thresholds), thresholds
    learned = [v < 0.5 * seed003.CONSTANT_PREDICTION_LOSS for v in r.losses("clip_early_median")]
    assert sum(learned) >= 2, r.losses("clip_early_median")
    assert f"learns on {sum(learned)} of 3 seeds" in verdict.repair
    assert "lr 0.05 without clipping learns on 3 of 3 seeds" in verdict.repair


# --------------------------------------------------------------------- seed 003 #2
def test_relu_rnn_does_worse_than_tanh_on_every_seed(relu_tanh: Run) -> None:
    r, verdict, _ = relu_tanh
    tanh, relu = r.losses("tanh"), r.losses("relu")
    assert all(b > 3 * a for a, b in zip(tanh, relu, strict=True)), (tanh, relu)
    assert verdict.verdict == "holds"
    assert "ReLU is worse on 3 of 3 seeds" in verdict.observed
    # ReLU climbs back from its best loss; tanh stays near it.
    assert all(run.final_loss > 1.3 * run.metrics["best_loss"] for run in r["relu"])
    assert all(run.final_loss < 1.6 * run.metrics["best_loss"] for run in r["tanh"])
    # Larger gradient spikes, and a gradient through time that fades even faster.
    for name in ("max_grad_norm",):
        assert all(b > a for a, b in zip(r.metric("tanh", name), r.metric("relu", name),
                                         strict=True))
    assert all(b < 1e-3 * a for a, b in zip(r.metric("tanh", "ratio_first_to_last_timestep"),
                                            r.metric("relu", "ratio_first_to_last_timestep"),
                                            strict=True))
    # gradwatch: the ReLU RNN does not learn long dependencies (vanishing through time, a
    # problem); the tanh RNN's vanishing is only info since its loss fell well.
    assert all(f is not None for f in _findings(r, "relu", "vanishing_gradient", "time"))
    assert _findings(r, "tanh", "vanishing_gradient", "time") == [None] * len(SEEDS)


def test_lstm_trains_steadily_at_the_same_lr(relu_tanh: Run) -> None:
    r, verdict, _ = relu_tanh
    assert all(v < 0.5 * seed003.CONSTANT_PREDICTION_LOSS for v in r.losses("lstm"))
    assert all(run.final_loss <= 1.05 * run.metrics["best_loss"] for run in r["lstm"])
    assert all(g < 2 for g in r.metric("lstm", "max_grad_norm"))
    assert "an LSTM (sigmoid gates)" in verdict.repair


# --------------------------------------------------------------------- architectures: depth
def test_plain_deep_sigmoid_net_vanishes_batchnorm_and_residual_do_not(depth: Run) -> None:
    r, verdict, _ = depth
    plain = r.metric("plain", "grad_ratio_first_to_last")
    assert all(v < 1e-10 for v in plain), plain
    for arm in ("batchnorm", "residual"):
        ratios = r.metric(arm, "grad_ratio_first_to_last")
        assert all(0.03 < v < 3 for v in ratios), (arm, ratios)
        assert _findings(r, arm, "vanishing_gradient") == [None] * len(SEEDS)
    for f, own in zip(_findings(r, "plain", "vanishing_gradient"), plain, strict=True):
        assert f is not None and f.severity == "error"
        # gradwatch's ratio is the one the lab measures from its series
        assert math.isclose(f.evidence["grad_norm_ratio_first_to_last"], own, rel_tol=1e-6)
    assert verdict.verdict == "holds"
    # The plain net predicts a constant; BatchNorm learns the task.
    assert all(math.isclose(v, architectures.DEPTH_CONSTANT_LOSS, rel_tol=0.02)
               for v in r.losses("plain"))
    assert all(v < 0.2 * architectures.DEPTH_CONSTANT_LOSS for v in r.losses("batchnorm"))
    assert all(v < architectures.DEPTH_CONSTANT_LOSS for v in r.losses("residual"))
    assert "BatchNorm and residual connections keep" in verdict.repair


def test_the_three_depth_nets_have_equal_depth() -> None:
    for kind in ("plain", "batchnorm", "residual"):
        net = architectures.deep_net(kind)
        linears = [m for m in net.modules() if m.__class__.__name__ == "Linear"]
        assert len(linears) == architectures.DEPTH


# --------------------------------------------------------------------- architectures: time
def test_default_lstm_and_gru_vanish_like_the_rnn_only_forget_bias_1_helps(
        recurrent: Run) -> None:
    r, verdict, _ = recurrent
    metric = "grad_ratio_first_to_last_timestep"
    rnn = r.metric("rnn", metric)
    for arm in ("rnn", "lstm", "gru"):
        ratios = r.metric(arm, metric)
        assert all(v < 1e-6 for v in ratios), (arm, ratios)
        for f in _findings(r, arm, "vanishing_gradient", "time"):
            assert f is not None and f.evidence["sequence_length"] == architectures.LENGTH
    # Default-init gates buy at most a small factor over the plain RNN ...
    for arm in ("lstm", "gru"):
        assert not all(m >= 100 * v for m, v in zip(r.metric(arm, metric), rnn, strict=True))
    # ... a forget-gate bias of 1 buys orders of magnitude.
    forget1 = r.metric("lstm_forget1", metric)
    assert all(m >= 1e4 * v for m, v in zip(forget1, rnn, strict=True)), (forget1, rnn)
    assert all(1e-5 < v < 1e-1 for v in forget1)
    assert verdict.verdict == "partly"
    assert "LSTM(forget bias 1) keeps >= 100x" in verdict.reason


def test_rnn_arch_verdicts_are_computed_not_fixed(recurrent: Run, depth: Run) -> None:
    """Swap the measurements: the same judges then give other verdicts."""
    r, _, _ = recurrent
    swapped = ArmResults({"rnn": r["lstm_forget1"], "lstm": r["lstm_forget1"],
                          "gru": r["lstm_forget1"], "lstm_forget1": r["rnn"]})
    assert EXPERIMENTS["recurrent_architectures"].judge(swapped).verdict == "does not hold"
    d, _, _ = depth
    only_bn = ArmResults({"plain": d["plain"], "batchnorm": d["batchnorm"],
                          "residual": d["plain"]})
    assert EXPERIMENTS["deep_architectures"].judge(only_bn).verdict == "partly"


# --------------------------------------------------------------------- lab.json entries
def _no_constant(token: str) -> None:
    raise AssertionError(f"lab.json is not strict JSON: it holds {token}")


def test_lab_entries_are_strict_json_with_numbers_per_seed(
        tmp_path: Path, clipping: Run, relu_tanh: Run, depth: Run, recurrent: Run) -> None:
    """The runner's lab.json entries for these runs, in lab.json's text as run_lab writes
    it, and the reports they point to."""
    lab = {"schema": LAB_SCHEMA, "seeds": list(SEEDS), "experiments": [
        experiment_entry(EXPERIMENTS[name], r, SEEDS, tmp_path)
        for r, _, name in (clipping, relu_tanh, depth, recurrent)]}
    lab = json.loads(lab_json(lab), parse_constant=_no_constant)  # NaN, Infinity: not JSON
    entries = {e["name"]: e for e in lab["experiments"]}
    for _, verdict, name in (clipping, relu_tanh, depth, recurrent):
        data = entries[name]
        assert data["verdict"] == verdict.verdict
        assert data["observed"] == verdict.observed
        for arm in data["arms"]:
            assert [run["seed"] for run in arm["runs"]] == list(SEEDS)
            assert arm["description"]
            for run in arm["runs"]:
                assert (tmp_path / run["report_json"]).is_file()
                assert (tmp_path / run["report_html"]).is_file()
    arms = {a["name"]: a for a in entries["rnn_clipping"]["arms"]}
    assert [run["final_loss"] for run in arms["no_clip"]["runs"]] == [None] * len(SEEDS)
    assert arms["clip15"]["summary"]["clipped_steps"]["min"] >= 30
