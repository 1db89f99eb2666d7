"""loss_plateau: stuck runs (frozen by clipping an infinite norm, starved by depth) are
warnings or errors with the sign that proves them stuck; converged runs are at most info."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import deep_net, linear_stack, only, seed_data, train_full_batch
from torch import nn

import gradwatch
from gradwatch.findings import Finding
from gradwatch.history import History
from gradwatch.judge.context import Context
from gradwatch.judge.detectors import loss_plateau
from gradwatch.thresholds import Thresholds

T = Thresholds()




def flat_since(losses: list[float], final: float) -> int:
    """Reference: first step from which every loss stays within plateau_rel_change of final."""
    tol = abs(final) * T.plateau_rel_change
    k = len(losses)
    while k > 0 and abs(losses[k - 1] - final) <= tol:
        k -= 1
    return k


# --------------------------------------------------------------------------- real runs
def test_n0_10_net_with_clipping_is_frozen_not_stable() -> None:
    """SEEDS.md section 7: clip_grad_norm_(max_norm=10) on an infinite total norm scales every
    gradient by 0, so no weight moves and the loss stays at ~5e26 for all 50 epochs."""
    torch.manual_seed(0)
    x, y = seed_data()
    model = deep_net(nn.ReLU, lambda w: nn.init.normal_(w, 0, 10))
    before = [p.detach().clone() for p in model.parameters()]
    report = train_full_batch(model, x, y, lr=0.1, steps=50, clip=10.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    f = only(report, "loss_plateau")
    assert f.severity == "error" and f.first_step == 0
    assert "no layer's weights move" in f.summary
    causes = [c.id for c in f.causes]
    assert causes[0] == "weights_frozen"
    assert {"clipping_on_infinite_norm", "forward_overflow", "init_too_large"} <= set(causes)
    # a stall by frozen weights is not blamed on depth or on vanishing gradients
    assert not {"deep_plain_stack", "gradient_vanishes", "init_too_small"} & set(causes)
    for finding in report.findings:
        assert "clip_grad_norm" not in {r.id for r in finding.remedies}
    exploding = only(report, "exploding_gradient")
    assert "gradient clipping cannot help" in exploding.summary


def test_default_init_relu_seed_net_stalls_with_a_measured_sign() -> None:
    torch.manual_seed(0)
    x, y = seed_data()
    model = deep_net(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    with gradwatch.watch(model, opt) as gw:
        for _ in range(300):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    f = only(gw.report(), "loss_plateau")
    assert f.severity == "warning"
    final = float(np.median(losses[-(len(losses) // 2) // 4:]))
    # The detector walks back in blocks of len/20 steps (noise-tolerant): one block at most.
    assert abs(f.first_step - flat_since(losses, final)) <= len(losses) // 20
    assert f.evidence["loss_best"] == pytest.approx(min(losses), rel=1e-6)
    ids = [c.id for c in f.causes]
    assert ids[:2] == ["constant_output", "gradient_vanishes"]
    assert "weights_frozen" not in ids  # the weights do move, the output just does not
    assert "adaptive_optimizer" in {r.id for r in f.remedies}
    assert f.layers == ["0"]


def test_converged_linear_regression_is_info_at_most() -> None:
    """Full-batch SGD converges until float32 updates are exactly 0: flat and motionless,
    but because the gradient vanished at the optimum, not because something froze it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    report = train_full_batch(model, x, y, lr=0.1, steps=600)
    f = only(report, "loss_plateau")
    assert f.severity == "info"
    assert f.evidence["update_ratio_max"] == 0.0  # truly motionless at the end
    assert "converged" in f.summary
    assert report.problems == []


# --------------------------------------------------------------------------- synthetic
def history(loss: np.ndarray, spread: float = 0.5, update_ratio: float = 1e-3,
            total_grad: np.ndarray | None = None, depth_ratio: float = 0.5) -> History:
    """3-layer model; every step is a detail step with the given output spread and updates."""
    n_steps, n_layers = len(loss), 3
    h = linear_stack(n_layers, ["relu"] * n_layers)
    steps = np.arange(n_steps)
    total = np.ones(n_steps) if total_grad is None else total_grad
    profile = depth_ratio ** (1 - np.arange(n_layers) / (n_layers - 1))
    grad = total[:, None] * profile / np.linalg.norm(profile)
    h.record_steps(steps, loss, np.ones(n_steps), grad, np.zeros_like(grad), np.zeros(n_steps))
    io = np.ones((n_steps, len(History.MODEL_IO)))
    io[:, History.MODEL_IO.index("output_spread")] = spread
    ones = np.ones((n_steps, n_layers))
    h.record_detail(steps, {"weight_norm": ones, "update_norm": ones * update_ratio,
                            "grad_norm_applied": ones * np.nan, "act_rms": ones,
                            "model_io": io})
    h.facts.update(optimizers=[{"type": "SGD", "groups": [{"lr": 0.01}]}],
                   optimizer_roots=[[0]], graph={"0": {"branch_merges": 0, "norm_ops": 0}},
                   module={"0": {"norm_modules": []}})
    return h


