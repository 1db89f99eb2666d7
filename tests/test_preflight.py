"""Preflight: one forward/backward at init predicts vanishing/exploding gradients, dead ReLUs
and saturated units on real models, names the init that fixes them, and leaves the model
exactly as it was."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import kaiming_relu_mlp, only, residual_layernorm_mlp
from torch import nn

import gradwatch
from gradwatch.cli import main
from gradwatch.lab.seed002 import DeepNet, seed_data
from gradwatch.report import Report


def apply_remedy(model: nn.Module, code: str) -> None:
    """Run a finding's remedy code on ``model``, as the user would paste it."""
    exec(compile(code, "<remedy>", "exec"), {"nn": nn, "torch": torch, "model": model})


class Net(nn.Module):
    """``depth`` x (Linear + functional activation), then a Linear head."""

    def __init__(self, act: str = "relu", depth: int = 4, width: int = 32, n_in: int = 16,
                 last_bias: float | None = None) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(n_in if i == 0 else width, width)
                                 for i in range(depth))
        self.head = nn.Linear(width, 1)
        self.act = act
        if last_bias is not None:
            nn.init.constant_(self.fcs[-1].bias, last_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.fcs:
            x = F.relu(fc(x)) if self.act == "relu" else torch.tanh(fc(x))
        return self.head(x)


def kaiming_mlp() -> tuple[nn.Module, torch.Tensor]:
    return kaiming_relu_mlp(), torch.randn(64, 8)


def residual_layernorm() -> tuple[nn.Module, torch.Tensor]:
    return residual_layernorm_mlp(), torch.randn(64, 16)


def batchnorm_cnn() -> tuple[nn.Module, torch.Tensor]:
    return (nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Dropout(0.2), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 4)), torch.randn(32, 1, 8, 8))


def gelu_mlp() -> tuple[nn.Module, torch.Tensor]:
    return (nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)), torch.randn(64, 16))


# ------------------------------------------------------------------------------ predictions
def test_seed_sigmoid_net_is_predicted_to_vanish() -> None:
    """SEEDS.md: the default-init sigmoid net's first layer gets ~1e-9 of the last's gradient."""
    x, y = seed_data()
    report = gradwatch.preflight(DeepNet(nn.Sigmoid), x)
    f = only(report, "vanishing_gradient")
    assert f.severity == "error"
    assert f.evidence["grad_norm_ratio_first_to_last"] < 1e-6
    assert f.layers[0] == "layers.0" and "layers.20" not in f.layers
    assert (f.first_step, f.last_step) == (0, 0)
    assert "sigmoid_in_deep_stack" in [c.id for c in f.causes]
    assert [r.id for r in f.remedies][:2] == ["leaky_relu", "kaiming_init"]
    assert report.kinds() == {"vanishing_gradient"}  # it vanishes without saturating
    # The loss's own gradient tells the same story.
    with_loss = gradwatch.preflight(DeepNet(nn.Sigmoid), (x, y), F.mse_loss)
    assert only(with_loss, "vanishing_gradient").severity == "error"
    assert with_loss.preflight["gradient"] == "loss_fn"
    assert with_loss.preflight["loss"] > 0


def test_large_init_is_predicted_to_explode_and_kaiming_fixes_it() -> None:
    model = DeepNet(nn.ReLU, init=lambda w: nn.init.normal_(w, 0, 10))
    x, _ = seed_data()
    f = only(gradwatch.preflight(model, x), "exploding_gradient")
    assert f.severity == "error"
    assert f.evidence["forward_growth"] > 1e10  # SEEDS.md: loss ~1e26 at step 0
    assert f.evidence["output_grad_norm_ratio_first_to_last"] > 1e10
    assert "init_too_large" in [c.id for c in f.causes]
    assert f.remedies[0].id == "kaiming_init"
    fixed = copy.deepcopy(model)
    apply_remedy(fixed, f.remedies[0].code)
    # Kaiming with zero biases on a 1-input, 10-wide net leaves a few sites with many units
    # dead: a fact of that tiny net about capacity (info), not a gradient-scale problem.
    after = gradwatch.preflight(fixed, x)
    assert after.problems == []


