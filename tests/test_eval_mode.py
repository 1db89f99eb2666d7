"""eval_mode: validation under ``torch.no_grad()``/``inference_mode()`` with Dropout or
BatchNorm still in training mode is found, measured, and measured without changing the
user's model; the same loop with ``model.eval()`` and models without such layers are not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from conftest import only
from torch import nn

import gradwatch
from gradwatch.judge import registry as causes
from gradwatch.runner import run_script

SCRIPTS = Path(__file__).parent / "scripts"
EPOCHS, TRAIN_BATCHES, VAL_BATCHES = 3, 4, 3


def mlp(dropout: float = 0.3, batch_norm: bool = True) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear; layer '1' is the BN, '3' the Dropout."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32) if batch_norm else nn.Identity(),
                         nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 1))


def data() -> tuple[torch.Tensor, ...]:
    """Training batches and a validation set from a shifted distribution (as real ones are)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TRAIN_BATCHES * 32, 6, generator=g)
    xv = 1.5 * torch.randn(VAL_BATCHES * 16, 6, generator=g) + 0.5
    return x, torch.sin(x[:, :1] - x[:, 1:2]), xv, torch.sin(xv[:, :1] - xv[:, 1:2])


def fit(model: nn.Module, call_eval: bool, no_grad: Callable[[], Any] = torch.no_grad,
        watch: bool = True, on_first_validation: Callable[[torch.Tensor], None] | None = None
        ) -> tuple[gradwatch.Report | None, list[torch.Tensor]]:
    """Adam on mini-batches, a validation pass after every epoch; the validation outputs."""
    x, y, xv, _ = data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    outputs: list[torch.Tensor] = []
    gw = gradwatch.watch(model, opt) if watch else None
    try:
        for _ in range(EPOCHS):
            for i in range(0, len(x), 32):
                opt.zero_grad()
                nn.functional.mse_loss(model(x[i: i + 32]), y[i: i + 32]).backward()
                opt.step()
            if call_eval:
                model.eval()
            with no_grad():
                for j in range(0, len(xv), 16):
                    if on_first_validation is not None and not outputs:
                        on_first_validation(xv[j: j + 16])
                    outputs.append(model(xv[j: j + 16]).clone())
            model.train()
    finally:
        if gw is not None:
            gw.close()
    return (gw.report() if gw is not None else None), outputs


def eval_mode_findings(report: gradwatch.Report) -> list[gradwatch.Finding]:
    assert report.run["internal_errors"] == []
    return [f for f in report.findings if f.kind == "eval_mode"]


# --------------------------------------------------------------------------- found
def test_validation_without_eval_is_found_with_its_evidence() -> None:
    model = mlp()
    reference: dict[str, torch.Tensor] = {}

    def eval_mode_output(xv: torch.Tensor) -> None:
        # The slow reference: an unwatched copy in eval mode, BN stats as before the pass.
        copy = mlp()
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            reference["eval"] = copy.eval()(xv)

    report, outputs = fit(model, call_eval=False, on_first_validation=eval_mode_output)
    f = only(report, "eval_mode")
    assert f.severity == "warning"
    assert f.layers == ["1", "3"]
    ev = f.evidence
    assert ev["no_grad_forwards_in_training_mode"] == EPOCHS * VAL_BATCHES
    assert ev["inference_mode_forwards"] == 0
    assert (ev["first_step"], ev["last_step"]) == (TRAIN_BATCHES, EPOCHS * TRAIN_BATCHES)
    assert (f.first_step, f.last_step) == (TRAIN_BATCHES, EPOCHS * TRAIN_BATCHES)
    assert (ev["passes"], ev["longest_pass"]) == (EPOCHS, VAL_BATCHES)
    assert [r["name"] for r in ev["dropout_layers"]] == ["3"]
    assert ev["dropout_layers"][0]["p"] == 0.3
    assert [(r["name"], r["type"]) for r in ev["batchnorm_layers"]] == [("1", "BatchNorm1d")]
    # The measured difference is the one an unwatched eval-mode copy gives.
    train_out, eval_out = outputs[0], reference["eval"]
    expected = float((train_out - eval_out).norm() / eval_out.norm())
    assert ev["rerun"] == "ok"
    assert abs(ev["output_rel_diff"] - expected) <= 1e-5 * expected
    assert ev["output_rel_diff"] > 0.1
    assert abs(ev["output_max_abs_diff"] - float((train_out - eval_out).abs().max())) < 1e-6
    # BatchNorm ran its statistics over the validation batches.
    assert ev["batchnorm_stats_updated"] is True
    assert ev["bn_first_pass_change"] > 0.01
    assert ev["bn_num_batches_tracked_after"] - ev["bn_num_batches_tracked_before"] == \
        VAL_BATCHES
    assert abs(ev["bn_share_from_longest_pass"] - (1 - 0.9 ** VAL_BATCHES)) < 1e-9
    assert [c.id for c in f.causes] == ["dropout_active_in_eval",
                                        "batchnorm_stats_updated_by_eval"]
    assert all(c.id in causes.CAUSE_IDS for c in f.causes)
    assert [r.id for r in f.remedies] == ["call_model_eval", "recompute_bn_statistics"]
    assert "model.eval()" in f.remedies[0].code and "model.train()" in f.remedies[0].code
    assert "9 forwards" in f.summary and "torch.no_grad()" in f.summary


