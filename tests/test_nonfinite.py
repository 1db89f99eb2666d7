"""nonfinite: real runs that turn NaN/Inf at a known step (bad data, an undefined operation
forward or backward, an overflowing init, gradients that grew), and synthetic histories."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import deep_net, linear_stack, only, seed_data
from torch import nn

import gradwatch
from gradwatch.findings import Finding
from gradwatch.history import History
from gradwatch.judge.context import Context
from gradwatch.judge.detectors import nonfinite
from gradwatch.thresholds import Thresholds

T = Thresholds()



def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [1.0]]) + 0.1 * torch.randn(128, 1, generator=g)
    return x, y


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 1))


LossFn = Callable[[int, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train(loss_at: LossFn, steps: int = 30, lr: float = 0.05,
          model: nn.Module | None = None) -> dict[str, Any]:
    """SGD under watch; ``loss_at(step, model, x, y)`` builds each step's loss."""
    model = model or mlp()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grads_finite = [], []
    with gradwatch.watch(model, opt) as gw:
        for step in range(steps):
            opt.zero_grad()
            loss = loss_at(step, model, x, y)
            loss.backward()
            losses.append(loss.item())
            grads_finite.append(all(bool(torch.isfinite(p.grad).all())
                                    for p in model.parameters()))
            opt.step()
    return {"report": gw.report(), "loss": losses, "grads_finite": grads_finite}



def first_bad(values: list[float]) -> int:
    return next(k for k, v in enumerate(values) if not math.isfinite(v))


