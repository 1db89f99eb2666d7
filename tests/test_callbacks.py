"""The trainer callbacks (issue 15): real tiny runs through Lightning's ``Trainer.fit`` and
the Hugging Face ``Trainer.train``, offline and on CPU, reading back the report file and
what the trainer's logger got (Lightning's CSV metrics file and TensorBoard event file, the
Hugging Face ``state.log_history``).

Lightning and transformers are part of the ``test`` extra: a missing one is a failure, not
a skip (the TensorBoard read-back needs the ``tensorboard`` package and skips without it).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import pytorch_lightning as ptl
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gradwatch import KINDS, Report
from gradwatch.integrations.lightning import GradwatchCallback as LightningCallback
from gradwatch.integrations.session import Session
from gradwatch.integrations.transformers import GradwatchCallback as HFCallback
from gradwatch.measure.probes import INTERCEPTOR

ORIGINAL_BACKWARD = torch.autograd.backward


def hooks_gone(model: nn.Module) -> bool:
    """No hook of gradwatch's is left on the model, and backward() is torch's own."""
    return torch.autograd.backward is ORIGINAL_BACKWARD and INTERCEPTOR.active == 0 and \
        all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def layer_names(report: dict[str, Any]) -> list[str]:
    return [layer["name"] for layer in report["layers"]]


# ----------------------------------------------------------------------------- Lightning
class LitModel(pl.LightningModule):
    """training_step calls self.net (the LightningModule's own forward never runs); the
    rate lives in configure_optimizers; ``fail_at``: training_step raises at that batch."""

    def __init__(self, lr: float, fail_at: int | None = None) -> None:
        super().__init__()
        self.lr, self.fail_at = lr, fail_at
        self.net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 4))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == self.fail_at:
            raise RuntimeError(f"bad batch {batch_idx}")
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class ManualModel(pl.LightningModule):
    """Manual optimization with two optimizers: SGD on the body, Adam on the head."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(10, 32), nn.Tanh())
        self.head = nn.Linear(32, 4)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        opt_body, opt_head = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.head(self.body(x)), y)
        opt_body.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_body.step()
        opt_head.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.body.parameters(), lr=0.05),
                torch.optim.Adam(self.head.parameters(), lr=1e-3)]


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 10, generator=g)
    z = x @ torch.randn(10, 2, generator=g)
    y = (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(2))


def fit(module: pl.LightningModule, callback: LightningCallback, root: Path,
        logger: Any = False, steps: int = 60) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger,
                         default_root_dir=str(root), enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=10, callbacks=[callback])
    trainer.fit(module, loader())
    return trainer


