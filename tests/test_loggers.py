"""The loggers (``gradwatch.integrations``): a small real model trained through each real
package, offline, and what was logged read back from where the package put it (TensorBoard's
event files, the offline W&B run folder, the MLflow file store) against the report."""

from __future__ import annotations

import html
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.cli import main as cli_main
from gradwatch.integrations.loggers import REPORT_NAME, Logger, metric_name
from gradwatch.integrations.mlflow import MLflow
from gradwatch.integrations.optional import MissingExtra
from gradwatch.integrations.tensorboard import TensorBoard
from gradwatch.integrations.wandb import WandB

SCRIPTS = Path(__file__).parent / "scripts"
STEPS, SYNC = 100, 16
FLUSH_STEPS = [15, 31, 47, 63, 79, 95, 99]  # the last step of each flush (the last: close)
DETAIL_STEPS = [7, 16, 32, 48, 64, 80, 96]  # the last detail step of each flush

Logged = dict[str, dict[int, float]]  # name -> step -> value


def train(loggers: list[Any], steps: int = STEPS) -> gradwatch.Report:
    """A ReLU layer held dead by its bias, then a tanh layer: dead and saturated fractions
    and a ``dying_relu`` finding, in a second of CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    with torch.no_grad():
        model[0].bias.fill_(-3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(128, 8), torch.randn(128, 1)
    with gradwatch.watch(model, opt, loggers=loggers, sync_every=SYNC) as gw:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for logger in loggers:
        assert logger.errors == [] and logger.dropped == 0
    return gw.report()


def expected(report: gradwatch.Report) -> Logged:
    """Every scalar the report's series hold, by logged name and step."""
    s = report.series
    out: Logged = {metric_name("loss"): dict(zip(s["step"], s["loss"], strict=True)),
                   metric_name("lr"): dict(zip(s["step"], s["lr"], strict=True))}
    for kind, steps in (("grad_norm", "step"), ("update_ratio", "detail_step"),
                        ("dead_fraction", "site_step"), ("saturated_fraction", "site_step")):
        for name, values in s[kind].items():
            out[metric_name(kind, name)] = dict(zip(s[steps], values, strict=True))
    return out


def check_scalars(logged: Logged, report: gradwatch.Report) -> None:
    """The report's names, one point per flush, and the report's values at those steps."""
    want = expected(report)
    assert set(logged) == set(want)
    assert {k.split("/")[1] for k in logged} == {"loss", "lr", "grad_norm", "update_ratio",
                                                 "dead_fraction", "saturated_fraction"}
    for name, points in logged.items():
        kind = name.split("/")[1]
        steps = DETAIL_STEPS if kind in ("update_ratio", "dead_fraction",
                                         "saturated_fraction") else FLUSH_STEPS
        assert sorted(points) == steps, name
        for step, value in points.items():
            assert value == pytest.approx(want[name][step], rel=1e-5, abs=1e-12), (name, step)
    # The dead ReLU is logged as dead, the tanh as saturated (names made safe: no '@').
    assert logged[metric_name("dead_fraction", "1")][96] == 1.0


def check_findings(texts: dict[str, str], report: gradwatch.Report) -> None:
    """One text per finding kind, and the list of all findings at the end."""
    kinds = report.kinds()
    assert "dying_relu" in kinds
    assert {metric_name("findings", k) for k in kinds} <= set(texts)
    assert "dying_relu" in texts[metric_name("findings", "dying_relu")]
    summary = texts[metric_name("findings")]
    assert "run completed after 100 steps" in summary
    assert all(f.summary in summary for f in report.findings)


# ---------------------------------------------------------------------------- TensorBoard
def test_tensorboard_event_files_hold_the_report_scalars_findings_and_report(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = train([TensorBoard(tmp_path / "tb", findings_budget=1.0)])
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)}
              for tag in events.Tags()["scalars"]}
    check_scalars(logged, report)
    suffix = "/text_summary"
    texts = {tag[: -len(suffix)]: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
             for tag in events.Tags()["tensors"] if tag.endswith(suffix)}
    check_findings(texts, report)
    # findings_budget=1.0: judged during the run, so dying_relu was logged before the end.
    first = events.Tensors(metric_name("findings", "dying_relu") + suffix)[0]
    assert first.step < STEPS - 1
    page = (tmp_path / "tb" / REPORT_NAME).read_text(encoding="utf-8")
    assert page == report.to_html()
    assert REPORT_NAME in texts[metric_name("report")]


