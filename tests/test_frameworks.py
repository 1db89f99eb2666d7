"""Remedy code in the framework's language: real runs of a Lightning ``Trainer.fit`` and a
Hugging Face ``Trainer`` under ``gradwatch run`` (unmodified scripts in ``tests/scripts``),
the same model and rate in a plain loop, whose remedies keep their plain code, and each
framework's rendering table.

Lightning and transformers are part of the ``test`` extra (the README's set-up installs
them); gradwatch itself never imports either.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from gradwatch.measure import frameworks
from gradwatch.remedies import CATALOGUE, describe, remedy
from gradwatch.remedies.base import swap_optimizer
from gradwatch.remedies.frameworks import FRAMEWORKS, LIGHTNING, TRANSFORMERS, render

SCRIPTS = Path(__file__).parent / "scripts"
TIMEOUT_S = 300


def needs(*packages: str) -> None:
    """The frameworks a test trains with: a missing one is a failure, not a skip."""
    for package in packages:
        __import__(package)


def gradwatch_run(folder: Path, name: str, *args: str) -> tuple[dict[str, Any], str]:
    """``gradwatch run`` on ``tests/scripts/<name>`` copied into ``folder``: the report and
    gradwatch's summary (with the script's own stderr)."""
    script = folder / name
    script.write_bytes((SCRIPTS / name).read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--json", "report.json",
                           str(script), *args], cwd=folder, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert script.read_bytes() == (SCRIPTS / name).read_bytes()  # never modified
    assert "problems found" in proc.stderr, proc.stderr[-3000:]
    return json.loads((folder / "report.json").read_text()), proc.stderr


def remedies_of(report: dict[str, Any], remedy_id: str) -> list[dict[str, Any]]:
    found = [r for f in report["findings"] for r in f["remedies"] if r["id"] == remedy_id]
    assert found, f"no {remedy_id} among {[f['kind'] for f in report['findings']]}"
    return found


def layer_names(report: dict[str, Any]) -> list[str]:
    return [layer["name"] for layer in report["layers"]]


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    needs("lightning")
    return gradwatch_run(tmp_path_factory.mktemp("lightning"), "train_lightning.py")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    needs("transformers", "accelerate")
    folder = tmp_path_factory.mktemp("hf")
    return gradwatch_run(folder, "train_hf_trainer.py", "--output-dir", str(folder / "out"))


def test_lightning_run_is_recognised(lightning_run: tuple[dict[str, Any], str]) -> None:
    report, _ = lightning_run
    framework = report["facts"]["framework"]
    assert framework["name"] == "lightning"
    assert framework["module_class"] == "LitModel"
    assert framework["optimizers"] == ["Adam"]
    assert framework["automatic_optimization"] is True
    assert framework["lr_attribute"] == "self.lr"


def test_lightning_layers_are_module_paths(lightning_run: tuple[dict[str, Any], str]) -> None:
    """training_step calls self.net: the layers are named by their path in the
    LightningModule, in the report and in the summary's sentences."""
    report, summary = lightning_run
    assert layer_names(report) == ["net.0", "net.2", "net.4"]
    dying = next(f for f in report["findings"] if f["kind"] == "dying_relu")
    assert dying["layers"] and all(name.startswith("net.") for name in dying["layers"])
    assert not re.search(r"\blayer \d", summary), summary


def test_lightning_remedies_speak_lightning(lightning_run: tuple[dict[str, Any], str]) -> None:
    report, summary = lightning_run
    for lower in remedies_of(report, "lower_learning_rate"):
        assert "def configure_optimizers(self):" in lower["code"]
        assert f"torch.optim.Adam(self.parameters(), lr={lower['params']['lr']})" \
            in lower["code"]
        assert "param_groups" not in lower["code"]
        assert "LitModel.configure_optimizers" in lower["text"]
        assert "create LitModel with lr=" in lower["code"]  # the rate is its self.lr
    for clip in remedies_of(report, "clip_grad_norm"):
        assert clip["code"] == (f"trainer = Trainer(..., gradient_clip_val="
                                f"{clip['params']['max_norm']}, "
                                "gradient_clip_algorithm=\"norm\")")
        assert "clip_grad_norm_" not in clip["code"]
    assert "def configure_optimizers(self):" in summary  # the text summary shows it too


