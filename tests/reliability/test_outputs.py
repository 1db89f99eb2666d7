"""What gradwatch writes: every output that can be written is, with the script's exit status;
bad paths are refused before the run; files get the user's mode; names from user code
cannot drive a terminal or a browser.

The command line runs in this process (``gradwatch.cli.main``), with faults injected where
gradwatch renders or writes.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import cli
from gradwatch.judge import registry
from gradwatch.report import atomic

SCRIPTS = Path(__file__).parent / "scripts"

TRAIN_AND_EXIT = """
import sys
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
for _ in range(30):
    optimizer.zero_grad()
    model(torch.randn(16, 4)).square().mean().backward()
    optimizer.step()
open("ran.marker", "w").close()
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working folder holding ``s.py`` (30 steps, then exit with argv[1])."""
    (tmp_path / "s.py").write_text(TRAIN_AND_EXIT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def run_cli(*args: str) -> int:
    try:
        return cli.main(["run", *args])
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code or 0)


# --------------------------------------------------------------------------- failing parts
def test_a_failing_renderer_costs_only_its_own_file(
        folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(data: object) -> str:
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr("gradwatch.report.html.render_html", broken)
    code = run_cli("--json", "a.json", "--html", "a.html", "--text", "a.txt", "s.py", "3")
    err = capsys.readouterr().err
    assert code == 3, "the script's own exit status"
    assert json.loads((folder / "a.json").read_text())["run"]["steps"] == 30
    assert "30 steps" in (folder / "a.txt").read_text()
    assert not (folder / "a.html").exists()
    assert err.count("could not write a.html: RuntimeError: renderer exploded") == 1
    assert "Traceback" not in err
    assert "report written to a.json, a.txt" in err


def test_a_failing_text_renderer_still_writes_the_other_files(
        folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(data: object, width: int = 100) -> str:
        raise KeyError("summary")

    monkeypatch.setattr("gradwatch.report.text.render_text", broken)
    code = run_cli("--json", "a.json", "--html", "a.html", "--text", "a.txt", "s.py", "3")
    err = capsys.readouterr().err
    assert code == 3
    assert (folder / "a.json").exists() and (folder / "a.html").exists()
    assert "could not write a.txt" in err and "could not print the summary" in err


def test_a_failing_report_build_still_writes_a_report(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: object) -> dict:
        raise RuntimeError("series exploded")

    monkeypatch.setattr("gradwatch.report._site_series", broken)
    assert run_cli("--json", "a.json", "--quiet", "s.py", "3") == 3
    report = gradwatch.Report.load(folder / "a.json")
    assert report.run["steps"] == 30 and report.run["status"] == "failed"
    assert any("series exploded" in e for e in report.run["internal_errors"])


def test_a_full_disk_is_one_line_and_leaves_the_old_file(
        folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "a.json").write_text("old", encoding="utf-8")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    assert run_cli("--json", "a.json", "s.py", "0") == 0
    assert "could not write a.json: OSError: [Errno 28] No space left on device" in \
        capsys.readouterr().err
    assert (folder / "a.json").read_text() == "old"
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "ran.marker", "s.py"]


def test_a_failing_detector_is_named_and_measuring_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: object) -> list:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(registry, "REGISTRY", [(kind, broken if kind == "loss_plateau" else d)
                                               for kind, d in registry.REGISTRY])
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(40):
            opt.zero_grad()
            model(torch.randn(16, 4)).square().mean().backward()
            opt.step()
    report = gw.report()
    assert report.run["measured_steps"] is None, "measuring did not stop"
    assert report.run["detector_errors"] == [
        "detector loss_plateau failed: ZeroDivisionError: division by zero"]
    summary = report.summary()
    assert "detector loss_plateau failed" in summary and "missing from this report" in summary
    assert "stopped measuring" not in summary


# --------------------------------------------------------------------------- refused early
@pytest.mark.parametrize("args, message", [
    (["--threshold", "explosion_lr_reduction=0"], "must be in [1, inf)"),
    (["--threshold", "exploding_depth_ratio=0"], "exploding_depth_ratio"),
    (["--threshold", "input_scale_high=0"], "input_scale_high"),
    (["--threshold", "plateau_window=0"], "plateau_window"),
    (["--threshold", "min_steps=0"], "min_steps"),
    (["--threshold", "min_steps=2.5"], "must be a whole number"),
    (["--json", "out_dir"], "it is a folder"),
    (["--json", "/proc/gradwatch-report.json"], "is not writable"),
    (["--json", "no/such/folder/r.json"], "does not exist"),
])
def test_bad_options_are_usage_errors_before_the_script_runs(
        folder: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (folder / "out_dir").mkdir()
    assert run_cli(*args, "s.py") == 2
    assert message in capsys.readouterr().err
    assert not (folder / "ran.marker").exists(), "the script ran although the options were bad"


def test_a_folder_is_run_by_its_main_or_refused(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "empty").mkdir()
    assert run_cli("empty") == 2
    assert "empty is a folder without a __main__.py" in capsys.readouterr().err
    (folder / "package").mkdir()
    (folder / "package" / "__main__.py").write_text(TRAIN_AND_EXIT, encoding="utf-8")
    assert run_cli("--json", "p.json", "--quiet", "package") == 0
    assert json.loads((folder / "p.json").read_text())["run"]["steps"] == 30


# --------------------------------------------------------------------------- file mode
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_reports_get_the_mode_the_umask_gives(folder: Path, umask: int, mode: int) -> None:
    report = gradwatch.Report.load(_saved_report(folder))
    old = os.umask(umask)
    try:
        report.save(folder / "r.html")
    finally:
        os.umask(old)
    assert (folder / "r.html").stat().st_mode & 0o777 == mode
    (folder / "r.html").chmod(0o640)
    report.save(folder / "r.html")  # replacing a file keeps its mode
    assert (folder / "r.html").stat().st_mode & 0o777 == 0o640


def _saved_report(folder: Path) -> Path:
    assert run_cli("--json", "base.json", "--quiet", "s.py") == 0
    return folder / "base.json"


# --------------------------------------------------------------------------- hostile names
# No "." (torch refuses it in module names): the handler reaches the title through brackets.
HOSTILE = ("\x1b]0;pwned\x07\x1b[2J<img src=x onerror=\"window['document']['title']='pwned'\">"
           "\u202e")


def _hostile_report() -> gradwatch.Report:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(HOSTILE, nn.Linear(4, 8))
    model.add_module("act", nn.Sigmoid())
    model.add_module("head", nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(30):
            opt.zero_grad()
            model(torch.randn(16, 4) * 30).square().mean().backward()
            opt.step()
    report = gw.report()
    assert HOSTILE in [layer["name"] for layer in report.layers]
    return report


def test_control_characters_in_names_never_reach_the_terminal(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = _hostile_report().summary()
    assert not any(ord(ch) < 32 and ch != "\n" for ch in summary), repr(summary)
    assert "\u202e" not in summary
    assert "\\x1b]0;pwned\\x07" in summary  # shown, escaped
    script = folder / "hostile.py"
    script.write_text("import torch\nfrom torch import nn\n"
                      f"model = nn.Sequential()\nmodel.add_module({HOSTILE!r}, nn.Linear(4, 1))\n"
                      "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
                      "for _ in range(5):\n    opt.zero_grad()\n"
                      "    model(torch.randn(8, 4)).sum().backward()\n    opt.step()\n",
                      encoding="utf-8")
    assert run_cli("--text", "h.txt", "hostile.py") == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "\x1b" not in (folder / "h.txt").read_text()


def test_hostile_names_are_inert_in_a_browser(tmp_path: Path) -> None:
    from test_html_render import OFFLINE, _chromium

    page = Path(_hostile_report().save(tmp_path / "hostile.html"))
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", *OFFLINE, "--virtual-time-budget=2000",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    assert "<title>gradwatch report</title>" in dom, dom[:500]
    assert "<img" not in dom, "a name became an element"
    assert "&lt;img src=x onerror=" in dom  # the name is shown as text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
