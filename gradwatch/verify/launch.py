"""The processes of a ``--verify`` pass: one re-run of the script per candidate, forked from
a server that imported torch once, each in its own folder, killed at the deadline."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..runner import run_script
from . import zygote
from .child import ChildControl
from .settle import Settle
from .verdict import Outcome, Parts, window_loss

__all__ = ["Job", "VerifySettings", "child_main", "cores", "final_main", "run_job"]


@dataclasses.dataclass
class VerifySettings:
    """How ``--verify`` re-runs: steps per re-run, seconds for the whole pass, repeats
    when the script is not deterministic, how many re-runs at once, and whether to try
    pairs of remedies where no single one fixes a finding."""

    budget: int | None = None  # steps per re-run; None: as many as the first run's, in time
    time_s: float = 600.0
    repeats: int = 3
    workers: int = dataclasses.field(default_factory=lambda: cores())
    settle: bool = True  # stop each re-run once its outcome is settled
    only: frozenset[str] | None = None  # remedy ids to verify (None: every one offered)
    combine: bool = True
    diagnostics: bool = True  # re-run diagnostic remedies too (detect_anomaly, ...)
    options: Any = None  # the first run's Options and Thresholds, used by every re-run
    thresholds: Any = None
    passed_on: Sequence[str] = ()  # the same as `gradwatch run` options, for a spawned run


def cores() -> int:
    """The cores this process may use (its affinity where the system says), at most 8:
    re-runs run one thread each, side by side."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


@dataclasses.dataclass
class Job:
    key: str  # "baseline" or a candidate key
    parts: Parts
    repeat: int
    steps: int = 0  # this re-run's budget (0: the pass's)
    settle: Settle | None = None  # when it may stop before its budget
    #: Set when the re-run is no longer needed (another one repaired what it is for).
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    why: str = ""  # why it was cancelled


def child_command(script: Path, args: Sequence[str], job: Job, report_path: Path,
                   steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "gradwatch", "run", "--json", str(report_path), "--quiet",
           "--max-steps", str(steps)]
    if job.settle is not None:
        cmd += ["--settle", json.dumps(job.settle.to_json())]
    if job.parts:
        params: Any = [p for _, p in job.parts] if len(job.parts) > 1 else job.parts[0][1]
        cmd += ["--apply-remedy", "+".join(rid for rid, _ in job.parts), "--apply-params",
                json.dumps(params, default=str)]
    return [*cmd, "--", str(script), *args]


def follow_ups(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The remedies of a re-run's warning/error findings, errors first, one per id."""
    order = {"error": 0, "warning": 1}
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for f in sorted((f for f in findings if f["severity"] in order),
                    key=lambda f: order[f["severity"]]):
        for r in f["remedies"]:
            if r["id"] not in seen and "+" not in r["id"]:
                seen.add(r["id"])
                out.append({k: r.get(k) for k in ("id", "text", "code", "params")})
    return out


def read_outcome(report_path: Path, steps: int, returncode: int | None,
                  log: Path) -> Outcome:
    if not report_path.is_file():
        tail = log.read_text(errors="replace")[-400:] if log.is_file() else ""
        return Outcome("failed", note=f"the re-run wrote no report (exit {returncode}):"
                        f" {tail.strip()}")
    data = json.loads(report_path.read_text())
    applied = data.get("applied") or {}
    run = data["run"]
    series = data["series"]
    losses = list(zip(series.get("step", []), series.get("loss", []), strict=False))
    kinds = {f["kind"] for f in data["findings"] if f["severity"] in ("warning", "error")}
    out = Outcome("ok", steps=int(run["steps"]), losses=losses, kinds=kinds,
                   changes=list(applied.get("changes") or []),
                   follow_ups=follow_ups(data["findings"]), settled=applied.get("settled"))
    if applied.get("status") in ("not_applicable", "failed"):
        out.status, out.note = applied["status"], applied.get("error")
        return out
    missed = applied.get("not_reached") or []
    if applied.get("status") == "applied" and missed:
        out.status, out.note = "not_applicable", f"{', '.join(missed)} never applied: the " \
            "script never reached the moment it applies at (an optimizer's first step)"
        return out
    if applied.get("remedy") and applied.get("status") != "applied":
        out.status, out.note = "not_applicable", "the script never reached the moment " \
            "this remedy applies at (a model's first forward or an optimizer's first step)"
        return out
    if run["status"] != "completed":
        out.status, out.note = "failed", run.get("error") or f"run {run['status']}"
        return out
    out.loss = window_loss(losses, out.steps)
    out.first_loss = losses[0][1] if losses else None
    return out


def run_job(script: Path, args: Sequence[str], job: Job, steps: int, workdir: Path,
             deadline: float, settings: VerifySettings | None = None) -> Outcome:
    """One re-run in a fresh process and its own temporary folder, killed at the deadline."""
    steps = job.steps or steps
    left = deadline - time.monotonic()
    if left <= 1:
        return Outcome("not_finished", note="the --verify-time budget ran out before it "
                        "started")
    folder = Path(tempfile.mkdtemp(prefix="rerun-", dir=workdir))
    report_path, log = folder / "gradwatch-report.json", folder / "output.log"
    settings = settings or VerifySettings()
    process = zygote.start(child_main, (
        str(script), list(args), job.parts, steps, str(folder), str(report_path), str(log),
        settings.options, settings.thresholds, job.settle), folder / "exitcode")
    if process is not None:
        alive, wait = process.is_alive, process.join

        def stop() -> None:
            process.kill()
            process.join()
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(log, "w") as out:
            popen = subprocess.Popen(
                child_command(script, args, job, report_path, steps), cwd=folder, env=env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        def alive() -> bool:
            return popen.poll() is None

        def wait(timeout: float) -> None:
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass

        def stop() -> None:
            popen.kill()
            popen.wait()
    end = time.monotonic() + left
    while alive() and time.monotonic() < end and not job.cancel.is_set():
        wait(max(0.0, min(POLL_S, end - time.monotonic())))
    if alive():
        stop()
        if job.cancel.is_set():
            return Outcome("not_tried", note=job.why or "stopped: no longer needed")
        return Outcome("not_finished", note="stopped when the --verify-time budget ran out")
    returncode = process.exitcode if process is not None else popen.returncode
    return read_outcome(report_path, steps, returncode, log)


#: How often a waiting re-run looks whether it was cancelled.
POLL_S = 0.05


def child_main(script: str, args: list[str], parts: Parts, steps: int, folder: str,
                report_path: str, log: str, options: Any, thresholds: Any,
                settle: Settle | None = None) -> None:
    """A re-run inside a process forked from the server: the same as ``gradwatch run
    --max-steps N --apply-remedy ...``, with the script's output in ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(folder)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        result = run_script(script, args, options, thresholds, ChildControl(parts, steps, settle))
        if result.report is None:  # a process the re-run forked: not the re-run's report
            return
        result.report.save(report_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def final_main(script: str, args: list[str], parts: Parts, folder: str, report_path: str,
               options: Any, thresholds: Any) -> None:
    """The run ``--fix`` restarts, forked from the server: the script from its start
    in the user's folder, with the user's output and threads, ``parts`` applied; the
    process exits with the script's own status."""
    os.chdir(folder)
    code = 1
    try:
        result = run_script(script, args, options, thresholds, ChildControl(parts, None))
        code = result.exit_code
        if result.report is not None:
            result.report.save(report_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)
