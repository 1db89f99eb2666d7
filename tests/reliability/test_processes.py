"""``gradwatch run`` in real processes: signals, forks, DataLoader workers and ``os._exit``,
each with the exit status and report the script calls for.

The command lines start in the background all at once (``start_in_background``, called by
conftest.py when the demo's core is free) and the tests read their results.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_run_cli import Launcher

SCRIPTS = Path(__file__).parent / "scripts"


def gradwatch_run(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradwatch", "run", *args]


RUNS: dict[str, list[str]] = {
    "fork": gradwatch_run(str(SCRIPTS / "fork_midway.py"), "--json", "out.json"),
    "workers": gradwatch_run(str(SCRIPTS / "dataloader_workers.py"), "--json", "out.json"),
    "sigint": gradwatch_run(str(SCRIPTS / "interrupt_self.py"), "--json", "out.json"),
    "os_exit": gradwatch_run(str(SCRIPTS / "os_exit.py"), "--json", "out.json"),
}

_STARTED: list[Launcher] = []


def start_in_background() -> Launcher:
    """Start every command line now, once per session (conftest.py calls it early)."""
    if not _STARTED:
        _STARTED.append(Launcher(RUNS))
    return _STARTED[0]


@pytest.fixture(scope="module")
def runs() -> Iterator[Launcher]:
    launcher = start_in_background()
    yield launcher
    launcher.close()


def summaries(stderr: str) -> int:
    return stderr.count("gradwatch 0.1.0: ")


def test_a_forked_child_does_not_write_or_print_the_report(runs: Launcher) -> None:
    done = runs["fork"]
    assert done.returncode == 0, done.stderr
    assert done.report()["run"]["steps"] == 50, "the child's report replaced the parent's"
    assert summaries(done.stderr) == 1


def test_dataloader_workers_leave_one_report(runs: Launcher) -> None:
    done = runs["workers"]
    assert done.returncode == 0 and "DONE" in done.stdout, done.stderr
    report = done.report()
    assert report["run"]["steps"] == 16 and not report["run"]["internal_errors"]
    assert summaries(done.stderr) == 1


def test_sigint_exits_130_with_a_valid_interrupted_report(runs: Launcher) -> None:
    done = runs["sigint"]
    assert done.returncode == 130, done.stderr
    report = done.report()
    assert report["run"]["status"] == "interrupted"
    assert report["run"]["steps"] == 20
    json.dumps(report)  # a whole file, not a torn one


def test_os_exit_keeps_its_status_and_writes_nothing(runs: Launcher) -> None:
    """os._exit ends the process at once: no report (documented), but the status is kept."""
    done = runs["os_exit"]
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert not (done.folder / "out.json").exists()
