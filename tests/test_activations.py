"""dying_relu and saturated_activation on real models: modules and functional calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from tests.conftest import LabRuns, deep_net, only, seed_data, train_full_batch


def _problems(report: gradwatch.Report, kind: str) -> list[gradwatch.Finding]:
    return [f for f in report.problems if f.kind == kind]


class FunctionalNet(nn.Module):
    """ReLU the four functional ways real models write it, after four Linear layers."""

    def __init__(self, bias: float = 0.0, width: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, width), nn.Linear(width, width)
        self.fc3, self.fc4 = nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, 1)
        with torch.no_grad():
            self.fc3.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = self.fc3(x).relu()
        x = F.relu(self.fc4(x), inplace=True)
        return self.head(x)


def _regression(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 10)
    return x, x[:, :3].sum(1, keepdim=True)


def test_functional_relu_sites_are_named_by_module_and_call_count() -> None:
    x, y = _regression()
    report = train_full_batch(FunctionalNet(bias=-4.0), x, y, lr=1e-3, steps=40,
                              optimizer="adam")
    sites = [s["name"] for s in report.to_dict()["facts"]["sites"]]
    assert sites == ["FunctionalNet.relu@1", "FunctionalNet.relu@2", "FunctionalNet.relu@3",
                     "FunctionalNet.relu@4"]
    finding = only(report, "dying_relu")
    assert finding.severity == "error"
    assert finding.evidence["site"] == "FunctionalNet.relu@3"
    assert finding.evidence["feeding_layer"] == "fc3"
    assert finding.evidence["dead_units"] == finding.evidence["units"] == 32
    assert finding.evidence["bias_dead_mean"] < -3.9
    assert finding.evidence["dead_since_step"] == 0
    ids = [c.id for c in finding.causes]
    assert ids[:2] == ["large_negative_bias", "dead_at_init"]
    assert {r.id for r in finding.remedies} >= {"leaky_relu", "positive_bias_init"}
    assert 'get_submodule("fc3").bias.fill_(0.01)' in \
        next(r.code for r in finding.remedies if r.id == "positive_bias_init")
    # The dead site also blocks every gradient to the layers before it.
    vanishing = only(report, "vanishing_gradient")
    assert vanishing.causes[0].id == "dead_units_block_gradient"
    assert report.series["dead_fraction"]["FunctionalNet.relu@3"][-1] == 1.0


def test_dead_sites_behind_an_entirely_dead_one_are_named_with_it() -> None:
    # relu@3 is dead for every input; relu@4 then sees only fc4's bias: the 24 units whose
    # bias is negative are dead too, as a consequence, and are named in the same finding.
    model = FunctionalNet(bias=-4.0)
    with torch.no_grad():
        model.fc4.bias[:24], model.fc4.bias[24:] = -1.0, 1.0
    x, y = _regression()
    report = train_full_batch(model, x, y, lr=1e-3, steps=40, optimizer="adam")
    finding = only(report, "dying_relu")  # one finding, not one per dead site
    assert finding.evidence["site"] == "FunctionalNet.relu@3"
    [behind] = finding.evidence["dead_behind"]
    assert behind["site"] == "FunctionalNet.relu@4"
    assert (behind["dead_units"], behind["units"]) == (24, 32)
    assert "FunctionalNet.relu@4" in finding.layers
    assert "Behind it, fed only a constant, FunctionalNet.relu@4 (24 of 32 units from step " \
        "0) are dead too." in finding.summary


def test_partly_dead_module_site_with_its_dead_units_listed() -> None:
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:10] = -8.0  # 10 of 16 units can never fire on N(0,1) inputs
    x, y = _regression()
    finding = only(train_full_batch(model, x, y, lr=1e-2, steps=30), "dying_relu")
    assert finding.evidence["site"] == "1"
    assert finding.summary.split(" units at ")[1].startswith("layer 1 (relu)")
    assert finding.evidence["dead_units"] == 10
    assert finding.evidence["dead_unit_indices"] == list(range(10))
    # 62% >= dying_fraction_error, but the other 6 units carry the fit on: a warning.
    assert finding.severity == "warning"
    learned = finding.evidence["still_learning"]
    assert learned["loss_last"] < 0.9 * learned["loss_when_dead"]
    assert "still learns" in finding.summary


def test_partly_dead_site_in_a_model_that_stopped_learning_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:10] = -8.0
    x, y = _regression()
    # A rate so small that the loss does not move: the dead units are all the news.
    finding = only(train_full_batch(model, x, y, lr=1e-9, steps=30), "dying_relu")
    assert finding.severity == "error"
    assert finding.evidence["still_learning"] is None


def test_learning_rate_spike_kills_units_and_is_named_as_the_cause() -> None:
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _regression()
    with gradwatch.watch(model, opt) as gw:
        for step in range(200):
            for group in opt.param_groups:
                group["lr"] = 5.0 if step == 60 else 0.01
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finding = only(gw.report(), "dying_relu")
    assert finding.evidence["site"] == "3"
    assert finding.evidence["dead_fraction_first_measurement"] < 0.05
    assert 60 < finding.evidence["dead_since_step"] <= 64
    assert finding.causes[0].id == "learning_rate_spike"
    assert "rose to 5 at step 60" in finding.causes[0].text
    # The spike's update moved the weights, not mainly the bias: the pre-activations sit
    # well below the dead units' bias, so the bias is not blamed, the weights are.
    ids = [c.id for c in finding.causes]
    assert "large_negative_bias" not in ids and "weights_push_below_zero" in ids
    ev = finding.evidence
    assert ev["pre_activation_mean"]["last"] < 2 * ev["bias_dead_mean"] < 0
    assert finding.remedies[0].id == "lower_learning_rate"


def test_conv_net_counts_dead_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].bias[:6] = -20.0  # 6 of 8 channels dead everywhere
    x = torch.randn(32, 3, 8, 8)
    y = torch.randint(0, 2, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(24):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    report = gw.report()
    finding = only(report, "dying_relu")
    assert finding.evidence["site"] == "3"
    assert finding.evidence["units"] == 8  # channels, not 8 x 6 x 6 positions
    assert finding.evidence["dead_units"] == 6
    assert report.series["dead_fraction"]["1"][-1] == 0.0


def test_tanh_on_unscaled_inputs_saturates_with_the_inputs_as_cause() -> None:
    x = torch.randn(256, 8) * 100
    y = torch.sin(x[:, :1] / 100)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    report = train_full_batch(model, x, y, lr=1e-3, steps=40, optimizer="adam")
    finding = only(report, "saturated_activation")
    assert finding.evidence["site"] == "1"
    assert finding.evidence["feeding_layer_is_first"] is True
    assert finding.evidence["saturated_fraction"] > 0.8
    assert finding.evidence["pre_activation_rms"]["first"] > 20
    ids = [c.id for c in finding.causes]
    assert ids[:2] == ["large_preactivations", "unscaled_inputs"]
    assert finding.remedies[0].id == "standardize_inputs"
    # The same model on standardised inputs does not saturate.
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    clean = train_full_batch(model, x / 100, y, lr=1e-3, steps=40, optimizer="adam")
    assert not _problems(clean, "saturated_activation")


def test_functional_sigmoid_with_large_weights_saturates() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(16, 64), nn.Linear(64, 1)
            nn.init.normal_(self.fc.weight, std=3.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.sigmoid(self.fc(x)))

    x = torch.randn(128, 16)
    report = train_full_batch(Gate(), x, x[:, :1], lr=1e-2, steps=30)
    finding = only(report, "saturated_activation")
    assert finding.evidence["site"] == "Gate.sigmoid@1"
    assert "init_too_large" in [c.id for c in finding.causes]
    assert any(r.id == "xavier_init" for r in finding.remedies)


def test_deep_sigmoid_net_vanishes_without_saturating() -> None:
    """SEEDS.md: the default-init sigmoid stack starves its input side, yet its units sit
    near 0.5, not at the bounds. Two findings, each only where measured."""
    x, y = seed_data()
    report = train_full_batch(deep_net(nn.Sigmoid), x, y, lr=0.01, steps=60)
    assert _problems(report, "vanishing_gradient")
    assert not _problems(report, "saturated_activation")
    saturated = report.series["saturated_fraction"]
    values = [v for s in saturated.values() for v in s if v is not None]
    assert len(saturated) == 10 and max(values) < 0.5


def test_healthy_relu_net_has_transient_zeros_but_no_dying_finding() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(100):
            x = torch.randn(16, 10, generator=gen)  # small batches: zeros come and go
            loss = F.mse_loss(model(x), x[:, :3].sum(1, keepdim=True))
            opt.zero_grad()
            loss.backward()
            opt.step()
    report = gw.report()
    assert not report.problems, [f.summary for f in report.problems]
    assert set(report.series["dead_fraction"]) == {"1", "3"}


def test_site_measurement_does_not_change_the_training() -> None:
    x, y = _regression(64)
    losses = []
    for watched in (False, True):
        torch.manual_seed(0)
        model = FunctionalNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gw = gradwatch.watch(model, opt) if watched else None
        run = []
        for _ in range(12):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        if gw is not None:
            gw.close()
            assert len(gw.report().to_dict()["facts"]["sites"]) == 4
        losses.append(run)
    assert losses[0] == losses[1]


def test_units_dead_from_init_in_a_stalled_net_are_one_warning(lab: LabRuns) -> None:
    """SEEDS.md section 7: the default-init ReLU stack stalls with 20-80% of its units dead
    from step 0. One finding sums the sites up, with the init as the cause, next to the
    vanishing finding; the Kaiming-init net's narrow dead layers are only info.

    Both runs (seed 0) are the lab's, shared with test_demo.py (the session fixture
    ``lab``): the relu arm of sigmoid_vs_relu is seed002.relu_default_init (run for
    conftest.LAB_LENGTH's 200 epochs: it has stalled by then), the kaiming arm of
    xavier_vs_kaiming is seed002.kaiming_uniform_relu (500 epochs)."""
    from gradwatch.lab import EXPERIMENTS, seed002

    assert EXPERIMENTS["sigmoid_vs_relu"].arm("relu").run is seed002.relu_default_init
    assert EXPERIMENTS["xavier_vs_kaiming"].arm("kaiming").run is seed002.kaiming_uniform_relu
    relu = lab.run("sigmoid_vs_relu", "relu", 0)
    assert relu.final_loss == pytest.approx(seed002.constant_prediction_loss(), abs=0.02)
    report = relu.report
    finding = only(report, "dying_relu")
    assert finding.severity == "warning"
    assert finding.evidence["gradient_vanishes"] is True
    assert len(finding.evidence["sites"]) >= 5
    assert finding.remedies[0].id == "kaiming_init"
    assert "init_too_small" in [c.id for c in finding.causes]
    assert "where 7 of 10 units are dead" in only(report, "vanishing_gradient").summary
    healthy = lab.run("xavier_vs_kaiming", "kaiming", 0).report
    assert [f.severity for f in healthy.findings if f.kind == "dying_relu"] == ["info"]


def test_predictions_after_training_are_not_measured_as_training_activations() -> None:
    """Forwards in eval mode (gradients left on) after the last step do not count: four
    predictions on one sample once made 20 healthy units look dead."""
    x = torch.randn(256, 4)
    y = x.sum(1, keepdim=True).sin()
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(64):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        model.eval()
        sample = torch.randn(1, 4)
        for _ in range(4):
            model(sample)
    report = gw.report()
    assert [f.kind for f in report.findings if f.kind == "dying_relu"] == []
    assert report.series["dead_fraction"]["1"][-1] < 0.25
