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

import numpy as np
import pytest
import torch
from conftest import LAB_SEEDS, LabRuns

from gradwatch.lab import EXPERIMENTS, architectures, recurrent, seed003
from gradwatch.lab.core import ArmResults, Verdict, n_steps, spread
from gradwatch.lab.names import metric_label
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
def recurrent_runs(lab: LabRuns) -> Run:
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
    for exp in (*seed003.EXPERIMENTS, *architectures.EXPERIMENTS, *recurrent.EXPERIMENTS):
        assert EXPERIMENTS[exp.name] is exp
        assert any(a.role == "repair" for a in exp.arms)
        assert any(a.role == "seed" and a.claim for a in exp.arms)
        assert "no code" in exp.setup  # the seeds give none: the setup says what was chosen


# --------------------------------------------------------------------- seed 003 #1
def test_rnn_falls_off_a_cliff_without_clipping(clipping: Run) -> None:
    r, verdict, _ = clipping
    assert all(math.isnan(v) for v in r.losses("no_clip"))
    # It learned first: the explosion comes after a good stretch.
    assert all(b < 0.8 * seed003.constant_prediction_loss()
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
    assert all(v > 10 * b and v > 10 * seed003.constant_prediction_loss()
               for v, b in zip(final, best, strict=True)), (final, best)
    assert all(n >= 30 for n in r.metric("clip15", "clipped_steps"))
    assert all(f is not None for f in _findings(r, "clip15", "loss_divergence"))
    assert "it learned on 0 of 3 seeds" in verdict.observed


def test_a_lower_lr_repairs_the_rnn_and_gradwatchs_clip_threshold_mostly_does(
        clipping: Run) -> None:
    r, verdict, _ = clipping
    low = r.losses("lr0.05")
    assert all(v < 0.15 * seed003.constant_prediction_loss() for v in low), low
    assert all(k <= {"vanishing_gradient"} for k in r.kinds("lr0.05")), r.kinds("lr0.05")
    # gradwatch's threshold (the median norm of the first 5 steps) is ~10x below 15.
    thresholds = r.metric("clip_early_median", "clip_threshold")
    assert all(0.3 < t < 3 for t in thresholds), thresholds
    learned = [v < 0.5 * seed003.constant_prediction_loss() for v in r.losses("clip_early_median")]
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
    assert all(v < 0.5 * seed003.constant_prediction_loss() for v in r.losses("lstm"))
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
    assert all(math.isclose(v, architectures.depth_constant_loss(), rel_tol=0.02)
               for v in r.losses("plain"))
    assert all(v < 0.2 * architectures.depth_constant_loss() for v in r.losses("batchnorm"))
    assert all(v < architectures.depth_constant_loss() for v in r.losses("residual"))
    assert "BatchNorm and residual connections keep" in verdict.repair


def test_the_three_depth_nets_have_equal_depth() -> None:
    for kind in ("plain", "batchnorm", "residual"):
        net = architectures.deep_net(kind)
        linears = [m for m in net.modules() if m.__class__.__name__ == "Linear"]
        assert len(linears) == architectures.DEPTH


# --------------------------------------------------------------------- architectures: time
GATED = ("lstm", "gru", "lstm_forget1")
RATIO = "grad_ratio_first_to_last_timestep"


def test_the_recall_task_is_judged_on_held_out_long_lags() -> None:
    """Training sequences have the marker anywhere; the held-out ones are other sequences
    (generator seeds of their own) with the marker 30-34 or 0-4 steps back."""
    x, y = recurrent.recall_data()
    assert x.shape == (recurrent.TRAIN_SEQUENCES, recurrent.LENGTH, 2)
    lags = recurrent.LENGTH - 1 - x[:, :, 1].argmax(dim=1)
    assert int(lags.min()) == 0 and int(lags.max()) == recurrent.LENGTH - 1
    assert (x[:, :, 1].sum(dim=1) == 1).all()
    assert torch.equal(y, x[torch.arange(len(x)), x[:, :, 1].argmax(dim=1), 0])
    for window in (recurrent.LONG, recurrent.SHORT):
        xt, _ = recurrent.held_out(window)
        lags = recurrent.LENGTH - 1 - xt[:, :, 1].argmax(dim=1)
        assert window[0] <= int(lags.min()) and int(lags.max()) <= window[1]
        # none of them is a training sequence
        assert torch.cdist(xt[:, :, 0], x[:, :, 0]).min() > 1.0
        assert math.isclose(recurrent.constant_loss(window), 1.0, abs_tol=0.15)
    for key, window in (("val_loss_long", recurrent.LONG), ("val_loss_short", recurrent.SHORT)):
        assert f"{window[0]}-{window[1]} steps back" in metric_label(key)


def test_gated_nets_learn_the_long_recall_on_held_out_data_the_rnn_does_not(
        recurrent_runs: Run) -> None:
    r, verdict, _ = recurrent_runs
    constant = recurrent.constant_loss(recurrent.LONG)
    for arm in GATED:
        held_out = r.metric(arm, "val_loss_long")
        assert all(v < 0.1 * constant for v in held_out), (arm, held_out)
        # the learning curve: every step's training loss, falling far below its start
        for run in r[arm]:
            assert len(run.losses) == recurrent.STEPS
            assert np.mean(run.losses[-25:]) < 0.1 * np.mean(run.losses[:25]), arm
    rnn = r.metric("rnn", "val_loss_long")
    assert all(v > 0.9 * constant for v in rnn), rnn
    assert all(np.mean(run.losses[-25:]) > 0.7 * constant for run in r["rnn"])
    assert verdict.verdict == "holds"
    assert f"RNN {spread(rnn, 3)}" in verdict.observed
    assert "RNN on 0 of 3 seeds, LSTM on 3 of 3 seeds, GRU on 3 of 3 seeds" in verdict.observed
    assert "learn the 30-step recall on every seed in 300 steps" in verdict.repair


def test_the_rnn_gradient_vanishes_through_time_the_gated_nets_learn_to_keep_it(
        recurrent_runs: Run) -> None:
    r, verdict, _ = recurrent_runs
    rnn = r.metric("rnn", RATIO)
    assert all(v < 1e-5 for v in rnn), rnn  # gradwatch's limit is 1e-3
    assert all(v < 1e-3 for v in r.metric("rnn", "timestep_ratio_at_end"))
    # At step 0 the default-init gates vanish like the RNN; a forget bias of 1 does not ...
    for arm in ("rnn", "lstm", "gru"):
        start = r.metric(arm, "timestep_ratio_at_step0")
        assert all(v < 1e-5 for v in start), (arm, start)
    forget1 = r.metric("lstm_forget1", "timestep_ratio_at_step0")
    assert all(f > 100 * d for f, d in zip(forget1, r.metric("lstm", "timestep_ratio_at_step0"),
                                           strict=True))
    # ... and by the end every gated net passes the first timestep a real share.
    for arm in GATED:
        end = r.metric(arm, "timestep_ratio_at_end")
        assert all(v > 1e-2 for v in end), (arm, end)
        assert _findings(r, arm, "vanishing_gradient", "time") == [None] * len(SEEDS)
    for f in _findings(r, "rnn", "vanishing_gradient", "time"):
        assert f is None or f.evidence["sequence_length"] == recurrent.LENGTH
    assert f"median over the run: RNN {spread(rnn, 2)}" in verdict.observed
    assert "at step 0 the first timestep gets less than 0.001 of the last one's gradient in " \
        "RNN, LSTM, GRU" in verdict.reason
    assert f"RNN {spread(r.metric('rnn', 'timestep_ratio_at_step0'), 2)}" in verdict.reason
    assert "LSTM, GRU and LSTM(forget bias 1) raise the ratio over 100x" in verdict.reason
    assert f"the RNN ends at {spread(r.metric('rnn', 'timestep_ratio_at_end'), 2)}" \
        in verdict.reason
    # the control: the RNN fails even the short lags, and the reason says so with its number
    short = r.metric("rnn", "val_loss_short")
    assert all(v > 0.5 * recurrent.constant_loss(recurrent.SHORT) for v in short), short
    assert f"does not learn even the short lags (0-4 steps back: held-out loss " \
        f"{spread(short, 2)}" in verdict.reason


def test_rnn_arch_verdicts_are_computed_not_fixed(recurrent_runs: Run, depth: Run) -> None:
    """Swap the measurements: the same judges then give other verdicts and texts."""
    r, _, _ = recurrent_runs
    judge = EXPERIMENTS["recurrent_architectures"].judge
    swapped = ArmResults({"rnn": r["lstm_forget1"], "lstm": r["rnn"], "gru": r["rnn"],
                          "lstm_forget1": r["rnn"]})
    assert judge(swapped).verdict == "does not hold"
    assert "no gated net learned the 30-step recall on every seed" in judge(swapped).repair
    only_forget1 = ArmResults({"rnn": r["rnn"], "lstm": r["rnn"], "gru": r["rnn"],
                               "lstm_forget1": r["lstm_forget1"]})
    verdict = judge(only_forget1)
    assert verdict.verdict == "partly"
    assert "LSTM(forget bias 1) learns the 30-step recall" in verdict.repair
    d, _, _ = depth
    only_bn = ArmResults({"plain": d["plain"], "batchnorm": d["batchnorm"],
                          "residual": d["plain"]})
    assert EXPERIMENTS["deep_architectures"].judge(only_bn).verdict == "partly"


# --------------------------------------------------------------------- lab.json entries
def _no_constant(token: str) -> None:
    raise AssertionError(f"lab.json is not strict JSON: it holds {token}")


def test_lab_entries_are_strict_json_with_numbers_per_seed(
        tmp_path: Path, clipping: Run, relu_tanh: Run, depth: Run,
        recurrent_runs: Run) -> None:
    """The runner's lab.json entries for these runs, in lab.json's text as run_lab writes
    it, and the reports they point to."""
    lab = {"schema": LAB_SCHEMA, "seeds": list(SEEDS), "experiments": [
        experiment_entry(EXPERIMENTS[name], r, SEEDS, tmp_path)
        for r, _, name in (clipping, relu_tanh, depth, recurrent_runs)]}
    lab = json.loads(lab_json(lab), parse_constant=_no_constant)  # NaN, Infinity: not JSON
    entries = {e["name"]: e for e in lab["experiments"]}
    for _, verdict, name in (clipping, relu_tanh, depth, recurrent_runs):
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


def test_the_recurrent_screen_shows_the_gradient_through_time_of_every_arm(
        tmp_path: Path, recurrent_runs: Run, depth: Run) -> None:
    """The claim is about gradients through time: the first screen plots every arm's
    first-to-last timestep ratio (the runs' own numbers), beside the loss; a depth
    experiment keeps its two gradient-flow heatmaps."""
    from gradwatch.lab.page import render_lab_page

    entries = [experiment_entry(EXPERIMENTS[name], r, SEEDS, tmp_path)
               for r, _, name in (recurrent_runs, depth)]
    page = render_lab_page({"schema": LAB_SCHEMA, "seeds": list(SEEDS),
                            "experiments": json.loads(lab_json(
                                {"experiments": entries}))["experiments"]})
    sections = page.split("<section class='exp'")[1:]
    recurrent = next(s for s in sections if "recurrent_architectures" in s)
    first = recurrent.split("<details>")[0]
    assert first.count("<svg") == 3  # loss, through time, the seed arm's gradient flow
    chart = first[first.index("Gradient reaching the first timestep"):]
    chart = chart[: chart.index("</svg>")]
    for arm in ("rnn", "lstm", "gru", "lstm_forget1"):
        assert f">{arm}<" in chart, arm
    assert "log scale" in chart
    run = entries[0]["arms"][0]["runs"][0]
    ratios = [v for v in run["through_time"]["ratio"] if v is not None]
    r, _, _ = recurrent_runs
    series = r["rnn"][0].report.series["through_time"]["rnn"]["ratio_first_to_last_timestep"]
    assert ratios == [v for v in series if v is not None]
    depth_first = next(s for s in sections if "deep_architectures" in s).split("<details>")[0]
    assert depth_first.count("<svg") == 3  # loss, the seed arm's and the repair's flow
    assert depth_first.count("(repair): gradient flow, seed") >= 1
    assert "Gradient reaching the first timestep" not in depth_first