# ---------------------------------------------------------------------------- W&B
def wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's ``.wandb`` file (LevelDB's log format: 32 KiB
    blocks of chunks, each a 7-byte header crc32/length/type; wandb no longer ships a
    reader). Stops at a chunk not yet complete on disk."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, chunk, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos: pos + 7])
        pos += 7
        if kind == 0:
            pos += left - 7
            continue
        data = raw[pos: pos + length]
        if len(data) < length or zlib.crc32(data, zlib.crc32(bytes([kind]))) != crc:
            break  # the tail wandb-core is still writing: the caller reads again
        chunk += data
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def test_wandb_offline_run_folder_holds_the_report_scalars_findings_and_report(
        tmp_path, monkeypatch):
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_DIR", tmp_path), ("WANDB_CACHE_DIR", tmp_path / "cache"),
                       ("WANDB_DATA_DIR", tmp_path / "data"),
                       ("WANDB_CONFIG_DIR", tmp_path / "config")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    report = train([WandB("gradwatch-test", findings_budget=1.0)])
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (data,) = run_dir.glob("run-*.wandb")
    records = wandb_records(data)
    for _ in range(300):  # wandb-core may still be writing the file when finish() returns
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
        records = wandb_records(data)
    logged: Logged = {}
    texts: dict[str, str] = {}
    artifacts = []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "artifact":
            artifacts.append(record.artifact)
        if kind != "history":
            continue
        items: dict[str, Any] = {}
        for item in record.history.item:
            key, *inner = [item.key] if item.key else list(item.nested_key)
            value = json.loads(item.value_json)
            if inner:  # a media entry, one item per field: {"_type": "html-file", ...}
                items.setdefault(key, {})["/".join(inner)] = value
            else:
                items[key] = value
        step = items.pop("gradwatch/step")
        for name, value in items.items():
            if not name.startswith("gradwatch/"):
                continue
            if isinstance(value, dict):  # a wandb.Html entry: a file of the run
                page = (run_dir / "files" / value["path"]).read_text(encoding="utf-8")
                texts[name] = html.unescape(page.removeprefix("<pre>").removesuffix("</pre>"))
            else:
                logged.setdefault(name, {})[step] = value
    assert records[0].WhichOneof("record_type") == "header"
    assert any(r.WhichOneof("record_type") == "run" and r.run.project == "gradwatch-test"
               for r in records)
    check_scalars(logged, report)
    check_findings(texts, report)
    # the report: in the run's files, and an artifact whose one file is it
    assert (run_dir / "files" / REPORT_NAME).read_text(encoding="utf-8") == report.to_html()
    (artifact,) = artifacts
    assert artifact.type == "gradwatch-report"
    (entry,) = artifact.manifest.contents
    assert entry.path == REPORT_NAME
    assert Path(entry.local_path).read_text(encoding="utf-8") == report.to_html()
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


# ---------------------------------------------------------------------------- MLflow
def test_mlflow_file_store_holds_the_report_scalars_findings_and_report(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # restored after the test
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = train([MLflow(tmp_path / "mlruns", run_name="tiny", findings_budget=1.0)])
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("gradwatch").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    run_id = run.info.run_id
    logged = {name: {m.step: m.value for m in client.get_metric_history(run_id, name)}
              for name in run.data.metrics}
    check_scalars(logged, report)
    download = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    texts = {str(p.relative_to(download).with_suffix("")): p.read_text(encoding="utf-8")
             for p in download.rglob("*.md")}
    check_findings(texts, report)
    assert (download / REPORT_NAME).read_text(encoding="utf-8") == report.to_html()
    # MLflow 3 refuses a file store without this; naming one is the caller's opt-in.
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"


# ---------------------------------------------------------------------------- the CLI
def test_gradwatch_run_tensorboard_logs_an_unmodified_script(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    code = cli_main(["run", "--tensorboard", str(out), "--quiet", "--sync-every", "8",
                     str(SCRIPTS / "train_dead_bias.py"), "--epochs", "2",
                     "--json", str(tmp_path / "r.json")])
    assert code == 0
    report = gradwatch.Report.load(tmp_path / "r.json")
    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars(metric_name("loss"))
    assert [e.step for e in loss] == [7, 15]  # 2 epochs of 8 batches, a flush every 8 steps
    want = dict(zip(report.series["step"], report.series["loss"], strict=True))
    assert [e.value for e in loss] == pytest.approx([want[7], want[15]], rel=1e-6)
    layers = {metric_name("grad_norm", layer["name"]) for layer in report.layers}
    assert layers <= set(events.Tags()["scalars"])
    assert metric_name("findings", "dying_relu") + "/text_summary" in events.Tags()["tensors"]
    assert (out / REPORT_NAME).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_wandb_takes_its_project_with_or_without_an_equals_sign(tmp_path):
    from gradwatch.cli import _split_run_args

    script = str(SCRIPTS / "train_dead_bias.py")
    assert _split_run_args(["--wandb", "proj", script, "--epochs", "2"]) == \
        (["--wandb", "proj"], script, ["--epochs", "2"])
    assert _split_run_args(["--wandb=proj", script]) == (["--wandb=proj"], script, [])
    # no project: the next word is the script, an option, or one of the script's files
    assert _split_run_args(["--wandb", script, "--epochs", "2"]) == \
        (["--wandb"], script, ["--epochs", "2"])
    assert _split_run_args([script, "--wandb", "--epochs", "2"]) == \
        (["--wandb"], script, ["--epochs", "2"])
    assert _split_run_args([script, "--wandb", str(tmp_path)]) == \
        (["--wandb"], script, [str(tmp_path)])


def test_cli_names_the_extra_that_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails
    code = cli_main(["run", "--wandb", str(SCRIPTS / "train_dead_bias.py")])
    assert code == 2
    captured = capsys.readouterr()
    assert "pip install 'gradwatch[wandb]'" in captured.err
    assert "epoch" not in captured.out  # refused before the script ran


@pytest.mark.parametrize(("package", "make", "extra"), [
    ("tensorboard", lambda p: TensorBoard(p), "tensorboard"),
    ("wandb", lambda p: WandB(), "wandb"),
    ("mlflow", lambda p: MLflow(p), "mlflow"),
])
def test_a_missing_package_names_its_extra(tmp_path, monkeypatch, package, make, extra):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(MissingExtra, match=rf"pip install 'gradwatch\[{extra}\]'"):
        make(tmp_path)


# ---------------------------------------------------------------------------- the core
class Recorder(Logger):
    """A backend that keeps what it is given (and can be made to fail)."""

    title = "recorder"

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__(findings_budget=0.0)
        self.fail_at = fail_at
        self.scalars: dict[int, dict[str, float]] = {}
        self.texts: list[tuple[str, int]] = []
        self.reports: list[int] = []
        self.closed: str | None = None

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        if self.fail_at is not None and step >= self.fail_at:
            raise OSError("disk full")
        self.scalars[step] = values

    def write_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, step))

    def write_report(self, html: str, step: int) -> None:
        self.reports.append(step)

    def close_backend(self, status: str) -> None:
        self.closed = status


