"""loss_spike: a loss that jumps far above its recent window and comes back is reported with
its step, size and gradient norm; noisy small batches, schedules, gradient accumulation and
warm restarts are not spikes, and a loss that never comes back is a divergence instead."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import linear_stack
from torch import nn

import gradwatch
from gradwatch.history import History
from gradwatch.judge.context import Context
from gradwatch.judge.detectors import loss_spike
from gradwatch.thresholds import Thresholds

T = Thresholds()


def data(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()
    return x, y


def classify(steps: int = 600, batch: int = 32, lr: float = 1e-3, corrupt: int | None = None,
             sched: Callable[[torch.optim.Optimizer], object] | None = None,
             accumulate: int = 1, opt_cls: type = torch.optim.Adam,
             capacity: int = 2048) -> gradwatch.Report:
    """A small MLP classifier; ``corrupt``: at that step one batch arrives with every label
    shifted by one class (a shard read with the wrong label map)."""
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))
    opt = opt_cls(model.parameters(), lr=lr)
    scheduler = sched(opt) if sched else None
    g = torch.Generator().manual_seed(1)
    with gradwatch.watch(model, opt, capacity=capacity) as gw:
        for step in range(steps):
            opt.zero_grad()
            for _ in range(accumulate):
                i = torch.randint(0, len(x), (batch,), generator=g)
                yb = (y[i] + 1) % 3 if step == corrupt else y[i]
                loss = nn.functional.cross_entropy(model(x[i]), yb) / accumulate
                loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
    return gw.report()


def spikes(report: gradwatch.Report) -> list:
    return [f for f in report.findings if f.kind == "loss_spike"]


# ------------------------------------------------------------------------------ real runs
def test_a_batch_that_throws_the_model_off_is_a_spike_with_its_step_and_gradient_norm(
) -> None:
    # SGD at 0.2: the mislabeled batch's update derails the next steps too (10.5, 3.4, 0.54).
    report = classify(corrupt=400, opt_cls=torch.optim.SGD, lr=0.2)
    [f] = spikes(report)
    assert f.severity == "warning" and f.first_step == 400
    [spike] = f.evidence["spikes"]
    assert spike["step"] == 400 and spike["sigma"] >= T.spike_sigma
    assert spike["loss"] > 10 * spike["window_mean"]
    assert spike["recovered"] and spike["steps_to_recover"] >= T.spike_min_steps
    # The gradient jumped with the loss: named as the cause, and clipping is offered.
    assert spike["grad_norm"] >= 2 * spike["grad_norm_window_median"]
    assert "gradient_spike" in {c.id for c in f.causes}
    assert [r.id for r in f.remedies][:1] == ["clip_grad_norm"]
    assert f.evidence["batch_index"] is None
    assert "spiked 1 time(s); the largest at step 400" in f.summary


def test_a_spike_on_a_step_the_downsampled_series_dropped_is_found_exactly() -> None:
    # 64 rows for 600 steps: the series keeps every 16th step, not 401. The rows around
    # each outlier are kept exactly (gradwatch/excerpts.py): the spike, its window and its
    # recovery are the same as in the run whose series kept every step.
    full = classify(corrupt=401, opt_cls=torch.optim.SGD, lr=0.2)
    short = classify(corrupt=401, opt_cls=torch.optim.SGD, lr=0.2, capacity=64)
    assert 401 not in short.series["step"] and len(short.series["step"]) <= 65
    [a], [b] = spikes(full), spikes(short)
    assert b.first_step == 401 and b.severity == a.severity == "warning"
    [sa], [sb] = a.evidence["spikes"], b.evidence["spikes"]
    for key in ("step", "loss", "window_mean", "window_std", "grad_norm",
                "grad_norm_window_median", "recovered_step"):
        assert sb[key] == pytest.approx(sa[key]), key


def test_one_off_batch_that_does_not_derail_training_is_info() -> None:
    # Adam absorbs the same bad batch: only its own loss is off (5.6), the next is normal.
    report = classify(corrupt=400)
    [f] = spikes(report)
    assert f.severity == "info" and f.evidence["spikes"][0]["step"] == 400
    assert f.evidence["spikes"][0]["steps_to_recover"] == 1
    assert "brief outliers in the minibatch losses" in f.summary and not f.remedies
    assert report.problems == []


def test_noisy_small_batches_are_not_spikes() -> None:
    report = classify(steps=800, batch=4, lr=1e-2, opt_cls=torch.optim.SGD)
    assert spikes(report) == []


def test_gradient_accumulation_and_warm_up_with_cosine_are_not_spikes() -> None:
    steps, warm = 400, 40

    def cosine(opt: torch.optim.Optimizer) -> object:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5
                                                 * (1 + np.cos(np.pi * min(1.0, s / steps))))

    report = classify(steps=steps, batch=8, accumulate=4, sched=cosine)
    assert spikes(report) == [] and report.problems == []


def test_a_warm_restart_that_spikes_the_loss_is_the_schedules_doing() -> None:
    # SGDR with a high peak rate: each restart jumps the loss, by design.
    report = classify(steps=600, lr=0.5, opt_cls=torch.optim.SGD, sched=lambda opt: (
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=150)))
    for f in spikes(report):
        assert f.severity == "info", f.summary
        # A few steps after each restart (150, 300, 450): the raised rate takes a few
        # updates to throw the loss up.
        assert all(0 < s["step"] % 150 <= 25 and s["lr_raised"] for s in f.evidence["spikes"])
        assert "learning_rate_restart" in {c.id for c in f.causes} and not f.remedies


def test_a_loss_that_never_comes_back_is_a_divergence_not_a_spike() -> None:
    # Adam at lr 1 after 300 good steps (a rate typed wrong on resume): up and stays up.
    def jump(opt: torch.optim.Optimizer) -> object:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 300 else 1000.0)

    report = classify(steps=500, sched=jump)
    assert spikes(report) == []
    assert any(f.kind == "loss_divergence" for f in report.problems)


# ------------------------------------------------------------------------------ synthetic
def history(loss: np.ndarray) -> History:
    h = linear_stack(2, ["relu", "relu"])
    n = len(loss)
    grad = np.ones((n, 2))
    h.record_steps(np.arange(n), loss, np.full(n, 1e-3), grad, np.zeros_like(grad),
                   np.zeros(n))
    return h


def noisy(n: int = 300, seed: int = 0) -> np.ndarray:
    return 1.0 + 0.05 * np.random.default_rng(seed).standard_normal(n)


@pytest.mark.parametrize(("sigmas", "found"), [(5.5, False), (6.5, False), (12.0, True)])
def test_synthetic_sigma_and_rise_boundaries(sigmas: float, found: bool) -> None:
    loss = noisy()
    window = loss[150 - T.spike_window:150]
    # 6.5 sigma of a 5% noise is a 33% rise: below spike_min_rise, not a spike.
    loss[150:150 + T.spike_min_steps] = window.mean() + sigmas * window.std()
    got = [f for f in loss_spike.detect(Context(history(loss), T)) if f.severity == "warning"]
    assert bool(got) == found
    if found:
        assert got[0].evidence["spikes"][0]["step"] == 150


def test_synthetic_megatron_factor_and_too_short_runs() -> None:
    loss = noisy(200)
    loss[100:100 + T.spike_min_steps] = 11.0 * loss[:100].max()  # 10x the largest so far
    assert loss_spike.detect(Context(history(loss), T))[0].first_step == 100
    assert loss_spike.detect(Context(history(loss[:T.spike_window]), T)) == []


def test_synthetic_duration_boundary() -> None:
    loss = noisy()
    window = loss[150 - T.spike_window:150]
    for last, severity in ((T.spike_min_steps - 1, "info"), (T.spike_min_steps, "warning")):
        spiked = loss.copy()
        spiked[150:150 + last] = window.mean() + 12 * window.std()
        [f] = loss_spike.detect(Context(history(spiked), T))
        assert f.severity == severity and f.evidence["spikes"][0]["steps_to_recover"] == last