def test_hf_run_is_recognised(hf_run: tuple[dict[str, Any], str]) -> None:
    report, _ = hf_run
    framework = report["facts"]["framework"]
    assert framework["name"] == "transformers"
    assert framework["trainer_class"] == "Trainer"
    assert framework["model_class"] == "GPT2LMHeadModel"
    assert framework["args"]["learning_rate"] == 1.0
    assert framework["args"]["max_grad_norm"] == 1.0
    assert framework["args"]["lr_scheduler_type"] == "linear"
    assert all(name.startswith(("transformer.", "lm_head")) for name in layer_names(report))


def test_hf_remedies_speak_training_arguments(hf_run: tuple[dict[str, Any], str]) -> None:
    report, _ = hf_run
    for lower in remedies_of(report, "lower_learning_rate"):
        p = lower["params"]
        assert lower["code"] == (f"args = TrainingArguments(..., learning_rate={p['lr']})"
                                 f"  # was {p['old_lr']}")
        assert "TrainingArguments' learning_rate" in lower["text"]
    for clip in remedies_of(report, "clip_grad_norm"):
        assert clip["code"] == (f"args = TrainingArguments(..., max_grad_norm="
                                f"{clip['params']['max_norm']})  # now max_grad_norm=1.0")


def test_plain_run_keeps_plain_code(tmp_path: Path) -> None:
    """The Lightning script's model and rate in a plain loop: the same findings and
    remedies, with the plain code, and the layers named as before."""
    report, _ = gradwatch_run(tmp_path, "train_adam_rate.py", "--steps", "60")
    assert "framework" not in report["facts"]
    assert layer_names(report) == ["0", "2", "4"]
    lower = remedies_of(report, "lower_learning_rate")[0]
    assert lower["code"].startswith("for group in optimizer.param_groups:")
    clip = remedies_of(report, "clip_grad_norm")[0]
    assert clip["code"].startswith("torch.nn.utils.clip_grad_norm_(model.parameters()")
    for f in report["findings"]:
        for r in f["remedies"]:
            plain = remedy(r["id"], **r.get("params", {}))
            assert (r["text"], r["code"]) == (plain.text, plain.code)


# ----------------------------------------------------------------------------- the tables
PARAMS: dict[str, dict[str, Any]] = {
    "lower_learning_rate": {"old_lr": "3", "lr": 0.3, "factor": 0.1, "measured": "0.5",
                            "target": "0.001", "capped": True},
    "clip_grad_norm": {"max_norm": 2.5},
    "hold_learning_rate": {"floor": "0.1", "last": "1e-05", "since": 40},
    "adaptive_optimizer": {},
    "guard_nonfinite_loss": {},
    "detect_anomaly": {},
    "skip_spiking_steps": {"spike_factor": "100", "window": 50},
    "assert_finite_inputs": {},
    "standardize_inputs": {"mean": "50", "std": "10"},
    "call_model_eval": {"model": "model"},
}
FACTS = {
    "lightning": {"name": "lightning", "module_class": "LitModel", "optimizers": ["SGD"],
                  "automatic_optimization": True, "lr_attribute": None,
                  "trainer": {"gradient_clip_val": None}, "schedulers": [
                      {"type": "StepLR", "interval": "step"}]},
    "transformers": {"name": "transformers", "trainer_class": "Trainer",
                     "args": {"max_grad_norm": 1.0, "lr_scheduler_type": "linear"}},
}


def test_every_optimizer_remedy_has_framework_code() -> None:
    """Each remedy that changes the optimizer (clipping, rate, schedule, step) is in every
    framework's table; every table names only known remedies."""
    touching = {rid for rid, e in CATALOGUE.items()
                if e.to_optimizer is not None and e.to_optimizer is not swap_optimizer}
    assert touching == {"clip_grad_norm", "lower_learning_rate", "hold_learning_rate",
                        "adaptive_optimizer", "guard_nonfinite_loss", "skip_spiking_steps"}
    for name, table in FRAMEWORKS.items():
        assert touching <= set(table), name
        assert set(table) <= set(CATALOGUE), name


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_renderings_parse_and_extend_the_text(name: str) -> None:
    """Each rendering is Python (inside a method body, where its fragments live), differs
    from the plain code, and keeps the plain text with one added clause."""
    for remedy_id in FRAMEWORKS[name]:
        plain = remedy(remedy_id, **PARAMS[remedy_id])
        framed = render(plain, FACTS[name])
        assert framed.code != plain.code, remedy_id
        assert framed.text.startswith(plain.text + "; "), remedy_id
        assert framed.params == plain.params
        body = textwrap.indent(framed.code, "    ")
        ast.parse(f"def _step(self, batch, batch_idx, loss, opt, optimizer, scheduler):\n"
                  f"{body}\n")