def test_lightning_broken_run_reports_to_file_and_csv_logger(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Adam at rate 3: findings with Lightning remedies in the report next to the logger's
    files, their counts in the CSV logger's metrics file, the trainer's metrics untouched."""
    callback = LightningCallback()
    module = LitModel(lr=3.0)
    trainer = fit(module, callback, tmp_path, pl.loggers.CSVLogger(str(tmp_path)))
    folder = tmp_path / "lightning_logs" / "version_0"
    assert callback.report_paths == [folder / "gradwatch-report.json",
                                     folder / "gradwatch-report.html"]
    assert (folder / "gradwatch-report.html").read_text().startswith("<!DOCTYPE html>")
    report = Report.load(folder / "gradwatch-report.json")
    data = report.to_dict()
    assert data["run"]["status"] == "completed" and data["run"]["steps"] == 60
    assert layer_names(data) == ["net.0", "net.2", "net.4"]
    assert report.problems, report
    framework = data["facts"]["framework"]
    assert framework["name"] == "lightning" and framework["module_class"] == "LitModel"
    assert framework["optimizers"] == ["Adam"] and framework["lr_attribute"] == "self.lr"
    lower = [r for f in report.findings for r in f.remedies if r.id == "lower_learning_rate"]
    assert lower and all("def configure_optimizers(self):" in r.code for r in lower)
    assert all("param_groups" not in r.code for r in lower)

    # The CSV logger: one row at the last step with the counts, per severity and per kind.
    with open(folder / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradwatch/findings")]
    assert len(rows) == 1 and int(rows[0]["step"]) == trainer.global_step == 60
    row = rows[0]
    assert float(row["gradwatch/findings"]) == len(report.findings)
    for severity in ("error", "warning", "info"):
        assert float(row[f"gradwatch/severity/{severity}"]) == \
            sum(f.severity == severity for f in report.findings)
    for kind in KINDS:
        assert float(row[f"gradwatch/kind/{kind}"]) == sum(f.kind == kind for f in
                                                          report.findings)
    assert set(trainer.callback_metrics) == {"train_loss"}  # nothing logged through it
    assert hooks_gone(module)
    printed = capsys.readouterr().out
    assert f"gradwatch: 60 steps (completed), {len(report.findings)} finding(s)" in printed
    assert str(folder / "gradwatch-report.json") in printed


def test_lightning_healthy_run_without_logger(tmp_path: Path) -> None:
    """A sane rate: no warning or error; without a logger the report goes to
    default_root_dir, at the path given, in the format its suffix names."""
    callback = LightningCallback(report_path=tmp_path / "out" / "gw.json", html=False,
                                 verbose=False)
    fit(LitModel(lr=1e-2), callback, tmp_path, steps=50)
    assert callback.report_paths == [tmp_path / "out" / "gw.json"]
    report = Report.load(tmp_path / "out" / "gw.json")
    assert report.run["status"] == "completed" and report.run["steps"] == 50
    assert not report.problems, report.summary()
    default = LightningCallback(verbose=False)
    fit(LitModel(lr=1e-2), default, tmp_path, steps=8)
    assert default.report_paths[0] == tmp_path / "gradwatch-report.json"


def test_lightning_exception_writes_a_failed_report(tmp_path: Path) -> None:
    """training_step raises at batch 5: the report is written with status failed, the
    error and the 5 steps before it; every hook is removed."""
    callback = LightningCallback(verbose=False)
    module = LitModel(lr=1e-2, fail_at=5)
    with pytest.raises(RuntimeError, match="bad batch 5"):
        fit(module, callback, tmp_path, pl.loggers.CSVLogger(str(tmp_path)))
    report = json.loads((tmp_path / "lightning_logs" / "version_0" /
                         "gradwatch-report.json").read_text())
    assert report["run"]["status"] == "failed"
    assert report["run"]["error"] == "RuntimeError: bad batch 5"
    assert report["run"]["steps"] == 5
    assert hooks_gone(module)


def test_lightning_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    """Both optimizers are watched: each step() is a step; the facts say manual."""
    callback = LightningCallback(verbose=False)
    module = ManualModel()
    trainer = fit(module, callback, tmp_path, steps=40)
    report = callback.report
    assert report is not None and report.run["status"] == "completed"
    assert report.run["steps"] == trainer.global_step == 40  # 20 batches x 2 optimizers
    data = report.to_dict()
    assert layer_names(data) == ["body.0", "head"]
    assert data["facts"]["framework"]["automatic_optimization"] is False
    assert data["facts"]["framework"]["optimizers"] == ["SGD", "Adam"]
    assert not report.problems, report.summary()
    assert hooks_gone(module)


def test_lightning_findings_reach_tensorboard(tmp_path: Path) -> None:
    """The TensorBoard logger's event file holds the counts as scalars and the findings
    as text."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = LightningCallback(verbose=False)
    fit(LitModel(lr=3.0), callback, tmp_path, pl.loggers.TensorBoardLogger(str(tmp_path)))
    report = callback.report
    assert report is not None and report.findings
    folder = tmp_path / "lightning_logs" / "version_0"
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    (findings,) = events.Scalars("gradwatch/findings")
    assert findings.step == 60 and findings.value == len(report.findings)
    (text,) = events.Tensors("gradwatch/findings/text_summary")
    written = text.tensor_proto.string_val[0].decode()
    for f in report.findings:
        assert f"{f.severity}: {f.kind}" in written
    assert "gradwatch-report.json" in written


class Accumulating(LitModel):
    """Records the total gradient norm the optimizer is about to use (Lightning calls
    on_before_optimizer_step after the step's last backward, before any clipping)."""

    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        self.norms: list[float] = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.norms.append(float(torch.sqrt(sum((p.grad ** 2).sum()
                                               for p in self.parameters()))))


def test_lightning_accumulation_reports_the_accumulated_gradient(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: the first backward runs outside optimizer.step(), the
    second inside its closure; a step's norms are those of the summed gradient, as the
    optimizer gets it, not the first micro-batch's."""
    callback = LightningCallback(verbose=False)
    module = Accumulating()
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False,
                         default_root_dir=str(tmp_path), enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(module, loader())
    report = callback.report
    assert report is not None and report.run["steps"] == 12
    norms = total_norms(report.to_dict())
    assert [norms[step] for step in range(12)] == pytest.approx(module.norms, rel=1e-5)


def test_pytorch_lightning_trainer_takes_the_callback(tmp_path: Path) -> None:
    """The ``pytorch_lightning`` package (which ``lightning`` installs) runs the callback too,
    and the facts name it."""
    class Small(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(10, 4)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = LightningCallback(verbose=False)
    trainer = ptl.Trainer(max_steps=10, logger=False, default_root_dir=str(tmp_path),
                          enable_progress_bar=False, enable_checkpointing=False,
                          enable_model_summary=False, callbacks=[callback])
    trainer.fit(Small(), loader())
    report = Report.load(tmp_path / "gradwatch-report.json")
    assert report.run["steps"] == 10 and report.run["status"] == "completed"
    assert report.to_dict()["facts"]["framework"]["package"] == "pytorch_lightning"


# ----------------------------------------------------------------------------- Hugging Face
class Sequences(Dataset):
    """Counting sequences modulo the vocabulary: each token is the previous one plus a step."""

    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class FailingTrainer(transformers.Trainer):
    """A Trainer whose training_step raises at the ``fail_at``-th call."""

    fail_at = 5

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > self.fail_at:
            raise RuntimeError("out of memory (simulated)")
        return super().training_step(*args, **kwargs)


def hf_trainer(folder: Path, callback: HFCallback, lr: float, steps: int = 30,
               max_grad_norm: float = 1.0, cls: type = transformers.Trainer) -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    args = transformers.TrainingArguments(
        output_dir=str(folder), learning_rate=lr, max_steps=steps,
        per_device_train_batch_size=16, max_grad_norm=max_grad_norm, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="steps", logging_steps=5,
        disable_tqdm=True, seed=0)
    return cls(model=transformers.GPT2LMHeadModel(config), args=args,
               train_dataset=Sequences(512, 16, 64), callbacks=[callback])


def total_norms(report: dict[str, Any]) -> dict[int, float]:
    """The report's total gradient norm per step (root of the sum of the layers' squares)."""
    series = report["series"]
    return {step: math.sqrt(sum((norms[i] or 0.0) ** 2
                                for norms in series["grad_norm"].values()))
            for i, step in enumerate(series["step"])}


def test_hf_broken_run_reports_and_logs(tmp_path: Path) -> None:
    """Rate 1: findings with TrainingArguments remedies in <output_dir>/gradwatch-report.json,
    their counts logged through the Trainer into state.log_history at the last step."""
    callback = HFCallback(verbose=False)
    trainer = hf_trainer(tmp_path, callback, lr=1.0, steps=20)
    trainer.train()
    assert callback.report_paths == [tmp_path / "gradwatch-report.json",
                                     tmp_path / "gradwatch-report.html"]
    report = Report.load(tmp_path / "gradwatch-report.json")
    data = report.to_dict()
    assert data["run"]["status"] == "completed" and data["run"]["steps"] == 20
    assert report.problems, report
    assert all(name.startswith(("transformer.", "lm_head")) for name in layer_names(data))
    framework = data["facts"]["framework"]
    assert framework["name"] == "transformers" and framework["trainer_class"] == "Trainer"
    assert framework["args"]["learning_rate"] == 1.0
    lower = [r for f in report.findings for r in f.remedies if r.id == "lower_learning_rate"]
    assert lower and all(r.code.startswith("args = TrainingArguments(..., learning_rate=")
                         for r in lower)
    rows = [r for r in trainer.state.log_history if "gradwatch/findings" in r]
    assert len(rows) == 1 and rows[0]["step"] == 20
    assert rows[0]["gradwatch/findings"] == len(report.findings)
    # The Trainer's own log of that step is still there (its should_log flag was kept).
    assert [r["step"] for r in trainer.state.log_history if "loss" in r] == [5, 10, 15, 20]
    for kind in KINDS:
        assert rows[0][f"gradwatch/kind/{kind}"] == sum(f.kind == kind
                                                        for f in report.findings)
    assert hooks_gone(trainer.model)


def test_hf_norms_are_unclipped(tmp_path: Path) -> None:
    """max_grad_norm=1e-3 on a run whose raw norms are near 1: the report's norms are the
    raw ones (those the Trainer logs as grad_norm: clip_grad_norm_'s total before it
    clips); what the optimizer applied (measured in its step pre-hook on detail steps) is
    the clipped norm. A healthy run."""
    callback = HFCallback(verbose=False)
    trainer = hf_trainer(tmp_path, callback, lr=1e-3, steps=20, max_grad_norm=1e-3)
    watches: list[Any] = []

    class Grab(transformers.TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            watches.append(callback._session.watch)

    trainer.add_callback(Grab())
    trainer.train()
    report = callback.report
    assert report is not None and not report.problems, report.summary()
    norms = total_norms(report.to_dict())
    logged = [r for r in trainer.state.log_history if "grad_norm" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    for row in logged:  # the Trainer's step n is gradwatch's step n - 1
        assert norms[row["step"] - 1] == pytest.approx(row["grad_norm"], rel=1e-3)
    assert min(norms.values()) > 100 * 1e-3
    applied = watches[0].monitor.history.detail.block("grad_norm_applied")
    measured = applied[~np.isnan(applied).all(axis=1)]
    totals = np.sqrt(np.nansum(measured ** 2, axis=1))
    assert len(totals) >= 8 and np.allclose(totals, 1e-3, rtol=1e-2), totals


def test_hf_exception_writes_a_failed_report(tmp_path: Path) -> None:
    """The Trainer has no exception hook: the callback as a context manager around
    train() writes the report with status failed and lets the exception through."""
    callback = HFCallback(verbose=False)
    trainer = hf_trainer(tmp_path, callback, lr=1e-3, steps=20, cls=FailingTrainer)
    with pytest.raises(RuntimeError, match="simulated"), callback:
        trainer.train()
    report = json.loads((tmp_path / "gradwatch-report.json").read_text())
    assert report["run"]["status"] == "failed"
    assert report["run"]["error"] == "RuntimeError: out of memory (simulated)"
    assert report["run"]["steps"] == 5
    assert hooks_gone(trainer.model)
    rows = [r for r in trainer.state.log_history if "gradwatch/findings" in r]
    assert len(rows) == 1 and rows[0]["step"] == 5


def test_hf_exception_without_context_manager(tmp_path: Path) -> None:
    """train() raised outside ``with callback``: the watch stays open (the Trainer tells no
    callback) until close(), which writes the failed run's report and removes the hooks."""
    callback = HFCallback(verbose=False)
    trainer = hf_trainer(tmp_path, callback, lr=1e-3, steps=20, cls=FailingTrainer)
    trainer.fail_at = 2
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    assert not hooks_gone(trainer.model)
    report = callback.close("failed", "train() raised")
    assert report is not None and report.run["status"] == "failed"
    assert report.run["steps"] == 2 and report.run["error"] == "train() raised"
    assert Report.load(tmp_path / "gradwatch-report.json").run["status"] == "failed"
    assert hooks_gone(trainer.model)
    assert callback.close() is None  # once


# ----------------------------------------------------------------------------- packaging
def test_callbacks_are_imported_only_when_used() -> None:
    """import gradwatch (and its integrations package) loads neither framework; the
    callback modules without their package name the extra to install."""
    code = ("import sys, gradwatch, gradwatch.integrations, gradwatch.integrations.session\n"
            "loaded = [m for m in ('lightning', 'pytorch_lightning', 'transformers')\n"
            "          if m in sys.modules]\n"
            "assert not loaded, loaded\n"
            "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning',\n"
            "             'transformers'):\n"
            "    sys.modules[name] = None\n"
            "from gradwatch.integrations.optional import MissingExtra\n"
            "for module, extra in (('lightning', 'lightning'),\n"
            "                      ('transformers', 'transformers')):\n"
            "    try:\n"
            "        __import__('gradwatch.integrations.' + module)\n"
            "    except MissingExtra as exc:\n"
            "        assert f\"gradwatch[{extra}]\" in str(exc), exc\n"
            "    else:\n"
            "        raise AssertionError(module)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_unknown_option_is_refused_at_creation() -> None:
    with pytest.raises(TypeError, match="sync_evry"):
        LightningCallback(sync_evry=8)
    with pytest.raises(TypeError, match="sync_evry"):
        HFCallback(sync_evry=8)


def test_session_never_breaks_the_run(tmp_path: Path) -> None:
    """What gradwatch cannot do (watch a frozen model, write where a folder is) is a
    RuntimeWarning, and the training goes on; strict=True raises it."""
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.warns(RuntimeWarning, match="could not start watching"):
        assert not Session({}, None, True, False).start(frozen, [], None)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Session({"strict": True}, None, True, False).start(frozen, [], None)

    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "taken.json").mkdir()  # a folder where the report should go
    session = Session({}, tmp_path / "taken.json", True, False)
    assert session.start(model, [opt], {"name": "lightning"})
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 2)).pow(2).mean().backward()
        opt.step()
    with pytest.warns(RuntimeWarning, match="could not write the report"):
        report = session.finish("completed", None, tmp_path)
    assert report is not None and report.run["steps"] == 3
    assert report.to_dict()["facts"]["framework"] == {"name": "lightning"}
    assert session.paths == [tmp_path / "taken.html"]  # the HTML page beside it was written
    assert hooks_gone(model) and session.finish("completed", None, tmp_path) is None
