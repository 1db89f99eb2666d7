"""exploding_gradient: real runs that explode (unscaled inputs with SGD, inputs that change
scale mid-run, too large an init) and runs with large but harmless gradients; synthetic
histories on the thresholds."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import linear_stack, only
from torch import nn

import gradwatch
from gradwatch.findings import Finding
from gradwatch.history import History
from gradwatch.judge.context import Context
from gradwatch.judge.detectors import exploding
from gradwatch.thresholds import Thresholds

T = Thresholds()



def total_norm(tensors: Any) -> float:
    """Reference: L2 norm over all tensors, float64 on the host."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def train(model: nn.Module, opt: torch.optim.Optimizer, x_of: Callable[[int], torch.Tensor],
          y: torch.Tensor, steps: int) -> dict[str, Any]:
    """Full-batch MSE under watch; records the reference gradient and weight norms."""
    grads, weights, losses = [], [], []
    with gradwatch.watch(model, opt) as gw:
        for step in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x_of(step)), y)
            loss.backward()
            grads.append(total_norm(p.grad for p in model.parameters()))
            weights.append(total_norm(p.detach() for p in model.parameters()))
            losses.append(loss.item())
            opt.step()
    return {"report": gw.report(), "grad": np.array(grads), "weight": np.array(weights),
            "loss": np.array(losses)}



def growth_steps(grad: np.ndarray) -> tuple[int, int]:
    """Reference: the first step past exploding_growth x the early median, and the step
    after the norm was last within onset_factor of it."""
    growth = grad / np.median(grad[: T.baseline_steps])
    past = int(np.argmax(growth > T.exploding_growth))
    onset = int(np.nonzero(growth[:past] <= T.onset_factor)[0][-1]) + 1
    return past, onset


def regression(n_in: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, n_in, generator=g)
    y = x @ torch.linspace(-2, 1, n_in).reshape(-1, 1) + 0.1 * torch.randn(256, 1, generator=g)
    return x * scale, y