def detect(h: History, t: Thresholds = T) -> list[Finding]:
    return loss_plateau.detect(Context(h, t))


def plateau_loss(n: int = 40, change: float = 0.0) -> np.ndarray:
    """Falls 10 -> 1 over the first half, then flat at 1 until the last quarter of the
    window, which sits at 1 - change: the relative change the detector measures."""
    loss = np.concatenate([np.linspace(10.0, 1.0, n // 2), np.ones(n - n // 2)])
    q = (n - n // 2) // 4
    loss[-q:] = 1.0 - change
    return loss


def test_synthetic_min_steps_boundary() -> None:
    assert detect(history(plateau_loss(T.min_steps - 1))) == []
    assert [f.severity for f in detect(history(plateau_loss(T.min_steps)))] == ["info"]


def test_synthetic_relative_change_boundary() -> None:
    f = detect(history(plateau_loss(change=T.plateau_rel_change * 0.99)))
    assert len(f) == 1 and f[0].evidence["relative_change"] == pytest.approx(
        T.plateau_rel_change * 0.99)
    assert detect(history(plateau_loss(change=T.plateau_rel_change * 1.01))) == []


def test_synthetic_flat_since_is_the_start_of_the_flat_stretch() -> None:
    loss = plateau_loss()
    f = detect(history(loss))[0]
    assert f.first_step == flat_since(list(loss), 1.0) == 19  # linspace ends at 1.0
    assert f.last_step == 39


def test_synthetic_collapsed_output_boundary() -> None:
    stuck = detect(history(plateau_loss(), spread=T.collapsed_output_spread * 0.99))[0]
    assert stuck.severity == "warning" and stuck.causes[0].id == "constant_output"
    assert detect(history(plateau_loss(), spread=T.collapsed_output_spread * 1.01))[0] \
        .severity == "info"


def test_synthetic_frozen_boundary() -> None:
    frozen = detect(history(plateau_loss(), update_ratio=T.frozen_update_ratio * 0.99))[0]
    assert frozen.severity == "error" and frozen.causes[0].id == "weights_frozen"
    assert detect(history(plateau_loss(), update_ratio=T.frozen_update_ratio * 1.01))[0] \
        .severity == "info"


def test_synthetic_motionless_because_converged_is_not_frozen() -> None:
    """Updates of 0 while the gradient is below active_grad_fraction of its peak: converged."""
    n = 40
    for fraction, frozen in ((T.active_grad_fraction * 0.9, False),
                             (T.active_grad_fraction * 1.1, True)):
        total = np.ones(n)
        total[n // 2:] = fraction
        f = detect(history(plateau_loss(n), update_ratio=0.0, total_grad=total))[0]
        assert (f.severity == "error") is frozen, fraction


def test_synthetic_vanishing_gradient_is_a_sign_of_a_stuck_model() -> None:
    f = detect(history(plateau_loss(), depth_ratio=T.vanishing_ratio * 0.5))[0]
    assert f.severity == "warning" and f.causes[0].id == "gradient_vanishes"
    assert f.layers == ["0"]
    assert detect(history(plateau_loss(), depth_ratio=T.vanishing_ratio * 2))[0] \
        .severity == "info"


def test_synthetic_window_override() -> None:
    """A shorter plateau window sees only the flat end of a run that is still falling."""
    loss = np.concatenate([np.linspace(10.0, 1.0, 30), np.ones(10)])
    assert detect(history(loss)) == []
    assert len(detect(history(loss), T.replace(plateau_window=0.2))) == 1


# ------------------------------------------------------------------ learning-rate schedules
def scheduled_run(factor: Callable[[int], float], steps: int = 300) -> gradwatch.Report:
    """A small MLP regression trained by minibatch SGD with a LambdaLR of ``factor(step)``,
    stepped after every batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(steps):
            i = torch.randint(0, 512, (64,), generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x[i]), y[i]).backward()
            opt.step()
            sched.step()
    return gw.report()


def test_a_schedule_stepped_every_batch_collapses_the_rate_into_a_plateau() -> None:
    # ExponentialLR(0.9) meant per epoch, stepped every batch: 0.9^k is below 1/100 of the
    # start after 44 steps.
    report = scheduled_run(lambda step: 0.9 ** step)
    f = only(report, "loss_plateau")
    assert f.severity == "warning"
    cause = next(c for c in f.causes if c.id == "learning_rate_collapsed")
    assert "fell from 0.05 (step 0)" in cause.text and "x) over the last part" in cause.text
    assert f.evidence["lr_peak"] == pytest.approx(0.05)
    assert f.evidence["lr_collapsed_from_step"] == 44
    assert f.evidence["lr_max_in_window"] <= 0.05 * T.lr_collapse
    assert f.remedies[0].id == "hold_learning_rate"


def test_warm_up_and_cosine_to_zero_is_healthy() -> None:
    # The rate ends at 0 by design, after the loss has converged: no warning.
    steps, warm = 300, 30

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warm) / (steps - warm))))

    report = scheduled_run(factor, steps)
    assert report.problems == [], [f.kind for f in report.problems]
