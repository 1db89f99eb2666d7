"""loss_divergence: a real run whose loss falls and then, after the learning rate is raised
mid-run, grows by orders of magnitude; synthetic histories on the thresholds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import only
from torch import nn

import gradwatch
from gradwatch.findings import Finding
from gradwatch.history import History, LayerInfo
from gradwatch.judge.context import Context
from gradwatch.judge.detectors import loss_divergence
from gradwatch.thresholds import Thresholds

T = Thresholds()
RAISE_AT = 40



def reference_rise(losses: list[float]) -> tuple[int, int]:
    """The first of divergence_persistence steps at >= factor x the best so far (and above
    the first loss), and the step after the loss was last within onset_factor of that best."""
    loss = np.array([v for v in losses if np.isfinite(v)])
    best = np.minimum.accumulate(loss)
    bad = (loss >= T.divergence_factor * best) & (loss >= loss[0])
    start = next(k for k in range(len(bad)) if bad[k: k + T.divergence_persistence].all())
    near = np.nonzero(loss[: start + 1] <= T.onset_factor * best[start])[0]
    return start, int(near[-1]) + 1


def tanh_regression() -> tuple[torch.Tensor, torch.Tensor, nn.Module, torch.optim.SGD]:
    """A learnable regression and a tanh MLP with full-batch SGD at lr 0.05."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [1.0]]) + 0.1 * torch.randn(256, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    return x, y, model, torch.optim.SGD(model.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def raised() -> dict[str, Any]:
    """Tanh MLP, full-batch SGD at lr 0.05 (the loss falls), lr raised to 1.0 at step 40."""
    x, y, model, opt = tanh_regression()
    losses, grads = [], []
    with gradwatch.watch(model, opt) as gw:
        for step in range(70):
            if step == RAISE_AT:
                for group in opt.param_groups:
                    group["lr"] = 1.0
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            grads.append(float(torch.linalg.vector_norm(torch.stack(
                [p.grad.double().norm() for p in model.parameters()]))))
            opt.step()
            losses.append(loss.item())
    return {"report": gw.report(), "loss": losses, "grad": grads}



def test_loss_falls_then_diverges_after_the_learning_rate_is_raised(
        raised: dict[str, Any]) -> None:
    loss = raised["loss"]
    assert loss[RAISE_AT - 1] < loss[0] / 10  # it was learning
    assert max(v for v in loss if np.isfinite(v)) > 1e3 * min(loss)
    f = only(raised["report"], "loss_divergence")
    start, rise = reference_rise(loss)
    assert f.evidence["diverged_step"] == start
    assert f.first_step == f.evidence["rise_step"] == rise
    assert RAISE_AT <= f.first_step <= RAISE_AT + 4  # within a few steps of the real onset
    assert f.evidence["loss_best"] == pytest.approx(min(loss[: start + 1]), rel=1e-6)
    assert f.evidence["ends_nonfinite"] is True and f.severity == "error"
    assert f"rose from step {rise} on" in f.summary


def test_divergence_causes_and_remedies(raised: dict[str, Any]) -> None:
    f = only(raised["report"], "loss_divergence")
    # Its own cause, then the link to the explosion that the raised rate set off.
    assert [c.id for c in f.causes] == ["learning_rate_too_high", "follows_explosion"]
    root = only(raised["report"], "exploding_gradient")
    assert f.evidence["root"] == {"kind": "exploding_gradient", "first_step": root.first_step}
    assert {"kind": "loss_divergence", "first_step": f.first_step} in \
        root.evidence["consequences"]
    remedies = {r.id: r.code for r in f.remedies}
    assert set(remedies) == {"lower_learning_rate", "clip_grad_norm"}
    assert 'group["lr"] *=' in remedies["lower_learning_rate"]
    early = float(f"{np.median(raised['grad'][:T.baseline_steps]):.2g}")
    assert f"max_norm={early}" in remedies["clip_grad_norm"]
    for code in remedies.values():
        compile(code, "<remedy>", "exec")


def test_the_same_run_without_the_raise_does_not_diverge() -> None:
    x, y, model, opt = tanh_regression()
    with gradwatch.watch(model, opt) as gw:
        for _ in range(70):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert gw.report().problems == []


# --------------------------------------------------------------------------- synthetic
def history(loss: np.ndarray) -> History:
    h = History()
    h.roots.append("Sequential")
    h.add_layer(LayerInfo(name="0", type="Linear", params=11, root=0, order=0,
                          param_names=["0.weight", "0.bias"], fan_in=10, fan_out=1))
    n = len(loss)
    grad = np.ones((n, 1))
    h.record_steps(np.arange(n), loss, np.ones(n), grad, np.zeros_like(grad), np.zeros(n))
    h.facts.update(optimizers=[{"type": "SGD", "groups": [{"lr": 0.01}]}],
                   optimizer_roots=[[0]])
    return h


def detect(loss: np.ndarray, t: Thresholds = T) -> list[Finding]:
    return loss_divergence.detect(Context(history(np.asarray(loss, dtype=float)), t))


