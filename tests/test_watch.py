"""``gradwatch.watch``: hook lifecycle, step counting, input validation and the report."""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.optim import optimizer as optimizer_hooks

import gradwatch
from gradwatch.measure.measures import StepMeasures
from gradwatch.report import atomic

ORIGINAL_BACKWARD = torch.autograd.backward



def mlp(n_in: int = 4, width: int = 16, n_out: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, n_out))


def batch(n: int = 32, n_in: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, n_in)
    return x, x.sum(dim=1, keepdim=True)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
             y: torch.Tensor) -> float:
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def assert_detached(model: nn.Module, *optimizers: torch.optim.Optimizer,
                    globally: bool = True) -> None:
    """No hook is left on the model, its parameters, optimizers (or globally: no watch open)."""
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(mod, attr), f"{attr} left on module {name!r}"
    for name, p in model.named_parameters():
        assert not p._backward_hooks, f"tensor hook left on parameter {name!r}"
        assert not p._post_accumulate_grad_hooks, f"grad hook left on parameter {name!r}"
    for opt in optimizers:
        assert not opt._optimizer_step_pre_hooks, "optimizer step pre-hook left"
        assert not opt._optimizer_step_post_hooks, "optimizer step post-hook left"
    if not globally:
        return
    assert not module_hooks._global_forward_hooks
    assert not module_hooks._global_forward_pre_hooks
    assert not optimizer_hooks._global_optimizer_pre_hooks
    assert not optimizer_hooks._global_optimizer_post_hooks
    assert torch.autograd.backward is ORIGINAL_BACKWARD, "torch.autograd.backward not restored"


# --------------------------------------------------------------------------- lifecycle
def test_hooks_removed_after_normal_exit() -> None:
    model, x = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt) as gw:
        assert gw.hooks > 0
        for _ in range(5):
            sgd_step(model, opt, *x)
    assert gw.hooks == 0
    assert_detached(model, opt)
    report = gw.report()
    assert report.run["status"] == "completed"
    assert report.run["error"] is None
    assert report.run["steps"] == 5


def test_hooks_removed_when_the_loop_raises() -> None:
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with gradwatch.watch(model, opt) as gw:
            for step in range(10):
                sgd_step(model, opt, x if step < 3 else x[:, :2], y)
    assert gw.hooks == 0
    assert_detached(model, opt)
    report = gw.report()
    assert report.run["status"] == "failed"
    assert report.run["error"].startswith("RuntimeError")
    assert "shapes cannot be multiplied" in report.run["error"]
    assert report.run["steps"] == 3
    # The model still trains normally afterwards, unwatched.
    sgd_step(model, opt, x, y)


def test_hooks_removed_on_keyboard_interrupt() -> None:
    model, (x, y) = mlp(), batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(KeyboardInterrupt):
        with gradwatch.watch(model, opt) as gw:
            for step in range(100):
                if step == 7:
                    raise KeyboardInterrupt
                sgd_step(model, opt, x, y)
    assert gw.hooks == 0
    assert_detached(model, opt)
    report = gw.report()
    assert report.run["status"] == "interrupted"
    assert "KeyboardInterrupt" in report.run["error"]
    assert report.run["steps"] == 7
    assert sum(v is not None for v in report.series["loss"]) == 7


def test_no_reference_to_the_model_is_kept_after_exit() -> None:
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(20):
            sgd_step(model, opt, x, y)
    model_ref, weight_ref = weakref.ref(model), weakref.ref(model[0].weight)
    report = gw.report()
    del model, opt
    gc.collect()
    assert model_ref() is None, "the watch keeps the model alive"
    assert weight_ref() is None, "the watch keeps a parameter alive"
    # The watch and its report stay usable without the model.
    assert gw.report().run["steps"] == report.run["steps"] == 20
    assert [layer["name"] for layer in gw.report().layers] == ["0", "2"]


# --------------------------------------------------------------------------- step clock
def test_steps_are_optimizer_steps_across_host_copies() -> None:
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    with gradwatch.watch(model, opt, sync_every=4) as gw:
        for _ in range(13):  # not a multiple of sync_every: the tail must be flushed too
            losses.append(sgd_step(model, opt, x, y))
        assert gw.steps == 13
    report = gw.report()
    assert report.run["steps"] == 13
    assert report.series["step"] == list(range(13))
    assert report.series["loss"] == pytest.approx(losses, rel=1e-6)
    for name in ("0", "2"):
        norms = report.series["grad_norm"][name]
        assert len(norms) == 13 and all(v is not None and v > 0 for v in norms)


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    micro_losses: list[list[float]] = []
    with gradwatch.watch(model, opt) as gw:
        for _ in range(6):
            opt.zero_grad()
            micro_losses.append([])
            for _ in range(4):
                x, y = batch(8)
                loss = nn.functional.mse_loss(model(x), y)
                (loss / 4).backward()
                micro_losses[-1].append(loss.item() / 4)
            opt.step()
    report = gw.report()
    assert report.run["steps"] == 6
    assert report.series["step"] == list(range(6))
    recorded = report.series["loss"]
    assert len(recorded) == 6
    for value, micro in zip(recorded, micro_losses, strict=True):
        # One loss per optimizer step, representative of that step's micro-batches.
        assert value is not None
        assert min(micro) - 1e-6 <= value <= sum(micro) + 1e-6