def test_default_relu_net_vanishes_and_the_suggested_init_fixes_it() -> None:
    """SEEDS.md: PyTorch's default init starves the ReLU net's first layer; the remedy's own
    code, applied to a copy, removes the prediction: the init that would fix it."""
    model = DeepNet(nn.ReLU)
    x, _ = seed_data()
    f = only(gradwatch.preflight(model, x), "vanishing_gradient")
    assert f.evidence["grad_norm_ratio_first_to_last"] < 1e-3
    assert {"init_too_small", "deep_plain_stack"} <= {c.id for c in f.causes}
    assert f.remedies[0].id == "kaiming_init" and "relu" in f.remedies[0].code
    looser = gradwatch.preflight(model, x, thresholds={"vanishing_ratio": 1e-5})
    assert "vanishing_gradient" not in looser.kinds()
    fixed = copy.deepcopy(model)
    apply_remedy(fixed, f.remedies[0].code)
    after = gradwatch.preflight(fixed, x)
    assert {"vanishing_gradient", "exploding_gradient"}.isdisjoint(after.kinds())
    table = {row["name"]: row for row in after.preflight["layers"]}
    assert table["layers.0"]["grad_norm"] / table["layers.20"]["grad_norm"] > 1e-2
    assert 0.5 < table["layers.2"]["init"]["ratio"] < 2  # now at the Kaiming scale


def test_negative_bias_kills_the_site_it_feeds_and_both_remedies_revive_it() -> None:
    model = Net(last_bias=-3.0)
    x = torch.randn(64, 16)
    report = gradwatch.preflight(model, x)
    f = only(report, "dying_relu")
    assert f.severity == "error"  # every unit of the site is dead
    assert list(f.evidence["sites"]) == ["Net.relu@4"]
    site = f.evidence["sites"]["Net.relu@4"]
    assert site["dead_fraction"] == 1.0 and site["units"] == 32 and site["layer"] == "fcs.3"
    assert site["pre_mean"] < -2.5
    assert f.layers == ["fcs.3"]
    assert f.causes[0].id == "large_negative_bias"
    assert site["revived_by_zero_bias"] > 16
    # No gradient passes the dead site: everything below it is starved.
    vanish = only(report, "vanishing_gradient")
    assert vanish.evidence["grad_norm_ratio_first_to_last"] == 0
    assert vanish.causes[0].id == "dead_units_block_gradient"
    assert [r.id for r in f.remedies] == ["positive_bias_init", "kaiming_init", "leaky_relu"]
    assert 'get_submodule("fcs.3")' in f.remedies[0].code
    for fix in f.remedies[:2]:  # a positive bias on fcs.3; Kaiming weights with zero biases
        fixed = copy.deepcopy(model)
        apply_remedy(fixed, fix.code)
        assert gradwatch.preflight(fixed, x).problems == [], fix.id