def falls_then(level: float, n_high: int = 3, first: float = 0.5) -> np.ndarray:
    """From ``first`` down to a best of 0.1 at step 9, then ``n_high`` steps at ``level``."""
    return np.concatenate([np.linspace(first, 0.1, 10), np.full(n_high, level)])


def test_synthetic_factor_boundary() -> None:
    limit = T.divergence_factor * 0.1
    f = detect(falls_then(limit * 1.01))
    assert len(f) == 1 and f[0].first_step == 10 and f[0].severity == "warning"
    assert f[0].evidence["factor"] == pytest.approx(T.divergence_factor * 1.01)
    assert detect(falls_then(limit * 0.99)) == []


def test_synthetic_persistence_boundary() -> None:
    level = T.divergence_factor * 0.1 * 2
    assert len(detect(falls_then(level, n_high=T.divergence_persistence))) == 1
    short = np.concatenate([falls_then(level, n_high=T.divergence_persistence - 1), [0.1]])
    assert detect(short) == []


def test_synthetic_must_also_undo_the_whole_progress() -> None:
    """15x the best but still below the first loss: a noisy low loss, not a divergence."""
    assert detect(falls_then(1.5, first=2.0)) == []
    assert len(detect(falls_then(2.5, first=2.0))) == 1


def test_synthetic_error_severity_boundary() -> None:
    limit = T.divergence_error_factor * 0.1
    assert detect(falls_then(limit * 1.01))[0].severity == "error"
    assert detect(falls_then(limit * 0.99))[0].severity == "warning"


def test_synthetic_dated_from_the_start_of_the_rise() -> None:
    """Best 0.1 at step 9, then 1.5x per step: past 2x best at step 11, past 10x at step 15."""
    loss = np.concatenate([np.linspace(0.5, 0.1, 10), 0.1 * 1.5 ** np.arange(1, 12)])
    f = detect(loss)[0]
    assert f.evidence["diverged_step"] == 15
    assert f.first_step == f.evidence["rise_step"] == 11
    assert reference_rise(list(loss)) == (15, 11)


def test_synthetic_running_off_to_nan_counts_without_persistence() -> None:
    loss = np.concatenate([falls_then(5.0, n_high=1), [np.nan, np.nan]])
    f = detect(loss)
    assert len(f) == 1 and f[0].severity == "error" and f[0].evidence["ends_nonfinite"]
    healthy_then_nan = np.concatenate([np.linspace(0.5, 0.1, 10), [np.nan, np.nan]])
    assert detect(healthy_then_nan) == []  # non-finite, but not grown first: nonfinite's job


def test_synthetic_override_moves_the_factor() -> None:
    loss = falls_then(0.5)  # 5x the best, equal to the first loss
    assert detect(loss) == []
    assert len(detect(loss, T.replace(divergence_factor=4.0))) == 1


def test_synthetic_a_divergence_the_run_recovers_from_is_not_one() -> None:
    """10 steps at 20x the best, then back down: recovered when the last losses are within
    onset_factor of the best before it; still diverged above that."""
    up = falls_then(2.0, n_high=10)
    assert detect(np.concatenate([up, np.full(20, 0.1 * T.onset_factor * 0.9)])) == []
    assert detect(np.concatenate([up, np.linspace(1.0, 0.05, 30)])) == []
    stays = detect(np.concatenate([up, np.full(20, 0.1 * T.onset_factor * 1.5)]))
    assert len(stays) == 1 and stays[0].first_step == 10
    # a recovered episode, then one that stays: the second is reported
    twice = np.concatenate([up, np.full(10, 0.1), np.full(10, 5.0)])
    f = detect(twice)
    assert len(f) == 1 and f[0].evidence["diverged_step"] == 30


def test_a_real_run_that_recovers_from_a_burst_of_high_rate_does_not_diverge() -> None:
    """The tanh MLP at lr 0.05, lr 1.0 for 4 steps from step 40 (the loss shoots up to
    ~850x its best and stays above 10x for several steps), then 0.05 again: the loss comes
    back below where it was, so it did not diverge."""
    x, y, model, opt = tanh_regression()
    losses = []
    with gradwatch.watch(model, opt) as gw:
        for step in range(200):
            for group in opt.param_groups:
                group["lr"] = 1.0 if RAISE_AT <= step < RAISE_AT + 4 else 0.05
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    best_before = min(losses[:RAISE_AT])
    high = [v > T.divergence_factor * best_before for v in losses[RAISE_AT:RAISE_AT + 12]]
    assert sum(high) > T.divergence_persistence  # it went far up, for a while
    assert losses[-1] < best_before  # and it recovered
    assert "loss_divergence" not in gw.report().kinds()


def test_synthetic_back_at_the_first_loss_after_learning_nothing_is_no_recovery() -> None:
    """A net blown up at once and collapsed to a constant guess comes back to about its
    first loss: it did not recover. One that then learns far below it did."""
    collapse = np.concatenate([[1.0], np.full(5, 100.0), np.full(30, 1.05)])
    f = detect(collapse)
    assert len(f) == 1 and f[0].evidence["diverged_step"] == 1
    learns = np.concatenate([[1.0], np.full(5, 100.0), np.linspace(1.0, 0.01, 30)])
    assert detect(learns) == []
