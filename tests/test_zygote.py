"""The server re-runs are forked from: a process's exit status and its end, a kill, and a
script that starts processes of its own inside a re-run and inside the restarted run.

The server must be forked before any thread exists, so each check runs in a fresh Python
process, as ``gradwatch run`` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"


def test_forked_processes_report_their_status_and_can_be_killed(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from gradwatch.verify import zygote

        def work(path, code):
            Path(path).write_text(str(os.getpid()))
            sys.exit(code)

        def forever():
            time.sleep(600)

        if __name__ == "__main__":
            zygote.start_server()
            tmp = Path({str(tmp_path)!r})
            done = zygote.start(work, (str(tmp / "pid"), 3), tmp / "status1")
            done.join(60)
            slow = zygote.start(forever, (), tmp / "status2")
            time.sleep(0.2)
            alive = slow.is_alive()
            slow.kill()
            slow.join(10)
            print(type(zygote._SERVER[0]).__name__, done.exitcode,
                  int((tmp / "pid").read_text()) == done.pid, alive, slow.is_alive(),
                  slow.exitcode)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["_Zygote", "3", "True", "True", "False", "-9"]


@pytest.mark.slow  # runs the script three times over, with worker processes
def test_a_script_with_dataloader_workers_is_fixed(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_bytes((SCRIPTS / "train_dead_bias.py").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--fix", "--json",
                           "report.json", str(script), "--workers", "2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # The re-runs and the restarted run each started their own DataLoader workers.
    assert report["fix"]["restarted"] is True, report["fix"]
    assert report["run"]["status"] == "completed" and report["run"]["steps"] == 80
    assert not [f for f in report["findings"] if f["severity"] in ("warning", "error")]
    assert "daemonic" not in proc.stderr


def test_a_process_forked_after_the_cli_is_imported_can_use_torch_threads() -> None:
    # `gradwatch run` imports its CLI (and through it the lab) and then forks the server.
    # OpenMP threads started before a fork are missing in the child, whose first parallel
    # op then waits for them forever: importing gradwatch must start none (a lab constant
    # once computed on 143k random numbers at import, and every --fix restart hung).
    code = textwrap.dedent("""
        import os, sys, time
        import torch
        torch.set_num_threads(2)
        import gradwatch.cli
        pid = os.fork()
        if pid == 0:
            a = torch.randn(256, 256)
            (a @ a).sum()
            os._exit(0)
        deadline = time.time() + 30
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                sys.exit(0 if status == 0 else 1)
            time.sleep(0.05)
        os.kill(pid, 9)
        sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 3, "the forked child hung in its first multi-threaded op"
    assert done.returncode == 0, done.stderr[-2000:]