@pytest.mark.parametrize(("n_dead", "severity"), [(12, "error"), (6, "warning")])
def test_dead_conv_channels_are_counted_per_channel(n_dead: int, severity: str) -> None:
    """A bias far below zero on some channels: error from dying_fraction_error (50%) of
    them on, warning below, as during training."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    with torch.no_grad():
        model[2].bias[:n_dead] = -20.0  # these channels of the second conv die
    report = gradwatch.preflight(model, torch.randn(16, 3, 8, 8))
    f = only(report, "dying_relu")
    assert f.severity == severity
    site = f.evidence["sites"]["3"]
    assert (site["units"], site["dead_units"], site["layer"]) == (16, n_dead, "2")
    assert site["dead_indices"] == list(range(n_dead))
    assert site["values_per_unit"] == 16 * 8 * 8
    assert f.causes[0].id == "large_negative_bias"
    assert f.remedies[0].id == "positive_bias_init"
    fixed = copy.deepcopy(model)
    apply_remedy(fixed, f.remedies[0].code)
    assert "dying_relu" not in gradwatch.preflight(fixed, torch.randn(16, 3, 8, 8)).kinds()


@pytest.mark.parametrize("init", [nn.init.xavier_uniform_, nn.init.kaiming_uniform_])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seed_xavier_and_kaiming_nets_get_no_warning(init: object, seed: int) -> None:
    """SEEDS.md: both learn (final loss 0.24-0.49). Their 10-wide layers start with some
    units dead, their biases drawn by PyTorch's default init: capacity (info), not a defect
    that preflight could call a warning."""
    torch.manual_seed(seed)  # as gradwatch.lab.seed002.xavier_uniform_relu/kaiming_... do
    model = DeepNet(nn.ReLU, init=init)  # type: ignore[arg-type]
    report = gradwatch.preflight(model, seed_data()[0])
    assert [(f.kind, f.severity, f.summary) for f in report.problems] == []
    f = only(report, "dying_relu")
    assert f.severity == "info" and "capacity" in f.summary
    assert "large_negative_bias" not in [c.id for c in f.causes]
    assert all(s["dead_units"] < s["units"] for s in f.evidence["sites"].values())
    # The same net with a hidden layer's bias far below its pre-activations is an error.
    with torch.no_grad():
        model.layers[8].bias.fill_(-10.0)
    dead = gradwatch.preflight(model, seed_data()[0])
    errors = [f for f in dead.problems if f.kind == "dying_relu"]
    assert [f.severity for f in errors] == ["error"]
    assert list(errors[0].evidence["sites"]) == ["layers.9"]
    assert errors[0].evidence["sites"]["layers.9"]["dead_fraction"] >= 0.9
    assert errors[0].causes[0].id == "large_negative_bias"


def test_preflight_thresholds_are_honoured() -> None:
    model, x = Net(last_bias=-3.0), torch.randn(4, 16)
    # 4 samples: each unit has 4 values, too few to call it dead (preflight_dead_min_values)
    assert "dying_relu" not in gradwatch.preflight(model, x).kinds()
    fewer = gradwatch.preflight(model, x, thresholds={"preflight_dead_min_values": 4})
    assert next(f.severity for f in fewer.findings if f.kind == "dying_relu") == "error"
    # A partly dead site (6 of 16 channels, 37.5%) is only judged from dying_fraction on.
    conv = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 1))
    with torch.no_grad():
        conv[0].bias[:6] = -20.0
    batch = torch.randn(8, 3, 8, 8)
    assert only(gradwatch.preflight(conv, batch), "dying_relu").severity == "warning"
    assert gradwatch.preflight(conv, batch, thresholds={"dying_fraction_error": 0.3}
                               ).findings[0].severity == "error"
    assert "dying_relu" not in gradwatch.preflight(conv, batch,
                                                   thresholds={"dying_fraction": 0.4}).kinds()
    assert "large_negative_bias" not in [c.id for c in only(gradwatch.preflight(
        conv, batch, thresholds={"preflight_bias_revive_fraction": 1.01}), "dying_relu").causes]
    # The forward growth of N(0, 10) weights is judged against preflight_forward_growth.
    big = DeepNet(nn.ReLU, init=lambda w: nn.init.normal_(w, 0, 10))
    grown = only(gradwatch.preflight(big, seed_data()[0]), "exploding_gradient")
    assert grown.evidence["forward_growth"] > 1e10
    higher = gradwatch.preflight(big, seed_data()[0],
                                 thresholds={"preflight_forward_growth": 1e300})
    assert "forward_growth" not in only(higher, "exploding_gradient").evidence


def test_unscaled_inputs_saturate_tanh_and_standardising_them_fixes_it() -> None:
    model = Net("tanh")
    x = 100 * torch.randn(64, 16)
    f = only(gradwatch.preflight(model, x), "saturated_activation")
    site = f.evidence["sites"]["Net.tanh@1"]
    assert site["saturated_fraction"] > 0.9 and site["pre_std"] > 10
    assert list(f.evidence["sites"]) == ["Net.tanh@1"]  # later layers see tanh's +-1 only
    assert f.causes[0].id == "unscaled_inputs"
    assert f.remedies[0].id == "standardize_inputs"
    standardised = (x - x.mean()) / x.std()
    assert gradwatch.preflight(model, standardised).problems == []


def test_nonfinite_output_of_a_finite_batch_is_a_finding_not_an_error() -> None:
    class LogNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.log(self.fc(x)))  # log of negative pre-activations

    f = only(gradwatch.preflight(LogNet(), torch.randn(32, 4)), "nonfinite")
    assert f.severity == "error" and f.layers == ["head"]
    assert f.causes[0].id == "invalid_forward_op"


# ------------------------------------------------------------------------------ sites
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) + x.sigmoid() * torch.tanh(self.fc(x))


class Mixed(nn.Module):
    """Functional, in-place, method and module activations, a shared module, a ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.blocks = nn.ModuleList([Block()])
        self.clip = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = self.fc2(x).relu_()
        x = self.act(self.fc3(x))
        x = self.act(F.relu(2 * x, inplace=True))
        return self.clip(self.blocks[0](x))