def inf_batch_at(bad_step: int) -> LossFn:
    def loss_at(step: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if step == bad_step:
            x = x.clone()
            x[3, 1] = float("inf")  # one bad record in the batch
        return nn.functional.mse_loss(model(x), y)
    return loss_at


# --------------------------------------------------------------------------- real runs
def test_inf_in_a_sampled_batch_is_traced_to_the_input() -> None:
    run = train(inf_batch_at(7))  # step 7 is one where activations and inputs are sampled
    assert first_bad(run["loss"]) == 7
    f = only(run["report"], "nonfinite")
    assert f.first_step == 7 and f.severity == "error"
    assert f.evidence["origin"] == "forward" and f.evidence["forward_produced_it"] is True
    assert f.evidence["forward_overflowed"] is False
    assert {"loss", "activation"} <= set(f.evidence["first_nonfinite"])
    # the replay of step 7's forward sees the Inf in the batch: no layer is blamed
    assert f.layers[0] == "0" and "input at step 7 already held Inf" in f.summary
    assert f.evidence["producer_status"] == "input" and f.evidence["producer"] is None
    assert f.evidence["last_finite_loss"] == pytest.approx(run["loss"][6], rel=1e-6)
    assert [c.id for c in f.causes] == ["nonfinite_input"]
    remedies = [r.id for r in f.remedies]
    assert "assert_finite_inputs" in remedies and "guard_nonfinite_loss" in remedies
    assert "clip_grad_norm" not in remedies and "clipping cannot help" in f.summary


def test_inf_in_an_unsampled_batch_is_traced_to_the_input_by_the_replay() -> None:
    """Step 21 measures no input statistics: the replay of its forward sees the bad batch."""
    run = train(inf_batch_at(21))
    assert first_bad(run["loss"]) == 21
    f = only(run["report"], "nonfinite")
    assert f.first_step == 21
    assert f.evidence["origin"] == "forward" and f.evidence["first_nonfinite_loss_step"] == 21
    assert f.evidence["last_finite_loss"] == pytest.approx(run["loss"][20], rel=1e-6)
    assert [c.id for c in f.causes] == ["nonfinite_input"]
    assert f.evidence["producer_status"] == "input" and f.evidence["producer_step"] == 21
    remedies = {r.id for r in f.remedies}
    assert "clip_grad_norm" not in remedies and "assert_finite_inputs" in remedies
    # the step before was healthy: nothing else is blamed
    assert {x.kind for x in run["report"].problems} == {"nonfinite"}


def test_log_of_a_negative_number_at_step_13() -> None:
    def loss_at(step: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift = -100.0 if step == 13 else 10.0  # log(out - 100) is NaN
        return (torch.log(model(x) + shift) - torch.log(y + 10.0)).pow(2).mean()
    run = train(loss_at, steps=20, lr=0.01)
    assert first_bad(run["loss"]) == 13
    f = only(run["report"], "nonfinite")
    assert f.first_step == 13 and f.evidence["forward_produced_it"] is True
    assert "invalid_forward_op" in {c.id for c in f.causes}


def test_nan_from_backward_with_a_finite_loss() -> None:
    """sqrt(0) has an infinite derivative: the loss is finite, the gradient is NaN."""
    def loss_at(step: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if step == 10:
            return torch.sqrt((out * 0).pow(2)).mean()
        return nn.functional.mse_loss(out, y)
    run = train(loss_at, steps=20)
    assert math.isfinite(run["loss"][10]) and not run["grads_finite"][10]
    assert all(run["grads_finite"][:10])
    f = only(run["report"], "nonfinite")
    assert f.first_step == 10
    assert f.evidence["origin"] == "backward" and f.evidence["forward_produced_it"] is False
    assert f.evidence["first_nonfinite"] == ["gradient"]
    assert f.evidence["nonfinite_grad_kind"] == "nan"
    assert f.evidence["last_finite_loss_step"] == 10
    assert f.layers == ["0", "2", "4"]
    assert "backward() produced them while the loss was finite" in f.summary
    assert [c.id for c in f.causes] == ["invalid_backward_op"]


def test_seed_net_with_n0_10_init_overflows_in_the_forward_pass() -> None:
    """SEEDS.md section 7: N(0,10) weights, ReLU, SGD lr 0.1: loss ~1e26 at step 0, NaN after."""
    torch.manual_seed(0)
    x, y = seed_data()
    model = deep_net(nn.ReLU, lambda w: nn.init.normal_(w, 0, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, first_inf_layer = [], None
    with gradwatch.watch(model, opt) as gw:
        for step in range(50):
            if step == 1:  # reference: which layer's output is first non-finite at step 1
                with torch.no_grad():
                    h = x
                    for name, module in model.named_children():
                        h = module(h)
                        if first_inf_layer is None and not torch.isfinite(h).all():
                            first_inf_layer = name
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[0] > 1e20 and first_bad(losses) == 1
    report = gw.report()
    f = only(report, "nonfinite")
    assert f.first_step == 1
    assert f.evidence["forward_overflowed"] is True and f.evidence["origin"] == "forward"
    assert f.layers[0] == first_inf_layer
    assert "clipping cannot help" in f.summary
    causes = {c.id: c.text for c in f.causes}
    assert "forward_overflow" in causes and "5.4e+26" in causes["forward_overflow"]
    assert "init_too_large" in causes
    assert not {"invalid_forward_op", "learning_rate_too_high"} & set(causes)
    for finding in report.findings:
        assert "clip_grad_norm" not in {r.id for r in finding.remedies}, finding.kind
    assert "kaiming_init" in {r.id for r in f.remedies}


def test_nan_after_gradients_grew_recommends_clipping() -> None:
    """Inputs 1000x larger from step 25 on: gradients blow up, then the loss overflows."""
    def loss_at(step: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(model(x if step < 25 else 1000 * x), y)
    run = train(loss_at, steps=40, lr=0.01)
    bad = first_bad(run["loss"])
    f = only(run["report"], "nonfinite")
    assert f.first_step == bad > 25
    assert f.evidence["forward_overflowed"] is False
    assert "From step 25 on, the gradient norm grew" in f.summary
    assert "invalid_forward_op" not in {c.id for c in f.causes}
    assert "unscaled_inputs" in {c.id for c in f.causes}
    assert "clip_grad_norm" in {r.id for r in f.remedies}


# --------------------------------------------------------------------------- synthetic
def history(n_steps: int = 30, loss: np.ndarray | None = None,
            total_grad: np.ndarray | None = None) -> History:
    n_layers = 3
    h = linear_stack(n_layers, ["relu"] * n_layers)
    steps = np.arange(n_steps)
    loss = np.linspace(1.0, 0.5, n_steps) if loss is None else loss
    total = np.ones(n_steps) if total_grad is None else total_grad
    grad = np.repeat(total[:, None] / math.sqrt(n_layers), n_layers, axis=1)
    h.record_steps(steps, loss, np.ones(n_steps), grad, np.zeros_like(grad), np.zeros(n_steps))
    h.facts.update(optimizers=[{"type": "SGD", "groups": [{"lr": 0.01}]}],
                   optimizer_roots=[[0]], graph={"0": {"branch_merges": 0, "norm_ops": 0}},
                   module={"0": {"norm_modules": []}})
    return h


def detect(h: History) -> list[Finding]:
    return nonfinite.detect(Context(h, T))


def nan_loss_at(step: int, n: int = 30, first: float = 1.0) -> np.ndarray:
    loss = np.linspace(first, first / 2, n)
    loss[step:] = np.nan
    return loss


def test_synthetic_finite_run_is_silent() -> None:
    assert detect(history()) == []


def test_synthetic_origin_follows_what_was_non_finite_first() -> None:
    h = history(loss=nan_loss_at(12))
    f = detect(h)[0]
    assert (f.first_step, f.evidence["origin"]) == (12, "forward")
    h.events.first_nonfinite_grad, h.events.nonfinite_grad_params = 9, ["2.weight"]
    h.events.nonfinite_grad_kind = "inf"
    f = detect(h)[0]
    assert (f.first_step, f.evidence["origin"], f.layers) == (9, "backward", ["2"])
    assert "inf in 2.weight" in f.summary
    h.events.first_nonfinite_weight, h.events.nonfinite_weight_params = 4, ["4.bias"]
    f = detect(h)[0]
    assert (f.first_step, f.evidence["origin"], f.layers) == (4, "update", ["4"])
    h.events.first_nonfinite_act, h.events.nonfinite_act_layers = 3, ["4", "2"]
    f = detect(h)[0]
    assert (f.first_step, f.evidence["origin"]) == (3, "forward")
    assert f.layers == ["2", "4"]  # input side first


def test_synthetic_forward_overflow_boundary() -> None:
    for first, overflow in ((T.forward_overflow * 1.01, True), (T.forward_overflow * 0.99, False)):
        f = detect(history(loss=nan_loss_at(10, first=first)))[0]
        assert f.evidence["forward_overflowed"] is overflow
        assert ("forward_overflow" in {c.id for c in f.causes}) is overflow
        assert ("clipping cannot help" in f.summary) is True  # overflow, or nothing grew


def test_synthetic_sudden_versus_grown_boundary() -> None:
    """Gradient grown past exploding_growth before the NaN: grown (clip can help); below it:
    sudden (data or an undefined op)."""
    for growth, sudden in ((T.exploding_growth * 1.01, False), (T.exploding_growth * 0.99, True)):
        total = np.ones(30)
        total[15:20] = growth
        f = detect(history(loss=nan_loss_at(20), total_grad=total))[0]
        assert ("invalid_forward_op" in {c.id for c in f.causes}) is sudden
        assert ("clip_grad_norm" in {r.id for r in f.remedies}) is not sudden


def test_synthetic_sudden_needs_a_baseline() -> None:
    """With at most baseline_steps finite steps before the NaN, nothing is known to be normal."""
    short = detect(history(loss=nan_loss_at(T.baseline_steps)))[0]
    assert "invalid_forward_op" not in {c.id for c in short.causes}
    longer = detect(history(loss=nan_loss_at(T.baseline_steps + 1)))[0]
    assert "invalid_forward_op" in {c.id for c in longer.causes}