def test_validation_forwards_under_no_grad_are_not_steps() -> None:
    model, (x, y) = mlp(), batch()
    x_val, y_val = batch(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train_losses = []
    with gradwatch.watch(model, opt) as gw:
        for _ in range(9):
            train_losses.append(sgd_step(model, opt, x, y))
            with torch.no_grad():
                val_loss = nn.functional.mse_loss(model(x_val), y_val)
                model(x_val)
            assert math.isfinite(val_loss.item())
    report = gw.report()
    assert report.run["steps"] == 9
    assert report.series["loss"] == pytest.approx(train_losses, rel=1e-6)


def test_lbfgs_with_closure() -> None:
    model, (x, y) = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), batch()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    closure_losses: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        closure_losses.append(loss.item())
        return loss

    with torch.no_grad():
        initial = nn.functional.mse_loss(model(x), y).item()
    with gradwatch.watch(model, opt) as gw:
        for _ in range(4):
            opt.step(closure)
    report = gw.report()
    assert len(closure_losses) > 4  # LBFGS evaluates the closure several times per step
    assert report.run["steps"] == 4
    assert report.run["internal_errors"] == []
    losses = report.series["loss"]
    assert len(losses) == 4 and all(v is not None for v in losses)
    assert losses[0] == pytest.approx(initial, rel=1e-5)  # loss at the step's start point
    assert losses[-1] < losses[0]


def test_manual_updates_with_explicit_step() -> None:
    model, (x, y) = nn.Linear(4, 1), batch()
    losses = []
    with gradwatch.watch(model) as gw:
        for _ in range(12):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            gw.step(loss)
            losses.append(loss.item())
    report = gw.report()
    assert report.run["steps"] == 12
    assert report.run["internal_errors"] == []
    assert report.series["loss"] == pytest.approx(losses, rel=1e-6)
    assert losses[-1] < losses[0]
    # A model that is itself the only layer still gets a non-empty layer name.
    assert len(report.layers) == 1 and report.layers[0]["name"]
    assert report.layers[0]["params"] == 5
    norms = report.series["grad_norm"][report.layers[0]["name"]]
    assert all(v is not None and v > 0 for v in norms)


def test_two_models_in_two_watches_do_not_mix() -> None:
    small, big = mlp(3, 5), nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 7),
                                          nn.Tanh(), nn.Linear(7, 1))
    opt_small = torch.optim.SGD(small.parameters(), lr=0.05)
    opt_big = torch.optim.Adam(big.parameters(), lr=1e-2)
    xs, ys = batch(32, 3)
    xb, yb = batch(32, 6)
    losses_small, losses_big = [], []
    with gradwatch.watch(small, opt_small) as gw_small, \
            gradwatch.watch(big, opt_big) as gw_big:
        for step in range(11):
            losses_big.append(sgd_step(big, opt_big, xb, yb))
            if step % 3 != 2:
                losses_small.append(sgd_step(small, opt_small, xs, ys))
    assert_detached(small, opt_small)
    assert_detached(big, opt_big)
    r_small, r_big = gw_small.report(), gw_big.report()
    assert r_small.run["steps"] == len(losses_small) == 8
    assert r_big.run["steps"] == len(losses_big) == 11
    assert [layer["params"] for layer in r_small.layers] == [20, 6]
    assert [layer["params"] for layer in r_big.layers] == [49, 56, 8]
    assert r_small.series["loss"] == pytest.approx(losses_small, rel=1e-6)
    assert r_big.series["loss"] == pytest.approx(losses_big, rel=1e-6)
    assert r_small.run["internal_errors"] == r_big.run["internal_errors"] == []


def test_second_watch_keeps_working_after_the_first_closes() -> None:
    a, b = mlp(), mlp()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    x, y = batch()
    losses_b = []
    with gradwatch.watch(b, opt_b) as gw_b:
        with gradwatch.watch(a, opt_a) as gw_a:
            for _ in range(3):
                sgd_step(a, opt_a, x, y)
                losses_b.append(sgd_step(b, opt_b, x, y))
        assert_detached(a, opt_a, globally=False)
        assert gw_b.hooks > 0
        for _ in range(4):
            losses_b.append(sgd_step(b, opt_b, x, y))
    assert_detached(b, opt_b)
    assert gw_a.report().run["steps"] == 3
    report_b = gw_b.report()
    assert report_b.run["steps"] == 7
    assert report_b.series["loss"] == pytest.approx(losses_b, rel=1e-6)


