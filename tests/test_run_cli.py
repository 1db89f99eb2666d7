"""``gradwatch run``: unmodified scripts in a subprocess, their exit status, args and report.

Every command line below is started in the background (conftest.py calls
``start_in_background`` once the demo's core is free), all at once and at a lower CPU
priority: each is a fresh interpreter that imports torch, a few seconds of CPU, and they
run while other tests do; conftest.py runs this module's tests after those. The tests then
read the results. The scripts live in ``tests/scripts/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gradwatch

SCRIPTS = Path(__file__).parent / "scripts"
CONSOLE_SCRIPT = Path(sys.executable).parent / ("gradwatch.exe" if os.name == "nt" else "gradwatch")
TIMEOUT_S = 300


def as_module(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradwatch", "run", *args]


def as_console_script(*args: str) -> list[str]:
    return [str(CONSOLE_SCRIPT), "run", *args]


def script(name: str) -> str:
    return str(SCRIPTS / name)


MLP = script("train_mlp.py")

# name -> command line, run in its own empty folder (report paths are relative to it)
RUNS: dict[str, list[str]] = {
    "basic": as_module(MLP, "--epochs", "3", "--json", "out.json"),
    "exit_code": as_module(MLP, "--epochs", "1", "--exit-code", "3", "--json", "out.json"),
    "raises": as_module(MLP, "--epochs", "3", "--raise-at", "5", "--json", "out.json"),
    "double_dash": as_console_script("--json", "out.json", "--html", "out.html", MLP,
                                     "--epochs", "1", "--text", "out.txt", "--",
                                     "--json", "theirs.json", "--quiet"),
    "by_hand": as_module(script("train_by_hand.py"), "--json", "out.json"),
    "functional": as_module(script("train_functional.py"), "--json", "out.json", "--quiet"),
    "two_optimizers": as_module(script("train_two_optimizers.py"), "--json", "out.json"),
    "lbfgs": as_module(script("train_lbfgs.py"), "--json", "out.json", "--quiet"),
    "deep_by_hand": as_module(script("train_deep_by_hand.py"), "--json", "out.json", "--quiet"),
    "missing": as_module("no_such_script.py", "--json", "out.json"),
    "unknown_option": as_console_script("--bogus", MLP, "--json", "out.json"),
}


@dataclasses.dataclass
class Finished:
    """One finished ``gradwatch run``: exit status, output, and its folder."""

    returncode: int
    stdout: str
    stderr: str
    folder: Path

    def report(self, name: str = "out.json") -> dict[str, Any]:
        path = self.folder / name
        assert path.is_file(), f"no report {name}; stderr:\n{self.stderr}"
        return json.loads(path.read_text(encoding="utf-8"))

    def printed(self, key: str) -> Any:
        """A JSON value the script printed as ``KEY=value`` on stdout."""
        for line in self.stdout.splitlines():
            if line.startswith(f"{key}="):
                return json.loads(line.split("=", 1)[1])
        raise AssertionError(f"script printed no {key}; stdout:\n{self.stdout}\n"
                             f"stderr:\n{self.stderr}")

    def printed_text(self, key: str) -> str:
        for line in self.stdout.splitlines():
            if line.startswith(f"{key}="):
                return line.split("=", 1)[1]
        raise AssertionError(f"script printed no {key}; stdout:\n{self.stdout}")


def _lower_priority() -> None:
    """In the child, before exec: yield the CPU to the test process and the demo."""
    os.nice(10)


class Launcher:
    """Starts every command of ``runs`` (default ``RUNS``) in parallel, each in its own
    folder of a temporary one; hands out results as they finish."""

    def __init__(self, runs: dict[str, list[str]] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="gradwatch-run-test-"))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        self._procs: dict[str, tuple[subprocess.Popen[str], Path]] = {}
        self._done: dict[str, Finished] = {}
        for name, argv in (RUNS if runs is None else runs).items():
            folder = self.root / name
            folder.mkdir()
            proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    preexec_fn=_lower_priority if hasattr(os, "nice") else None)
            self._procs[name] = (proc, folder)

    def __getitem__(self, name: str) -> Finished:
        if name not in self._done:
            proc, folder = self._procs[name]
            out, err = proc.communicate(timeout=TIMEOUT_S)
            self._done[name] = Finished(proc.returncode, out, err, folder)
        return self._done[name]

    def close(self) -> None:
        for proc, _ in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        shutil.rmtree(self.root, ignore_errors=True)


_STARTED: list[Launcher] = []


def start_in_background() -> Launcher:
    """Start every command line now, once per session (conftest.py calls it early)."""
    if not _STARTED:
        _STARTED.append(Launcher())
    return _STARTED[0]


@pytest.fixture(scope="module")
def cli() -> Iterator[Launcher]:
    assert CONSOLE_SCRIPT.is_file(), f"console script {CONSOLE_SCRIPT} is not installed"
    launcher = start_in_background()  # already running if conftest.py started it
    yield launcher
    launcher.close()


# --------------------------------------------------------------------------- exit status
def test_successful_script_exits_0_with_a_report(cli: Launcher) -> None:
    run = cli["basic"]
    assert run.returncode == 0, run.stderr
    assert "SCRIPT_DONE" in run.stdout
    report = run.report()
    assert report["schema"] == "gradwatch.report/v1"
    assert report["run"]["status"] == "completed"
    assert report["run"]["error"] is None
    assert report["run"]["steps"] == 12  # 3 epochs x 4 optimizer steps
    assert [layer["name"] for layer in report["layers"]] == ["0", "2"]
    assert report["run"]["internal_errors"] == []


def test_script_exit_code_is_passed_through(cli: Launcher) -> None:
    run = cli["exit_code"]
    assert run.returncode == 3, run.stderr
    assert "SCRIPT_DONE" in run.stdout
    assert run.report()["run"]["steps"] == 4  # the report is written anyway


def test_script_that_raises_exits_1_with_failed_report_and_traceback(cli: Launcher) -> None:
    run = cli["raises"]
    assert run.returncode == 1
    assert "SCRIPT_DONE" not in run.stdout
    assert "Traceback (most recent call last)" in run.stderr
    assert "train_mlp.py" in run.stderr
    assert "RuntimeError: deliberate failure in the training script" in run.stderr
    report = run.report()
    assert report["run"]["status"] == "failed"
    assert "RuntimeError" in report["run"]["error"]
    assert "deliberate failure in the training script" in report["run"]["error"]
    assert report["run"]["steps"] == 5


# --------------------------------------------------------------------------- arguments
def test_script_runs_as_main_with_its_own_arguments(cli: Launcher) -> None:
    run = cli["basic"]
    assert run.printed_text("SCRIPT_NAME") == "__main__"
    assert run.printed("SCRIPT_ARGV") == ["--epochs", "3"]


def test_everything_after_double_dash_goes_to_the_script(cli: Launcher) -> None:
    run = cli["double_dash"]
    assert run.returncode == 0, run.stderr
    assert run.printed("SCRIPT_ARGV") == ["--epochs", "1", "--json", "theirs.json", "--quiet"]
    assert run.report()["run"]["steps"] == 4
    assert not (run.folder / "theirs.json").exists()  # gradwatch wrote only its own --json
    assert "4 steps" in run.stderr  # --quiet went to the script, not to gradwatch


def test_console_script_writes_every_format(cli: Launcher) -> None:
    run = cli["double_dash"]  # run through the `gradwatch` console script
    assert run.returncode == 0, run.stderr
    assert run.report()["run"]["steps"] == 4
    html = (run.folder / "out.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html")
    text = (run.folder / "out.txt").read_text(encoding="utf-8")
    assert "4 steps" in text
    assert sorted(p.name for p in run.folder.iterdir()) == ["out.html", "out.json", "out.txt"]


def test_summary_goes_to_stderr(cli: Launcher) -> None:
    run = cli["basic"]
    assert f"gradwatch {gradwatch.__version__}" in run.stderr
    assert "12 steps" in run.stderr and "completed" in run.stderr
    assert "out.json" in run.stderr  # says where the report went
    assert "12 steps" not in run.stdout  # the script's stdout stays the script's
    assert "12 steps" not in cli["functional"].stderr  # --quiet: no summary


# --------------------------------------------------------------------------- kinds of script
def test_hand_updated_bare_tensors_get_steps_and_named_layers(cli: Launcher) -> None:
    run = cli["by_hand"]
    assert run.returncode == 0, run.stderr
    losses = run.printed("SCRIPT_LOSSES")
    report = run.report()
    assert report["run"]["steps"] == len(losses) == 30  # one backward of the loss per step
    assert report["run"]["internal_errors"] == []
    assert [layer["name"] for layer in report["layers"]] == [
        "w_hidden", "b_hidden", "w_out", "b_out"]
    assert [layer["params"] for layer in report["layers"]] == [48, 16, 16, 1]
    assert report["series"]["loss"] == pytest.approx(losses, rel=1e-6)
    for name in ("w_hidden", "w_out"):
        assert all(v is not None and v > 0 for v in report["series"]["grad_norm"][name])


def test_lbfgs_closure_model_is_found_as_a_model(cli: Launcher) -> None:
    # The model runs only inside optimizer.step(closure): its layers must still be the
    # nn.Linear modules (not bare tensors) and every step must have its loss.
    run = cli["lbfgs"]
    assert run.returncode == 0, run.stderr
    report = run.report()
    losses = run.printed("SCRIPT_LOSSES")
    assert report["run"]["steps"] == len(losses) == 12
    assert [(layer["name"], layer["type"]) for layer in report["layers"]] == [
        ("0", "Linear"), ("2", "Linear")]
    # The recorded loss of a step is the closure's first evaluation, which step() returns.
    assert report["series"]["loss"] == pytest.approx(losses, rel=1e-6)
    assert report["run"]["internal_errors"] == []


def test_hand_updated_lists_of_tensors_are_named_and_diagnosed(cli: Launcher) -> None:
    run = cli["deep_by_hand"]
    assert run.returncode == 0, run.stderr
    report = run.report()
    names = [layer["name"] for layer in report["layers"]]
    # Named by their place in the script's lists, not by the loop variables W and b.
    assert names[:3] == ["Ws[0]", "bs[0]", "Ws[1]"] and names[-2:] == ["Ws[8]", "bs[8]"]
    kinds = {f["kind"]: f for f in report["findings"]}
    vanishing = kinds["vanishing_gradient"]
    assert vanishing["first_step"] == 0 and vanishing["layers"][0] == "Ws[0]"
    assert {c["id"] for c in vanishing["causes"]} >= {"sigmoid_in_deep_stack"}
    assert kinds["loss_plateau"]["severity"] in ("warning", "error")


def test_functional_activations_are_seen(cli: Launcher) -> None:
    run = cli["functional"]
    assert run.returncode == 0, run.stderr
    losses = run.printed("SCRIPT_LOSSES")
    report = run.report()
    assert report["run"]["steps"] == 25
    assert report["run"]["internal_errors"] == []
    assert [layer["name"] for layer in report["layers"]] == ["fc1", "fc2", "fc3"]
    assert report["series"]["loss"] == pytest.approx(losses, rel=1e-6)
    # F.relu is no module, but the graph shows it after fc1 and fc2 (it matters for causes).
    layer_facts = report["facts"]["layers"]
    assert layer_facts["fc1"]["activation"] == "relu"
    assert layer_facts["fc2"]["activation"] == "relu"
    assert layer_facts["fc3"]["activation"] in (None, "none")


def test_two_optimizers_each_step_counts(cli: Launcher) -> None:
    run = cli["two_optimizers"]
    assert run.returncode == 0, run.stderr
    losses = run.printed("SCRIPT_LOSSES")
    report = run.report()
    # DESIGN.md: a step is one optimizer.step(); both optimizers step every iteration.
    assert report["run"]["steps"] == 2 * len(losses) == 20
    assert report["run"]["internal_errors"] == []
    assert [layer["name"] for layer in report["layers"]] == ["encoder.0", "decoder.0"]
    assert [o["type"] for o in report["facts"]["optimizers"]] == ["SGD", "Adam"]
    # Each backward's loss is recorded exactly once.
    recorded = [v for v in report["series"]["loss"] if v is not None]
    assert recorded == pytest.approx(losses, rel=1e-6)


# --------------------------------------------------------------------------- usage errors
def test_missing_script_is_a_clear_error(cli: Launcher) -> None:
    run = cli["missing"]
    assert run.returncode == 2
    assert "no such training script" in run.stderr
    assert "no_such_script.py" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (run.folder / "out.json").exists()


def test_unknown_gradwatch_option_is_an_argparse_error(cli: Launcher) -> None:
    run = cli["unknown_option"]
    assert run.returncode == 2
    assert "unrecognized arguments: --bogus" in run.stderr
    assert "usage: gradwatch run" in run.stderr
    assert "SCRIPT_ARGV" not in run.stdout  # the script never ran
