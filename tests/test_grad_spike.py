"""Gradient spikes judged on the raw norms: a clipped AdamW run hit by one corrupted batch
(the loss is back at once, clipping hid the 1e5x norm from the update) is an explosion the run
survived, with the skip-step guard; the same run without the batch, and runs under a
``GradScaler`` (whose factor multiplies the loss and every raw gradient), report nothing and
record the loss and norms the model really had."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import only
from torch import nn

import gradwatch

BAD_STEP = 200


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g)
    return x, (x @ torch.randn(32, 1, generator=g)).tanh()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 1))


def _clipped_run(corrupt: bool, steps: int = 300, remedy: gradwatch.Remedy | None = None
                 ) -> tuple[gradwatch.Report, list[float], list[list[torch.Tensor]]]:
    x, y = _data()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    if remedy is not None:
        remedy.apply(model, opt)
    g = torch.Generator().manual_seed(1)
    losses, weights = [], []
    with gradwatch.watch(model, opt) as gw:
        for step in range(steps):
            idx = torch.randint(0, 2048, (64,), generator=g)
            xb = x[idx] * (300.0 if corrupt and step == BAD_STEP else 1.0)
            loss = nn.functional.mse_loss(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if step in (BAD_STEP - 1, BAD_STEP):
                weights.append([p.detach().clone() for p in model.parameters()])
    return gw.report(), losses, weights


@pytest.fixture(scope="module")
def corrupted() -> tuple[gradwatch.Report, list[float], list[list[torch.Tensor]]]:
    return _clipped_run(corrupt=True)


def test_a_spike_that_clipping_hides_is_an_explosion_with_its_step(corrupted) -> None:
    report, losses, _ = corrupted
    assert losses[BAD_STEP] > 1e3 * losses[BAD_STEP - 1]
    assert losses[BAD_STEP + 1] < 10 * losses[BAD_STEP - 1]  # back at once
    f = only(report, "exploding_gradient")
    assert f.severity == "warning"
    assert f.first_step == f.last_step == BAD_STEP
    assert f.evidence["grad_spike_step"] == BAD_STEP
    assert f.evidence["grad_spike_factor"] > 1e4
    assert "before any clipping" in f.summary
    assert f.remedies[0].id == "skip_spiking_steps"
    # The loss spike of the same step is info (an odd batch) and linked to the spike.
    spike = only(report, "loss_spike")
    assert spike.severity == "info"
    assert spike.evidence["root"] == {"kind": "exploding_gradient", "first_step": BAD_STEP}


def test_the_skip_step_guard_drops_exactly_the_spiking_update(corrupted) -> None:
    report, _, _ = corrupted
    guard = next(r for r in only(report, "exploding_gradient").remedies
                 if r.id == "skip_spiking_steps")
    _, _, (before, after) = _clipped_run(corrupt=True, remedy=guard)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    _, _, (before, after) = _clipped_run(corrupt=False, remedy=guard)
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_same_run_without_the_corrupted_batch_reports_nothing() -> None:
    report, _, _ = _clipped_run(corrupt=False)
    assert [f.kind for f in report.findings if f.severity != "info"] == []


def _scaled_run(init_scale: float, growth_interval: int, steps: int = 120
                ) -> tuple[gradwatch.Report, list[float], list[float]]:
    x, y = _data()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    g = torch.Generator().manual_seed(2)
    losses, norms = [], []
    with gradwatch.watch(model, opt) as gw:
        for _ in range(steps):
            idx = torch.randint(0, 2048, (64,), generator=g)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                       for p in model.parameters())))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return gw.report(), losses, norms


def test_a_grad_scalers_factor_is_taken_out_of_the_loss_and_the_raw_norms() -> None:
    # The factor doubles every 10 steps: the raw (scaled) norms would grow 2**12-fold.
    report, losses, norms = _scaled_run(init_scale=2.0 ** 16, growth_interval=10)
    series = report.series
    assert series["loss"] == pytest.approx(losses, rel=1e-6)
    recorded = [math.sqrt(sum(v[i] ** 2 for v in series["grad_norm"].values()))
                for i in range(len(losses))]
    assert recorded == pytest.approx(norms, rel=1e-4)
    assert [f.kind for f in report.findings if f.severity != "info"] == []