def test_activation_sites_are_named_by_the_module_they_run_in() -> None:
    report = gradwatch.preflight(Mixed(), torch.randn(32, 8))
    sites = report.preflight["sites"]
    assert [(s["name"], s["kind"]) for s in sites] == [
        ("Mixed.relu@1", "relu"), ("Mixed.relu@2", "relu"), ("act@1", "relu"),
        ("Mixed.relu@3", "relu"), ("act@2", "relu"), ("blocks.0.tanh@1", "tanh"),
        ("blocks.0.sigmoid@1", "sigmoid"), ("blocks.0.tanh@2", "tanh"), ("clip", "relu6")]
    assert [s["layer"] for s in sites[:3]] == ["fc1", "fc2", "fc3"]
    assert all(s["functional"] for s in sites if "@" in s["name"] and "act" not in s["name"])
    assert report.problems == []


# ------------------------------------------------------------------------------ healthy
@pytest.mark.parametrize("build", [kaiming_mlp, residual_layernorm, batchnorm_cnn, gelu_mlp])
def test_healthy_models_get_no_warning(build: object) -> None:
    model, x = build()  # type: ignore[operator]
    report = gradwatch.preflight(model, x)
    assert [(f.kind, f.summary) for f in report.problems] == []
    rows = [r for r in report.preflight["layers"] if r["fan_in"]]
    assert all(r["grad_norm"] > 0 and r["output_rms"] > 0 for r in rows)


def test_transformer_with_token_ids_in_a_dict_and_a_loss() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 50)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(self.emb(ids)))

    ids = torch.randint(0, 50, (8, 12))
    report = gradwatch.preflight(Tiny(), ({"ids": ids}, ids),
                                 lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten()))
    assert report.problems == []
    assert [s["name"] for s in report.preflight["sites"]] == ["enc.layers.0.relu@1",
                                                              "enc.layers.1.relu@1"]


# ------------------------------------------------------------------------------ no side effects
class Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Linear(12, 12)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(self.drop(F.relu(self.bn(self.fc(x))))))