def test_inference_mode_validation_is_found() -> None:
    report, _ = fit(mlp(), call_eval=False, no_grad=torch.inference_mode)
    f = only(report, "eval_mode")
    assert f.severity == "warning"
    assert f.evidence["inference_mode_forwards"] == EPOCHS * VAL_BATCHES
    assert f.evidence["rerun"] == "ok" and f.evidence["output_rel_diff"] > 0.1
    assert f.evidence["batchnorm_stats_updated"] is True
    assert "torch.inference_mode()" in f.summary


def test_dropout_alone_is_found_and_named() -> None:
    report, _ = fit(mlp(dropout=0.5, batch_norm=False), call_eval=False)
    f = only(report, "eval_mode")
    assert f.severity == "warning" and f.layers == ["3"]
    assert f.evidence["batchnorm_layers"] == [] and not f.evidence["batchnorm_stats_updated"]
    assert f.evidence["output_rel_diff"] > 0.1
    assert [r.id for r in f.remedies] == ["call_model_eval"]


class FunctionalDropout(nn.Module):
    """Dropout written as ``F.dropout(x, training=self.training)``: no Dropout module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.dropout(torch.relu(self.fc1(x)), 0.3, training=self.training)
        return self.fc2(h)


def test_functional_dropout_is_found_by_its_effect() -> None:
    report, _ = fit(FunctionalDropout(), call_eval=False)
    f = only(report, "eval_mode")
    assert f.severity == "warning" and f.layers == []
    assert f.evidence["output_rel_diff"] > 0.1
    assert [c.id for c in f.causes] == ["training_mode_code_in_eval"]


def test_forward_inside_the_training_step_is_reported_as_such() -> None:
    """A training-accuracy pass under no_grad in every step: found, and said where it runs."""
    model, (x, y, _, _) = mlp(), data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(8):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[:32]), y[:32]).backward()
            opt.step()
            with torch.no_grad():
                model(x[:32])
    f = only(gw.report(), "eval_mode")
    assert f.evidence["longest_pass"] == 1 and f.evidence["steps_with_such_forwards"] == 8
    assert "no_grad_forward_inside_training_step" in [c.id for c in f.causes]


class CachedModel(nn.Module):
    """Takes a cache object that its forward fills: gradwatch must not run it twice."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor, cache: list[Any] | None = None) -> torch.Tensor:
        out = self.net(x)
        if cache is not None:
            cache.append(out)
        return out


class Cache:
    def __init__(self) -> None:
        self.items: list[torch.Tensor] = []

    def append(self, t: torch.Tensor) -> None:
        self.items.append(t)


def test_inputs_that_the_forward_mutates_are_not_run_again() -> None:
    model, (x, y, xv, _) = CachedModel(), data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cache = Cache()
    with gradwatch.watch(model, opt) as gw:
        for i in range(0, len(x), 32):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[i: i + 32]), y[i: i + 32]).backward()
            opt.step()
        with torch.no_grad():
            model(xv[:16], cache=cache)
    assert len(cache.items) == 1  # the user's call only
    f = only(gw.report(), "eval_mode")
    assert f.severity == "warning"
    assert f.evidence["rerun"] == "skipped" and "Cache" in f.evidence["rerun_note"]
    assert f.evidence["output_rel_diff"] is None
    assert f.evidence["no_grad_forwards_in_training_mode"] == 1