def test_a_failing_backend_stops_its_logger_only():
    failing, healthy = Recorder(fail_at=40), Recorder()
    with pytest.warns(RuntimeWarning, match="recorder logger stopped.*disk full"):
        report = _train_unchecked([failing, healthy])
    assert failing.errors == ["OSError: disk full"]
    assert sorted(failing.scalars) == [7, 15, 16, 31, 32]
    assert failing.reports == [] and failing.closed is None
    assert sorted(healthy.scalars) == sorted(FLUSH_STEPS + DETAIL_STEPS)
    assert healthy.closed == "completed" and healthy.reports == [99]
    # findings_budget=0: findings only at the end, each kind once, then the list.
    assert [tag for tag, _ in healthy.texts][-1] == metric_name("findings")
    assert {step for _, step in healthy.texts} == {99}
    # measuring went on: the report covers the whole run, without internal errors
    assert report.run["steps"] == STEPS and report.run["internal_errors"] == []
    assert len(report.series["step"]) == STEPS


def _train_unchecked(loggers: list[Any]) -> gradwatch.Report:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].bias.fill_(-3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(128, 8), torch.randn(128, 1)
    with gradwatch.watch(model, opt, loggers=loggers, sync_every=SYNC) as gw:
        for _ in range(STEPS):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return gw.report()


def test_only_rank_zero_logs(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    other = Recorder()
    _train_unchecked([other])
    assert other.scalars == {} and other.texts == [] and other.reports == []
    assert other.closed is None


def test_watch_refuses_what_is_not_a_logger_and_a_logger_used_twice():
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="loggers takes gradwatch loggers"):
        gradwatch.watch(model, loggers=["runs/x"])
    logger = Recorder()
    gradwatch.watch(model, loggers=[logger]).close()
    with pytest.raises(ValueError, match="one logger per watch"):
        gradwatch.watch(model, loggers=[logger])


# ---------------------------------------------------------------------------- the caller's own
def test_loggers_log_into_the_callers_writer_and_runs_and_leave_them_open(tmp_path, monkeypatch):
    """``TensorBoard(writer=...)``, ``WandB(run=...)``, ``MLflow(run_id=...)``: gradwatch's
    scalars and report go into what the caller opened, which gradwatch does not close."""
    from mlflow.tracking import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_DIR", tmp_path), ("WANDB_CACHE_DIR", tmp_path / "cache"),
                       ("WANDB_DATA_DIR", tmp_path / "data"),
                       ("WANDB_CONFIG_DIR", tmp_path / "config"),
                       ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true"),
                       ("XDG_CONFIG_HOME", tmp_path / "config"),
                       ("MLFLOW_ALLOW_FILE_STORE", "true")):
        monkeypatch.setenv(var, str(value))
    import wandb

    writer = SummaryWriter(str(tmp_path / "tb"))
    user_run = wandb.init(project="mine", reinit="create_new")
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    run_id = client.create_run(client.create_experiment("mine")).info.run_id
    loggers = [TensorBoard(writer=writer), WandB(run=user_run),
               MLflow(tmp_path / "mlruns", run_id=run_id)]
    train(loggers)
    writer.add_scalar("mine", 1.0, 0)  # still open
    writer.close()
    assert (tmp_path / "tb" / REPORT_NAME).is_file()
    user_run.log({"mine": 1.0})  # still open (wandb refuses to log to a finished run)
    assert (Path(user_run.dir) / REPORT_NAME).is_file()
    user_run.finish()
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and metric_name("loss") in run.data.metrics
    assert REPORT_NAME in {a.path for a in client.list_artifacts(run_id)}