def test_lightning_details() -> None:
    facts = FACTS["lightning"]
    lower = describe(remedy("lower_learning_rate", **PARAMS["lower_learning_rate"]), facts)
    assert "torch.optim.SGD(self.parameters(), lr=0.3)  # was 3" in lower.code
    hold = describe(remedy("hold_learning_rate", **PARAMS["hold_learning_rate"]), facts)
    assert "\"interval\": \"epoch\"}}  # now StepLR: \"step\"" in hold.code
    assert "def on_before_optimizer_step(self, optimizer):" in hold.code
    manual = {**facts, "automatic_optimization": False}
    clip = describe(remedy("clip_grad_norm", max_norm=2.5), manual)
    assert "self.clip_gradients(opt, gradient_clip_val=2.5" in clip.code
    guard = describe(remedy("guard_nonfinite_loss"), facts)
    assert "return None" in guard.code


def test_model_remedies_and_plain_runs_are_unchanged() -> None:
    """Remedies that change the model keep their code under a framework; without one (or
    with an unknown one) nothing changes."""
    kaiming = remedy("kaiming_init", nonlinearity="relu")
    for facts in FACTS.values():
        assert describe(kaiming, facts) == describe(kaiming)
    clip = remedy("clip_grad_norm", max_norm=2.5)
    assert describe(clip, None) == describe(clip)
    assert describe(clip, {"name": "keras"}) == describe(clip)
    assert TRANSFORMERS.keys() <= LIGHTNING.keys()


def test_gradwatch_imports_no_framework() -> None:
    """Detection reads sys.modules and class names: importing gradwatch (its command
    included) loads neither Lightning nor transformers."""
    code = ("import sys, gradwatch, gradwatch.cli, gradwatch.runner\n"
            "loaded = [m for m in ('lightning', 'pytorch_lightning', 'transformers')\n"
            "          if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- detection
def _fake_class(name: str, module: str, base: type = object) -> type:
    cls = type(name, (base,), {})
    cls.__module__ = module
    return cls


def test_detection_reads_the_stack_and_class_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without either package installed: classes named like theirs, in modules named like
    theirs, are recognised on the stack only once the package is in sys.modules."""
    fake_base = _fake_class("LightningModule", "lightning.pytorch.core.module", nn.Module)

    class Lit(fake_base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
            self.lr = 0.5

        def training_step(self) -> Any:
            return frameworks.lightning_owner(self.net[2]), frameworks.detect()

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "transformers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    lit = Lit()
    assert lit.training_step() == (None, None)  # not loaded: not even looked for
    monkeypatch.setitem(sys.modules, "lightning.pytorch", sys)
    owner, facts = lit.training_step()
    assert owner == (lit, "net.2")
    assert facts["name"] == "lightning" and facts["module_class"] == "Lit"
    assert facts["package"] == "lightning.pytorch"

    trainer_cls = _fake_class("Trainer", "transformers.trainer")

    class Args:
        learning_rate, max_grad_norm, lr_scheduler_type = 5e-5, 1.0, "linear"

    class MyTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        args, model, optimizer = Args(), nn.Linear(1, 1), None

        def compute_loss(self) -> Any:
            facts: dict[str, Any] = {}
            frameworks.note(facts)
            return facts

    monkeypatch.setitem(sys.modules, "transformers", sys)
    facts = MyTrainer().compute_loss()["framework"]
    assert facts["name"] == "transformers" and facts["trainer_class"] == "MyTrainer"
    assert facts["model_class"] == "Linear"
    assert facts["args"]["learning_rate"] == 5e-5 and facts["args"]["max_grad_norm"] == 1.0
    assert frameworks.detect() is None  # no framework object up this test's stack