# --------------------------------------------------------------------------- not found
def test_validation_with_eval_is_not_found() -> None:
    report, _ = fit(mlp(), call_eval=True)
    assert eval_mode_findings(report) == []
    assert "eval_mode" not in report.to_dict()["facts"]


def test_model_without_mode_dependent_layers_is_not_a_finding() -> None:
    report, _ = fit(mlp(dropout=0.0, batch_norm=False), call_eval=False)
    assert eval_mode_findings(report) == []


def test_transformer_encoder_validated_in_eval_mode_is_healthy() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.1,
                                       batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(16 * 5, 1))
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(64, 5, 16, generator=g), torch.randn(32, 5, 16, generator=g)
    y, yv = x[:, :, 0].mean(1, keepdim=True), xv[:, :, 0].mean(1, keepdim=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    with gradwatch.watch(model, opt) as gw:
        for _ in range(6):
            for i in range(0, 64, 16):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x[i: i + 16]), y[i: i + 16])
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                losses.append(float(nn.functional.mse_loss(model(xv), yv)))
            model.train()
    report = gw.report()
    assert losses[-1] < losses[0]
    assert eval_mode_findings(report) == []
    assert [(f.kind, f.severity) for f in report.problems] == []


def test_transformer_encoder_validated_in_training_mode_names_its_dropouts() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.1,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(8, 5, 16)
    with gradwatch.watch(model, opt) as gw:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        with torch.no_grad():
            model(x)
    f = only(gw.report(), "eval_mode")
    assert f.layers == ["layers.0.self_attn", "layers.0.dropout", "layers.0.dropout1",
                        "layers.0.dropout2"]


# --------------------------------------------------------------------------- untouched
def state(model: nn.Module) -> dict[str, Any]:
    return {"params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()],
            "modes": [m.training for m in model.modules()], "rng": torch.get_rng_state()}


def test_measuring_leaves_the_model_bit_identical() -> None:
    """Two copies of one seeded model through the same loop, one watched: after the loop
    every parameter, buffer (running statistics, num_batches_tracked), module mode and the
    RNG state are bit-identical, and so is every validation output the user saw."""
    watched, bare = mlp(), mlp()
    torch.manual_seed(123)
    report, out_watched = fit(watched, call_eval=False, no_grad=torch.no_grad)
    after_watched = state(watched)
    torch.manual_seed(123)
    _, out_bare = fit(bare, call_eval=False, watch=False)
    after_bare = state(bare)
    assert only(report, "eval_mode").evidence["rerun"] == "ok"  # the re-run did happen
    for key in ("params", "buffers"):
        assert len(after_watched[key]) == len(after_bare[key])
        for a, b in zip(after_watched[key], after_bare[key], strict=True):
            assert torch.equal(a, b), key
    assert after_watched["modes"] == after_bare["modes"]
    assert torch.equal(after_watched["rng"], after_bare["rng"])
    assert all(torch.equal(a, b) for a, b in zip(out_watched, out_bare, strict=True))


class InPlaceInput(nn.Module):
    """Scales its input in place, as preprocessing inside forward sometimes does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mul_(0.5))


def test_input_changed_in_place_by_the_forward_is_changed_once() -> None:
    model, (x, y, xv, _) = InPlaceInput(), data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = xv[:16].clone()
    with gradwatch.watch(model, opt) as gw:
        opt.zero_grad()
        nn.functional.mse_loss(model(x[:32].clone()), y[:32]).backward()
        opt.step()
        with torch.no_grad():
            model(batch)
    assert torch.equal(batch, xv[:16] * 0.5)
    assert only(gw.report(), "eval_mode").evidence["rerun"] == "ok"


# --------------------------------------------------------------------------- gradwatch run
def test_gradwatch_run_finds_the_forgotten_eval() -> None:
    script = SCRIPTS / "train_forgot_eval.py"
    forgot = run_script(script, ["--epochs", "2"])
    fixed = run_script(script, ["--epochs", "2", "--with-eval"])
    assert forgot.exit_code == 0 and fixed.exit_code == 0
    f = only(forgot.report, "eval_mode")
    assert f.severity == "warning" and f.layers == ["1", "3"]
    assert f.evidence["no_grad_forwards_in_training_mode"] == 2 * 3
    assert f.evidence["rerun"] == "ok" and f.evidence["output_rel_diff"] > 0.1
    assert f.evidence["batchnorm_stats_updated"] is True
    assert f.evidence["rerun_without_keyword_arguments"] is True
    assert eval_mode_findings(fixed.report) == []