def mlp(n_in: int, depth: int = 4, width: int = 32, gain: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(n_in if i == 0 else width, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        lin.weight.data *= gain
        layers += [lin, nn.ReLU()]
    head = nn.Linear(width, 1)
    nn.init.kaiming_normal_(head.weight, nonlinearity="relu")
    head.weight.data *= gain
    return nn.Sequential(*layers, head)


# --------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def unscaled() -> dict[str, Any]:
    """Linear regression on features ~1e3 with an SGD step just past the stability limit."""
    x, y = regression(3)
    x = 1000 + 300 * x
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return train(model, torch.optim.SGD(model.parameters(), lr=4e-7), lambda s: x, y, 40)


def test_unscaled_inputs_with_sgd_explode(unscaled: dict[str, Any]) -> None:
    f = only(unscaled["report"], "exploding_gradient")
    grad, weight = unscaled["grad"], unscaled["weight"]
    assert grad[-1] / grad[0] > 1e6  # the reference norm really grew by orders of magnitude
    # From the first step the gradient dwarfs the weights, and the loss rises after it.
    assert grad[0] / weight[0] > T.exploding_grad_to_weight
    assert f.first_step == 0
    past, onset = growth_steps(grad)
    assert f.evidence["growth_past_limit_step"] == past
    assert f.evidence["growth_onset_step"] == onset
    assert f.evidence["grad_norm_baseline"] == pytest.approx(np.median(grad[:5]), rel=1e-5)
    assert f.evidence["growth"] == pytest.approx(grad.max() / np.median(grad[:5]), rel=1e-5)
    assert f.layers == ["Linear"]
    assert "the loss rose" in f.summary
    assert f.severity == "error"


def test_unscaled_inputs_causes_and_remedies(unscaled: dict[str, Any]) -> None:
    f = only(unscaled["report"], "exploding_gradient")
    causes = {c.id: c.text for c in f.causes}
    assert set(causes) == {"unscaled_inputs", "learning_rate_too_high"}
    assert "RMS 1.0" in causes["unscaled_inputs"]  # ~1.06e+03
    remedies = [r.id for r in f.remedies]
    assert remedies[0] == "standardize_inputs"
    assert "lower_learning_rate" in remedies
    # the early steps were already exploding: no clipping norm can be measured from them
    assert "clip_grad_norm" not in remedies
    assert "loss_divergence" in unscaled["report"].kinds()


def test_inputs_that_change_scale_mid_run_explode_at_that_step() -> None:
    x, y = regression(4)
    model = mlp(4)
    run = train(model, torch.optim.SGD(model.parameters(), lr=0.01),
                lambda s: x if s < 25 else 1000 * x, y, 40)
    f = only(run["report"], "exploding_gradient")
    assert run["grad"][25] / np.median(run["grad"][:5]) > T.exploding_growth
    assert f.first_step == 25
    peak = int(np.nanargmax(np.where(np.isfinite(run["grad"]), run["grad"], np.nan)))
    assert f.evidence["grad_norm_peak_step"] == peak
    assert set(f.layers) <= {"0", "2", "4", "6", "8"} and f.layers
    causes = {c.id: c.text for c in f.causes}
    assert "unscaled_inputs" in causes and "from step 25 on" in causes["unscaled_inputs"]
    assert "init_too_large" not in causes and "init_too_small" not in causes
    clip = next(r for r in f.remedies if r.id == "clip_grad_norm")
    expected = float(f"{np.median(run['grad'][:T.baseline_steps]):.2g}")
    assert f"max_norm={expected}" in clip.code
    compile(clip.code, "<remedy>", "exec")


def test_too_large_init_explodes_without_overflowing_the_first_forward() -> None:
    x, y = regression(4)
    model = mlp(4, depth=6, gain=4.0)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    # Every hidden layer feeds a ReLU (Kaiming scale); the output layer stands apart.
    ratios = [float(m.weight.detach().std()) / math.sqrt(2 / m.in_features)
              for m in linears[:-1]]
    run = train(model, torch.optim.SGD(model.parameters(), lr=1e-3), lambda s: x, y, 20)
    assert 1e6 < run["loss"][0] < T.forward_overflow and not np.isfinite(run["loss"][-1])
    f = only(run["report"], "exploding_gradient")
    assert f.first_step == 0 and f.severity == "error"
    causes = {c.id: c.text for c in f.causes}
    assert f"{np.median(ratios):.3g}x the Kaiming std for the relu that follows" in \
        causes["init_too_large"]
    assert "forward_overflow" not in causes  # the first forward was finite and < 1e15
    assert "deep_plain_stack" in causes
    remedies = [r.id for r in f.remedies]
    assert "kaiming_init" in remedies and "clip_grad_norm" not in remedies
    nonfinite = only(run["report"], "nonfinite")
    assert nonfinite.evidence["forward_overflowed"] is False
    assert "init_too_large" in {c.id for c in nonfinite.causes}


def test_large_gradients_with_a_falling_loss_are_not_an_explosion() -> None:
    """Same unscaled features, a step size inside the stability limit: the gradient is ~1e6x
    the weights for the whole run, but the loss keeps falling."""
    x, y = regression(3)
    x = 1000 + 300 * x
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    run = train(model, torch.optim.SGD(model.parameters(), lr=2e-7), lambda s: x, y, 40)
    assert (run["grad"] / run["weight"] > T.exploding_grad_to_weight).all()
    assert run["loss"][-1] < run["loss"][0] / 10
    assert "exploding_gradient" not in run["report"].kinds()


def test_tiny_initial_weights_are_not_an_explosion() -> None:
    """Logistic regression from near-zero weights: gradient/weight is huge on step 0 only."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    y = (x @ torch.randn(5, 1, generator=g) > 0).float()
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    nn.init.normal_(model.weight, 0, 1e-3)
    nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(100):
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            if gw.steps == 0:
                ratio0 = total_norm(p.grad for p in model.parameters()) / \
                    total_norm(p.detach() for p in model.parameters())
            opt.step()
    assert ratio0 > T.exploding_grad_to_weight
    assert gw.report().problems == []


# --------------------------------------------------------------------------- synthetic
def history(grad: np.ndarray, loss: np.ndarray, weight: float | np.ndarray = 1.0) -> History:
    """One 3-layer model; every step is also a detail step with the given weight norm."""
    n_steps, n_layers = grad.shape
    h = linear_stack(n_layers)
    steps = np.arange(n_steps)
    h.record_steps(steps, loss, np.ones(n_steps), grad, np.zeros_like(grad), np.zeros(n_steps))
    w = np.broadcast_to(np.asarray(weight, dtype=float), (n_steps,))[:, None]
    per_layer = np.repeat(w / math.sqrt(n_layers), n_layers, axis=1)
    h.record_detail(steps, {"weight_norm": per_layer, "update_norm": per_layer * 1e-4,
                            "grad_norm_applied": np.full_like(grad, np.nan),
                            "act_rms": np.ones_like(grad),
                            "model_io": np.ones((n_steps, len(History.MODEL_IO)))})
    h.facts.update(optimizers=[{"type": "SGD", "groups": [{"lr": 0.01}]}],
                   optimizer_roots=[[0]], graph={"0": {"branch_merges": 0, "norm_ops": 0}},
                   module={"0": {"norm_modules": []}})
    return h


def per_layer(total: np.ndarray, n_layers: int = 3) -> np.ndarray:
    """Split a total norm evenly over the layers (the detector recombines it exactly)."""
    return np.repeat(total[:, None] / math.sqrt(n_layers), n_layers, axis=1)


def detect(h: History, t: Thresholds = T) -> list[Finding]:
    return exploding.detect(Context(h, t))


def jump(factor: float, at: int = 10, n: int = 30) -> np.ndarray:
    total = np.full(n, 0.01)  # small against the weights: only growth can fire
    total[at:] *= factor
    return total


RISING = np.concatenate([np.full(10, 1.0), np.full(20, 5.0)])
FALLING = np.linspace(1.0, 0.1, 30)


def test_synthetic_growth_threshold_boundary() -> None:
    f = detect(history(per_layer(jump(T.exploding_growth * 1.01)), RISING))
    assert len(f) == 1 and f[0].first_step == 10 and f[0].severity == "warning"
    assert f[0].evidence["growth"] == pytest.approx(T.exploding_growth * 1.01)
    assert detect(history(per_layer(jump(T.exploding_growth * 0.99)), RISING)) == []


def test_synthetic_growth_needs_a_loss_that_suffers() -> None:
    grad = per_layer(jump(T.exploding_growth * 10))
    assert detect(history(grad, FALLING)) == []  # a model leaving a flat start
    flat = np.ones(30)
    assert "does not fall" in detect(history(grad, flat))[0].summary
    nan_end = FALLING.copy()
    nan_end[20:] = np.nan
    assert "non-finite" in detect(history(grad, nan_end))[0].summary
    # the loss rose, but not past onset_factor x its best: still improving overall
    just_below = np.concatenate([np.full(10, 1.0), [T.onset_factor * 0.99],
                                 np.linspace(0.9, 0.1, 19)])
    assert detect(history(grad, just_below)) == []
    just_above = just_below.copy()
    just_above[10] = T.onset_factor * 1.01
    assert len(detect(history(grad, just_above))) == 1


def test_synthetic_growth_is_dated_from_the_start_of_the_rise() -> None:
    total = np.full(30, 0.01)
    total[10:20] = 0.01 * 3.0 ** np.arange(1, 11)  # 3x per step: past 1e3 at step 16
    total[20:] = total[19]
    f = detect(history(per_layer(total), RISING))[0]
    assert f.evidence["growth_past_limit_step"] == 16
    assert f.first_step == f.evidence["growth_onset_step"] == 10


def test_synthetic_error_severity_boundary() -> None:
    limit = T.exploding_growth * T.exploding_error_factor
    assert detect(history(per_layer(jump(limit * 1.01)), RISING))[0].severity == "error"
    assert detect(history(per_layer(jump(limit * 0.99)), RISING))[0].severity == "warning"


def test_synthetic_gradient_to_weight_boundary_and_persistence() -> None:
    flat = np.ones(30)
    big = per_layer(np.full(30, T.exploding_grad_to_weight * 1.01))
    f = detect(history(big, flat))
    assert len(f) == 1 and f[0].first_step == 0
    assert f[0].evidence["grad_to_weight_ratio"] == pytest.approx(T.exploding_grad_to_weight
                                                                  * 1.01)
    assert detect(history(per_layer(np.full(30, T.exploding_grad_to_weight * 0.99)),
                          flat)) == []
    # huge only on the first steps (weights starting near zero): not persistent
    total = np.full(30, T.exploding_grad_to_weight * 5)  # 500x the early steps: no growth
    k = int(T.persistence * 30)  # 24 of 30 steps above: persistent
    total[: 30 - k] = 1.0
    assert detect(history(per_layer(total), flat))[0].first_step == 30 - k
    total[30 - k] = 1.0  # 23 of 30
    assert detect(history(per_layer(total), flat)) == []
    # persistent but the loss keeps falling: large-scale inputs with a small enough step
    assert detect(history(big, FALLING)) == []


def test_synthetic_depth_ratio_boundary() -> None:
    base = np.tile([1.0, 0.1, 0.01], (30, 1)) * 1e-3
    for factor, fires in ((1.01, True), (0.99, False)):
        grad = base.copy()
        grad[:, 0] = grad[:, 2] * T.exploding_depth_ratio * factor
        found = detect(history(grad, FALLING))
        assert bool(found) is fires
        if fires:
            assert found[0].layers == ["0"] and "layer 0 gets" in found[0].summary
