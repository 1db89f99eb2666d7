"""vanishing_gradient: the seed nets of SEEDS.md section 7 on real training, and synthetic
histories that fire, stay silent and sit on the documented thresholds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import deep_net, only, seed_data, train_full_batch
from torch import nn

import gradwatch
from gradwatch.findings import Finding
from gradwatch.history import History, LayerInfo
from gradwatch.judge.context import Context
from gradwatch.judge.detectors import vanishing
from gradwatch.thresholds import Thresholds

T = Thresholds()



def layer_grad_norm(layer: nn.Linear) -> float:
    """Reference: the L2 norm of weight and bias gradients together, in float64."""
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters()))


def seed_run(act: type[nn.Module], init: Any = None, steps: int = 500) -> dict[str, Any]:
    """SEEDS.md section 6 experiment 1/3: full batch, MSE, SGD lr 0.01, under watch."""
    torch.manual_seed(0)
    x, y = seed_data()
    model = deep_net(act, init)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first, last = model[0], model[20]
    losses, ratio0 = [], None
    with gradwatch.watch(model, opt) as gw:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if ratio0 is None:
                ratio0 = layer_grad_norm(first) / layer_grad_norm(last)
            opt.step()
            losses.append(loss.item())
    return {"report": gw.report(), "losses": losses, "ratio0": ratio0}



LINEARS = [str(2 * i) for i in range(11)]  # "0", "2", ..., "20": input side first


@pytest.fixture(scope="module")
def sigmoid() -> dict[str, Any]:
    return seed_run(nn.Sigmoid)


@pytest.fixture(scope="module")
def relu() -> dict[str, Any]:
    return seed_run(nn.ReLU)


# --------------------------------------------------------------------------- real runs
def test_default_init_sigmoid_net_vanishes_from_step_0(sigmoid: dict[str, Any]) -> None:
    f = only(sigmoid["report"], "vanishing_gradient")
    assert f.severity == "error"
    assert f.first_step == 0
    # SEEDS.md: the first layer gets ~1e-9 of the last layer's gradient at the start.
    assert sigmoid["ratio0"] < 1e-7
    assert f.evidence["grad_norm_ratio_at_first_step"] == pytest.approx(sigmoid["ratio0"],
                                                                         rel=1e-6)
    assert f.evidence["grad_norm_ratio_first_to_last"] < T.vanishing_ratio_error
    assert f.evidence["persistent_fraction"] >= T.persistence
    # the layers listed are the input-side ones, in order, starting at the first layer
    assert f.layers == LINEARS[: len(f.layers)]
    assert 3 <= len(f.layers) <= 8 and "20" not in f.layers
    assert "layer 0" in f.summary and "layer 20" in f.summary


def test_sigmoid_net_causes_hold_for_this_model(sigmoid: dict[str, Any]) -> None:
    f = only(sigmoid["report"], "vanishing_gradient")
    causes = {c.id: c.text for c in f.causes}
    assert "sigmoid_in_deep_stack" in causes and "10 of the 11 layers" in \
        causes["sigmoid_in_deep_stack"]
    assert "deep_plain_stack" in causes
    # default init is not too large, and there is no tanh or ReLU in this net
    assert not {"init_too_large", "tanh_in_deep_stack"} & set(causes)
    remedies = {r.id: r.code for r in f.remedies}
    assert "leaky_relu" in remedies
    assert 'nonlinearity="leaky_relu"' in remedies["kaiming_init"]
    for code in remedies.values():
        compile(code, "<remedy>", "exec")


def test_sigmoid_net_stalls_at_a_constant_prediction(sigmoid: dict[str, Any]) -> None:
    assert sigmoid["losses"][-1] == pytest.approx(9.76, abs=0.01)  # variance of y
    f = only(sigmoid["report"], "loss_plateau")
    assert f.severity in ("warning", "error")
    assert {"constant_output", "gradient_vanishes"} <= {c.id for c in f.causes}


def test_default_init_relu_net_vanishes_at_the_start_and_stalls(relu: dict[str, Any]) -> None:
    assert relu["losses"][-1] == pytest.approx(9.76, abs=0.01)
    f = only(relu["report"], "vanishing_gradient")
    assert f.first_step == 0
    assert T.vanishing_ratio_error < relu["ratio0"] < T.vanishing_ratio
    assert f.evidence["grad_norm_ratio_at_first_step"] == pytest.approx(relu["ratio0"], rel=1e-6)
    assert f.severity == "warning"
    assert f.layers == LINEARS[: len(f.layers)] and f.layers[0] == "0"
    causes = {c.id: c.text for c in f.causes}
    # PyTorch's default init: std 1/sqrt(3 fan_in) against Kaiming's sqrt(2/fan_in)
    # PyTorch's default Linear init has std 1/sqrt(3 fan_in): sqrt(1/6) = 0.408 of Kaiming's
    # sqrt(2/fan_in), up to the sampling noise of 10x10 weights.
    assert "init_too_small" in causes
    text = causes["init_too_small"]
    assert "x the Kaiming std for the relu that follows" in text
    measured = float(text.split("weights start at ")[1].split("x the Kaiming")[0])
    assert measured == pytest.approx(math.sqrt(1 / 6), rel=0.1)
    assert not {"sigmoid_in_deep_stack", "tanh_in_deep_stack", "init_too_large"} & set(causes)
    kaiming = next(r for r in f.remedies if r.id == "kaiming_init")
    assert 'nonlinearity="relu"' in kaiming.code
    plateau = only(relu["report"], "loss_plateau")
    assert plateau.severity in ("warning", "error")


def test_kaiming_init_relu_net_learns_without_vanishing() -> None:
    run = seed_run(nn.ReLU, nn.init.kaiming_uniform_)
    assert run["losses"][-1] < 0.5 < 9 < run["losses"][0]
    assert "vanishing_gradient" not in run["report"].kinds()
    assert run["report"].problems == []


# --------------------------------------------------------------------------- synthetic
def history(grad: np.ndarray, acts: list[str] | None = None, init_ratio: float = 1.0,
            act_rms: np.ndarray | None = None) -> History:
    """A history of one 'nn.Sequential' of Linear layers with the given per-step norms."""
    n_steps, n_layers = grad.shape
    h = History()
    h.roots.append("Sequential")
    acts = acts or ["relu"] * (n_layers - 1) + ["none"]
    for i in range(n_layers):
        h.add_layer(LayerInfo(
            name=str(2 * i), type="Linear", params=110, root=0, order=i,
            param_names=[f"{2 * i}.weight", f"{2 * i}.bias"], fan_in=10, fan_out=10,
            init_weight_std=init_ratio * 0.45, activation=acts[i],
            init_scale={"std": init_ratio * 0.45, "recommended_std": 0.45,
                        "ratio": init_ratio, "family": "kaiming", "activation": acts[i]}))
    steps = np.arange(n_steps)
    h.record_steps(steps, np.linspace(2.0, 1.0, n_steps), np.ones(n_steps), grad,
                   np.zeros_like(grad), np.zeros(n_steps))
    if act_rms is not None:
        h.record_detail(steps[:1], {"weight_norm": np.ones((1, n_layers)),
                                    "update_norm": np.full((1, n_layers), 1e-3),
                                    "grad_norm_applied": np.full((1, n_layers), np.nan),
                                    "act_rms": act_rms[None, :],
                                    "model_io": np.ones((1, len(History.MODEL_IO)))})
    h.facts.update(optimizers=[{"type": "SGD", "groups": [{"lr": 0.01}]}],
                   optimizer_roots=[[0]], graph={"0": {"branch_merges": 0, "norm_ops": 0}},
                   module={"0": {"norm_modules": []}})
    return h


def geometric(ratio: float, n_layers: int = 4, n_steps: int = 40) -> np.ndarray:
    """Per-step norms falling geometrically towards the input: first/last == ratio."""
    profile = ratio ** (1 - np.arange(n_layers) / (n_layers - 1))
    return np.tile(profile, (n_steps, 1))


def detect(h: History, t: Thresholds = T) -> list[Finding]:
    return vanishing.detect(Context(h, t))


def test_synthetic_fires_just_below_the_warning_threshold_and_not_above() -> None:
    below = detect(history(geometric(T.vanishing_ratio * 0.99)))
    assert [f.severity for f in below] == ["warning"]
    assert below[0].first_step == 0 and below[0].last_step == 39
    assert below[0].evidence["grad_norm_ratio_first_to_last"] == pytest.approx(
        T.vanishing_ratio * 0.99)
    assert detect(history(geometric(T.vanishing_ratio * 1.01))) == []


def test_synthetic_error_threshold_boundary() -> None:
    assert detect(history(geometric(T.vanishing_ratio_error * 0.99)))[0].severity == "error"
    assert detect(history(geometric(T.vanishing_ratio_error * 1.01)))[0].severity == "warning"


def test_synthetic_persistence_boundary() -> None:
    """Starved on exactly `persistence` of the steps (not from the start): fires; less: not."""
    n = 40
    grad = geometric(0.5, n_steps=n)
    starved = geometric(1e-4, n_steps=n)
    k = round(T.persistence * n)  # 32 of 40
    mask = np.zeros(n, dtype=bool)
    mask[n - k:] = True  # healthy start, so the "from the start" rule does not apply
    assert detect(history(np.where(mask[:, None], starved, grad)))[0].first_step == n - k
    mask[n - k] = False  # one step fewer: 31/40 < 0.8
    assert detect(history(np.where(mask[:, None], starved, grad))) == []


def test_synthetic_starved_from_the_start_then_settled_fires() -> None:
    """A net starved for min_steps steps from step 0 then settling (ratios recover) fires."""
    grad = geometric(0.5, n_steps=100)
    grad[: T.min_steps] = geometric(1e-5, n_steps=T.min_steps)
    f = detect(history(grad))
    assert len(f) == 1 and (f[0].first_step, f[0].last_step) == (0, T.min_steps - 1)
    grad[T.min_steps - 1] = geometric(0.5, n_steps=1)  # one step short of min_steps
    assert detect(history(grad)) == []


def test_synthetic_needs_min_layers() -> None:
    assert detect(history(geometric(1e-5, n_layers=T.min_layers - 1))) == []
    assert len(detect(history(geometric(1e-5, n_layers=T.min_layers)))) == 1


def test_synthetic_settled_tail_steps_are_ignored() -> None:
    """Steps whose output-side gradient is below active_grad_fraction of its peak say nothing
    about depth: a converged tail with tiny, badly-ratioed norms does not fire."""
    grad = geometric(0.5, n_steps=100)
    grad[10:] = geometric(1e-5, n_steps=90) * T.active_grad_fraction * 0.5
    assert detect(history(grad)) == []


def test_synthetic_override_moves_the_threshold() -> None:
    grad = geometric(1e-2)
    assert detect(history(grad)) == []
    assert len(detect(history(grad), T.replace(vanishing_ratio=2e-2))) == 1


def test_synthetic_names_the_layer_where_the_gradient_is_lost() -> None:
    """One drop of 1e5 between layers 2 and 4 (above single_layer_drop): named as the place."""
    profile = np.array([1e-5, 1e-5, 1.0, 1.0, 1.0])
    f = detect(history(np.tile(profile, (40, 1))))[0]
    assert "most of it is lost between layer 4 and layer 2" in f.summary
    assert f.evidence["largest_drop"] == {"from": "4", "to": "2", "factor": pytest.approx(1e5)}
    assert f.layers == ["0", "2"]
    gradual = detect(history(geometric(1e-5, n_layers=5)))[0]
    assert "lost gradually" in gradual.summary


def test_synthetic_causes_follow_activations_and_init() -> None:
    n = 6
    sig = detect(history(geometric(1e-5, n), acts=["sigmoid"] * (n - 1) + ["none"]))[0]
    assert {c.id for c in sig.causes} >= {"sigmoid_in_deep_stack", "deep_plain_stack"}
    relu_small = detect(history(geometric(1e-5, n), init_ratio=T.init_scale_low * 0.9))[0]
    ids = {c.id for c in relu_small.causes}
    assert "init_too_small" in ids and "sigmoid_in_deep_stack" not in ids
    assert "init_too_small" not in {c.id for c in detect(history(
        geometric(1e-5, n), init_ratio=T.init_scale_low * 1.1))[0].causes}
    # too large an init starves the input side only through saturating units
    relu_large = detect(history(geometric(1e-5, n), init_ratio=T.init_scale_high * 1.5))[0]
    assert "init_too_large" not in {c.id for c in relu_large.causes}
    tanh_large = detect(history(geometric(1e-5, n), acts=["tanh"] * (n - 1) + ["none"],
                                init_ratio=T.init_scale_high * 1.5))[0]
    assert {"tanh_in_deep_stack", "init_too_large"} <= {c.id for c in tanh_large.causes}


def test_synthetic_forward_shrink_cause_boundary() -> None:
    n = 5
    for factor, listed in ((T.forward_shrink_per_layer * 0.95, True),
                           (T.forward_shrink_per_layer * 1.05, False)):
        rms = factor ** np.arange(n)
        f = detect(history(geometric(1e-5, n), act_rms=rms))[0]
        assert ("signal_shrinks_forward" in {c.id for c in f.causes}) is listed, factor


def test_deep_sigmoid_net_that_collapses_within_a_few_steps_still_vanishes() -> None:
    """With SGD lr 0.05 the 20-layer sigmoid net's output-side gradient falls 1e7x in six
    steps: only three steps keep an active gradient, each with a ratio below 1e-10."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = torch.sin(2 * x @ (torch.randn(16, 1, generator=g) / 4))
    layers: list[nn.Module] = []
    for i in range(19):
        layers += [nn.Linear(16 if i == 0 else 32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    report = train_full_batch(model, x, y, lr=0.05, steps=40)
    finding = only(report, "vanishing_gradient")
    assert finding.severity == "error"