def snapshot(model: nn.Module) -> dict[str, object]:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "grads": {n: None if p.grad is None else (p.grad, p.grad.clone())
                      for n, p in model.named_parameters()},
            "modes": {n: m.training for n, m in model.named_modules()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "rng": torch.get_rng_state(), "py": random.getstate(),
            "np": np.random.get_state()[1].copy()}


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    state = model.state_dict()
    assert set(state) == set(before["state"])  # type: ignore[arg-type]
    for k, v in before["state"].items():  # type: ignore[attr-defined]
        assert torch.equal(state[k], v), k
    for n, p in model.named_parameters():
        old = before["grads"][n]  # type: ignore[index]
        if old is None:
            assert p.grad is None, n
        else:
            assert p.grad is old[0] and torch.equal(p.grad, old[1]), n
    assert {n: m.training for n, m in model.named_modules()} == before["modes"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["requires_grad"]
    assert torch.equal(torch.get_rng_state(), before["rng"])  # type: ignore[arg-type]
    assert random.getstate() == before["py"]
    assert np.array_equal(np.random.get_state()[1], before["np"])  # type: ignore[arg-type]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0  # the activation spy is gone


def test_preflight_leaves_the_model_bit_identical() -> None:
    model = Stateful()
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    F.mse_loss(model(x), y).backward()  # grads on fc, bn, head; the frozen layer has none
    model.head.weight.grad = None
    model.drop.eval()  # a mixed-mode model
    before = snapshot(model)
    report = gradwatch.preflight(model, x)
    assert_unchanged(model, before)
    assert report.preflight["model_mode"] == "mixed"
    gradwatch.preflight(model, (x, y), F.mse_loss)
    assert_unchanged(model, before)
    # The test can fail: a forward in training mode does move BatchNorm's statistics.
    model(x)
    assert not torch.equal(model.bn.running_mean, before["state"]["bn.running_mean"])  # type: ignore[index]


def test_a_forward_that_raises_leaves_no_hook_and_no_trace() -> None:
    model, x = Stateful(), torch.randn(32, 5)  # 5 features where the model takes 6
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"forward raised RuntimeError: .*tensor \(32, 5\)"):
        gradwatch.preflight(model, x)
    assert_unchanged(model, before)