class Reordered(nn.Module):
    """Registers its layers output side first; forward runs them input side first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 1)
        self.middle = nn.Linear(8, 8)
        self.stem = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.middle(torch.relu(self.stem(x)))))


def test_layers_are_reported_in_forward_order() -> None:
    model, (x, y) = Reordered(), batch()
    assert [n for n, _ in model.named_children()] == ["head", "middle", "stem"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(3):
            sgd_step(model, opt, x, y)
    report = gw.report()
    assert [layer["name"] for layer in report.layers] == ["stem", "middle", "head"]
    assert [layer["depth"] for layer in report.layers] == [0, 1, 2]
    assert list(report.series["grad_norm"]) == ["stem", "middle", "head"]


# --------------------------------------------------------------------------- bad input
def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        gradwatch.watch([nn.Linear(2, 2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        gradwatch.watch(lambda x: x)  # type: ignore[arg-type]


def test_model_needs_trainable_parameters() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradwatch.watch(nn.ReLU())
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradwatch.watch(frozen)
    assert_detached(frozen)


def test_optimizer_must_be_an_optimizer() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        gradwatch.watch(model, "sgd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got int"):
        gradwatch.watch(model, [opt, 3])  # type: ignore[list-item]
    assert_detached(model, opt)


def test_optimizer_of_another_model_is_rejected() -> None:
    model, other = mlp(), mlp()
    opt_other = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        gradwatch.watch(model, opt_other)
    assert_detached(model, opt_other)


def test_unknown_option_lists_the_allowed_ones() -> None:
    model = mlp()
    with pytest.raises(TypeError, match="sync_evry") as info:
        gradwatch.watch(model, sync_evry=8)
    for allowed in ("sync_every", "detail_every", "every", "capacity", "strict", "thresholds"):
        assert allowed in str(info.value)
    assert_detached(model)


@pytest.mark.parametrize("option, value", [
    ("sync_every", 0), ("sync_every", -4), ("sync_every", 2.5), ("sync_every", "64"),
    ("sync_every", True), ("every", 0), ("detail_every", 0), ("capacity", 15),
    ("capacity", 17), ("capacity", 0), ("strict", "yes"),
])
def test_bad_option_values_are_rejected(option: str, value: object) -> None:
    model = mlp()
    with pytest.raises((TypeError, ValueError), match=option):
        gradwatch.watch(model, **{option: value})
    assert_detached(model)


def test_thresholds_are_validated() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="unknown threshold 'vanishing_ratoi'") as info:
        gradwatch.watch(model, thresholds={"vanishing_ratoi": 1e-4})
    assert "vanishing_ratio" in str(info.value)  # the known names are listed
    with pytest.raises(ValueError, match="vanishing_ratio"):
        gradwatch.watch(model, thresholds={"vanishing_ratio": -1.0})
    with pytest.raises(ValueError, match="vanishing_ratio"):
        gradwatch.watch(model, thresholds={"vanishing_ratio": float("nan")})
    with pytest.raises(TypeError, match="vanishing_ratio"):
        gradwatch.watch(model, thresholds={"vanishing_ratio": "small"})
    assert_detached(model)
    with gradwatch.watch(model, thresholds={"vanishing_ratio": 1e-4}) as gw:
        pass
    assert gw.monitor.thresholds.vanishing_ratio == 1e-4


# --------------------------------------------------------------------------- strict mode
def _train_copy(strict: bool | None, steps: int = 8) -> tuple[nn.Module, gradwatch.Watch | None]:
    torch.manual_seed(1)
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if strict is None:
        for _ in range(steps):
            sgd_step(model, opt, x, y)
        return model, None
    with gradwatch.watch(model, opt, strict=strict) as gw:
        for _ in range(steps):
            sgd_step(model, opt, x, y)
    return model, gw


def _broken_grad_row(self: StepMeasures, row: int, key: str) -> None:
    raise RuntimeError("injected failure inside gradwatch")


def test_internal_error_does_not_break_training(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _ = _train_copy(strict=None)
    monkeypatch.setattr(StepMeasures, "gradients", _broken_grad_row)
    watched, gw = _train_copy(strict=False)
    assert gw is not None
    for p, q in zip(reference.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q), "training under a failing gradwatch differs from bare training"
    report = gw.report()
    assert report.run["status"] == "completed"
    assert any("injected failure inside gradwatch" in e for e in report.run["internal_errors"])
    assert gw.hooks == 0
    assert torch.autograd.backward is ORIGINAL_BACKWARD
    json.loads(report.to_json())


def test_strict_mode_reraises_internal_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StepMeasures, "gradients", _broken_grad_row)
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(RuntimeError, match="injected failure inside gradwatch"):
        with gradwatch.watch(model, opt, strict=True) as gw:
            sgd_step(model, opt, x, y)
    assert_detached(model, opt)
    assert gw.report().run["status"] == "failed"


# --------------------------------------------------------------------------- report
CONTRACT_FINDING_KEYS = {"kind", "severity", "first_step", "last_step", "layers", "summary",
                         "evidence", "causes", "remedies"}


@pytest.fixture(scope="module")
def diverging_report() -> gradwatch.Report:
    """Linear regression on unscaled inputs with a far too large learning rate."""
    torch.manual_seed(0)
    x = torch.randn(100, 1) * 10
    y = 3 * x + 2
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(30):
            sgd_step(model, opt, x, y)
    return gw.report()


def test_json_report_has_the_contract_keys(diverging_report: gradwatch.Report) -> None:
    data = json.loads(diverging_report.to_json())
    assert data["schema"] == "gradwatch.report/v1"
    assert data["tool"] == {"name": "gradwatch", "version": gradwatch.__version__}
    assert {"steps", "status", "error", "duration_s"} <= set(data["run"])
    assert data["run"]["steps"] == 30 and data["run"]["status"] == "completed"
    [layer] = data["layers"]
    assert layer["name"] and {"type": "Linear", "depth": 0, "params": 2}.items() <= layer.items()
    assert data["findings"], "a diverging run must have findings"
    for finding in data["findings"]:
        assert CONTRACT_FINDING_KEYS <= set(finding)
        assert finding["kind"] in gradwatch.KINDS
        assert finding["severity"] in ("error", "warning", "info")
        assert isinstance(finding["summary"], str) and finding["summary"]
        assert all({"id", "text"} <= set(c) for c in finding["causes"])
        assert all({"id", "text", "code"} <= set(r) for r in finding["remedies"])
    assert {"loss", "grad_norm", "dead_fraction"} <= set(data["series"])
    assert len(data["series"]["loss"]) == 30
    # Strict JSON: no NaN/Infinity tokens even though the run blew up.
    json.loads(diverging_report.to_json(), parse_constant=lambda c: pytest.fail(c))


def test_save_formats_atomically(diverging_report: gradwatch.Report, tmp_path: Path) -> None:
    for name in ("r.json", "r.html", "r.txt"):
        assert Path(diverging_report.save(tmp_path / name)).exists()
    diverging_report.save(tmp_path / "r.json")  # overwriting is fine too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json", "r.txt"]
    saved = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert saved == json.loads(diverging_report.to_json())
    assert gradwatch.Report.load(tmp_path / "r.json").run == diverging_report.run
    assert (tmp_path / "r.html").read_text(encoding="utf-8").lstrip().lower().startswith(
        "<!doctype html")
    assert "30 steps" in (tmp_path / "r.txt").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match=r"r\.csv"):
        diverging_report.save(tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json", "r.txt"]


def test_failed_save_leaves_the_old_file_and_no_temp_file(
        diverging_report: gradwatch.Report, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.json"
    target.write_text("old", encoding="utf-8")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        diverging_report.save(target)
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _evil_model() -> nn.Module:
    def init(self: nn.Module) -> None:
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.randn(4, 3) * 0.5)
        self.add_module("<img src=x onerror=alert(1)>", nn.Linear(3, 1))

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, "<img src=x onerror=alert(1)>")(torch.tanh(x @ self.weight))

    return type("Evil<script>alert(1)</script>", (nn.Module,),
                {"__init__": init, "forward": forward})()


def test_html_escapes_names_from_user_code(tmp_path: Path) -> None:
    model, (x, y) = _evil_model(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(3):
            sgd_step(model, opt, x, y)
    report = gw.report()
    types = {layer["type"] for layer in report.layers}
    assert "Evil<script>alert(1)</script>" in types  # the weird name really is in the report
    html = Path(report.save(tmp_path / "r.html")).read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert "<img" not in html.lower()
    assert "Evil&lt;script&gt;" in html


def test_an_unwatched_model_trained_in_the_same_loop_does_not_leak_into_the_report() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    watched = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(watched.parameters(), lr=0.01)
    other_opt = torch.optim.SGD(other.parameters(), lr=1e-6)
    own_losses = []
    with gradwatch.watch(watched, opt) as gw:
        for _ in range(10):
            opt.zero_grad()
            other_opt.zero_grad()
            loss = nn.functional.mse_loss(watched(x), y)
            loss.backward()
            own_losses.append(loss.item())
            # A second model's backward, 1000x larger loss, in the same loop.
            (1000 * nn.functional.mse_loss(other(x), y)).backward()
            opt.step()
            other_opt.step()
    series = gw.report().series["loss"]
    assert series == pytest.approx(own_losses, rel=1e-6)