def test_preflight_is_reproducible_with_dropout() -> None:
    model, x = batchnorm_cnn()
    a = gradwatch.preflight(model, x).preflight["layers"]
    b = gradwatch.preflight(model, x).preflight["layers"]
    assert a == b


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("model", "batch", "loss_fn", "error", "match"), [
    ([nn.Linear(2, 2)], torch.randn(4, 2), None, TypeError, "expects a torch.nn.Module.*list"),
    (nn.ReLU(), torch.randn(4, 2), None, ValueError, "has no parameters"),
    (nn.Linear(2, 2).requires_grad_(False), torch.randn(4, 2), None, ValueError,
     "requires_grad=False"),
    (nn.Linear(2, 2), "not a batch", None, TypeError, "must hold at least one tensor.*got str"),
    (nn.Linear(2, 2), torch.tensor([[1.0, float("nan")]]), None, ValueError,
     "1 non-finite value"),
    (nn.Linear(2, 2), torch.randn(4, 2), F.mse_loss, TypeError, r"pair \(inputs, target\)"),
    (nn.Linear(2, 2), (torch.randn(4, 2), {"label": torch.ones(4)}),
     lambda o, t: F.mse_loss(o, t["labels"]), ValueError, "loss_fn raised KeyError: 'labels'"),
    (nn.Linear(2, 2), (torch.randn(4, 2), torch.randn(4, 2)),
     lambda o, t: F.mse_loss(o, t, reduction="none"), ValueError, "must return a scalar"),
    (nn.Linear(2, 2), torch.randn(4, 2), "mse", TypeError, "loss_fn must be callable"),
    (nn.Linear(2, 2), (torch.randn(4, 2), torch.randn(4, 2)), None, ValueError,
     r"forward raised TypeError.*pass loss_fn or only the inputs"),
])
def test_bad_input_is_a_clear_error(model: object, batch: object, loss_fn: object,
                                    error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        gradwatch.preflight(model, batch, loss_fn)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ report
def test_report_follows_the_contract_and_saves_every_format(tmp_path: Path) -> None:
    report = gradwatch.preflight(DeepNet(nn.Sigmoid), seed_data()[0])
    assert isinstance(report, Report)
    data = json.loads(report.to_json())
    assert data["schema"] == "gradwatch.report/v1"
    assert data["run"]["mode"] == "preflight" and data["run"]["steps"] == 0
    assert data["run"]["status"] == "completed"
    assert [layer["name"] for layer in data["layers"]][:2] == ["layers.0", "layers.2"]
    for f in data["findings"]:
        assert {"kind", "severity", "first_step", "last_step", "layers", "summary", "evidence",
                "causes", "remedies"} <= set(f)
    assert len(data["preflight"]["layers"]) == 11 and len(data["series"]["grad_norm"]) == 11
    for suffix in ("json", "html", "txt"):
        report.save(tmp_path / f"r.{suffix}")
    assert Report.load(tmp_path / "r.json").kinds() == {"vanishing_gradient"}
    assert "layers.18" in (tmp_path / "r.html").read_text()
    text = report.summary()
    assert "preflight" in text.splitlines()[0] and "bwd gain" in text
    assert "vanishing_gradient" in text


# ------------------------------------------------------------------------------ CLI
MODELS = '''
import torch
from torch import nn

def sigmoid_net():
    layers = [m for i in range(10) for m in (nn.Linear(1 if i == 0 else 10, 10), nn.Sigmoid())]
    return nn.Sequential(*layers, nn.Linear(10, 1))

def healthy():
    lin = nn.Linear(8, 64)
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    return nn.Sequential(lin, nn.ReLU(), nn.Linear(64, 1)), torch.randn(64, 8)

def dead_bias():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    nn.init.constant_(model[0].bias, -5.0)
    return model

def broken():
    raise RuntimeError("no data here")

NOT_CALLABLE = 3
'''


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "mymodels.py"
    path.write_text(MODELS)
    return path


def test_cli_check_exit_status_and_json(models_file: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pre.json"
    code = main(["check", f"{models_file}:sigmoid_net", "--input-shape", "100,1",
                 "--json", str(out)])
    assert code == 1
    assert "vanishing_gradient" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["run"]["mode"] == "preflight"
    assert [f["kind"] for f in data["findings"]] == ["vanishing_gradient"]
    assert main(["check", f"{models_file}:healthy", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_check_honours_preflight_thresholds(models_file: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    target = f"{models_file}:sigmoid_net"
    assert main(["check", target, "--input-shape", "100,1", "--quiet"]) == 1
    assert main(["check", target, "--input-shape", "100,1", "--quiet",
                 "--threshold", "vanishing_ratio=1e-30"]) == 0
    # 4 samples: 4 values per unit, too few to call the dead site dead by default
    dead = f"{models_file}:dead_bias"
    assert main(["check", dead, "--input-shape", "4,8", "--quiet"]) == 0
    assert main(["check", dead, "--input-shape", "4,8",
                 "--threshold", "preflight_dead_min_values=4"]) == 1
    out = capsys.readouterr().out
    assert "ERROR dying_relu" in out and "positive_bias_init" in out


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from gradwatch.cli import COMMANDS

    assert main([]) == 2
    usage = capsys.readouterr().out
    assert usage.startswith("usage: gradwatch {" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        assert f"\n  {name} " in usage


def test_cli_check_imports_a_module_from_the_current_folder(
        models_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(models_file.parent)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    assert main(["check", "mymodels:healthy", "--quiet"]) == 0


@pytest.mark.parametrize(("target", "extra", "message"), [
    ("{file}:nope", [], "has no 'nope'"),
    ("{file}:NOT_CALLABLE", [], "is a int, not callable"),
    ("{file}:broken", [], "broken() raised RuntimeError: no data here"),
    ("{file}:sigmoid_net", [], "returned only a model: give --input-shape"),
    ("{file}:healthy", ["--input-shape", "4,8"], "drop --input-shape"),
    ("{dir}/missing.py:make", [], "no such file"),
    ("surely_no_such_module_xyz:make", [], "no module named 'surely_no_such_module_xyz'"),
])
def test_cli_check_errors_are_one_line(models_file: Path, target: str, extra: list[str],
                                       message: str, capsys: pytest.CaptureFixture[str]) -> None:
    arg = target.format(file=models_file, dir=models_file.parent)
    assert main(["check", arg, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_check_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["check"], ["check", "no_colon"], ["check", "m:f", "--input-shape", "a,b"],
                 ["check", "m:f", "--threshold", "nope=1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["check", "--help"])
    assert exc.value.code == 0
    assert "exit status: 0" in capsys.readouterr().out
