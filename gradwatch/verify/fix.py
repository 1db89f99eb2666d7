"""``gradwatch run --fix``: watch the run; at the first problem found, prove its remedies on
re-runs as long as the run so far, and restart the script from its start with the one that
repairs it, so that the user ends with a trained model and the record of what was changed.

The user's script is never modified: the restarted run is the script again, in a fresh
process in the user's folder (its outputs and checkpoints land where they always do), with
the remedy applied to its live model and optimizer as ``--verify``'s re-runs apply it. When
no remedy repairs the problem, the first run is not stopped: it goes on unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..judge.registry import run_detectors
from ..report import Report, build_report
from ..runner import StopRun
from . import zygote
from .launch import VerifySettings, final_main
from .run import verify_report
from .search import candidate_key, remedy_parts
from .verdict import Parts, solved

__all__ = ["CHECK_FIRST", "CHECK_GAP", "CHECK_MAX_GAP", "GROWTH", "MAX_PASSES", "FixControl",
           "Repair", "final_run", "repairs"]

#: The first check of the run for problems, after this many steps: re-runs as long as the
#: run so far must be long enough to show a remedy working (a problem found earlier is
#: verified here, or at the end of a shorter run). Then every quarter of the steps so far,
#: at least CHECK_GAP and at most CHECK_MAX_GAP steps apart.
CHECK_FIRST = 64
CHECK_GAP = 16
CHECK_MAX_GAP = 256
#: At most this many verify passes in one run: at a new problem, or when the run has grown
#: GROWTH times as long as at the last pass that repaired nothing.
MAX_PASSES = 3
GROWTH = 3
#: A remedy whose finding stays must lower the loss this many times to count as a repair.
IMPROVED = 2.0


@dataclasses.dataclass
class Repair:
    """The remedy chosen to restart the run with, and the finding it repairs."""

    kind: str
    remedy: dict[str, Any]  # the report's remedy, with its "verified"
    parts: Parts
    kinds: list[str] = dataclasses.field(default_factory=list)  # every problem it repairs


def repairs(verified: dict[str, Any]) -> bool:
    """A verified remedy repairs its finding: better or fixed, nothing new, and the finding
    gone or the loss at least IMPROVED times lower."""
    if not verified or verified.get("status") not in ("better", "fixed"):
        return False
    if verified.get("new_findings"):
        return False
    return solved(verified) or (verified.get("improvement") or 0) >= IMPROVED


def choose(report: Report) -> Repair | None:
    """The verified remedy that repairs the most problems; among equals, the one that
    repairs the most severe, earliest problem, as ranked first for it."""
    order = {"error": 0, "warning": 1}
    problems = sorted((f for f in report.findings if f.severity in order),
                      key=lambda f: (order[f.severity], f.first_step))
    found: dict[str, tuple[list[int], Any, Any]] = {}  # key -> (findings repaired, remedy, kind)
    for i, finding in enumerate(problems):
        for remedy in finding.remedies:
            if remedy.verified and repairs(remedy.verified):
                key = candidate_key(remedy_parts(remedy))
                found.setdefault(key, ([], remedy, finding.kind))[0].append(i)
    if not found:
        return None
    fixed, remedy, kind = min(found.values(), key=lambda v: (-len(v[0]), v[0][0]))
    kinds = list(dict.fromkeys(problems[i].kind for i in fixed))
    return Repair(kind, remedy.to_dict(), remedy_parts(remedy), kinds)


class FixControl:
    """The first run under ``--fix``: checks it as it goes and, at the first problem,
    verifies the remedies; stops it when one repairs the problem (``repair`` is then set)."""

    def __init__(self, script: str | os.PathLike[str], args: Sequence[str],
                 settings: VerifySettings, say: Callable[[str], None]) -> None:
        self.script, self.args, self.settings, self.say = script, list(args), settings, say
        self.next_check = CHECK_FIRST
        self.repair: Repair | None = None
        self.passes: list[dict[str, Any]] = []  # each verify pass: step, kinds, outcome
        self.verified: set[str] = set()  # the problem kinds verified so far
        self.record: dict[str, Any] = {"found_at_step": None, "restarted": False}
        self.started = time.monotonic()

    def attach_first(self, handles: Any, monitor: Any = None) -> None:
        if monitor is not None:
            monitor.step_listeners.append(self._committed)

    def attach_last(self, handles: Any) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}

    def _committed(self, monitor: Any) -> None:
        if self.repair is not None or len(self.passes) >= MAX_PASSES or \
                monitor.step < self.next_check:
            return
        self.next_check = monitor.step + min(CHECK_MAX_GAP, max(CHECK_GAP, monitor.step // 4))
        monitor.snapshot()
        findings, _ = run_detectors(monitor.history, monitor.thresholds)
        if self._due({f.kind for f in findings if f.severity in ("warning", "error")},
                     int(monitor.step)):
            self.verify(build_report(monitor))
            if self.repair is not None:
                raise StopRun

    def _due(self, kinds: set[str], step: int) -> bool:
        """Verify now: a problem not verified yet, or one no remedy repaired on re-runs a
        GROWTH-th as long as the run is now (its remedies may need longer to show)."""
        if not kinds or self.repair is not None or len(self.passes) >= MAX_PASSES:
            return False
        last = self.passes[-1]["step"] if self.passes else 0
        return bool(kinds - self.verified) or step >= GROWTH * max(1, last)

    def after(self, report: Report) -> None:
        """The first run ended before a check verified its problems (a short run, a
        problem that shows only at its end, a script that raised): verify what its report
        found, with re-runs as long as the whole run."""
        kinds = {f.kind for f in report.findings if f.severity in ("warning", "error")}
        if self._due(kinds, int(report.run.get("steps") or 0)):
            self.verify(report)

    def verify(self, report: Report) -> None:
        """Verify the remedies of ``report``'s problems on re-runs as long as its run;
        ``repair`` is then the one that repairs the most of them (see :func:`choose`), or
        None."""
        step = int(report.run.get("steps") or 0)
        problems = sorted({f.kind for f in report.findings
                           if f.severity in ("warning", "error")})
        self.verified |= set(problems)
        if self.record["found_at_step"] is None:
            self.record["found_at_step"] = step
        self.record["first_run_s"] = round(time.monotonic() - self.started, 3)
        self.say(f"fix: {', '.join(problems)} found after {step} steps: verifying remedies on "
                 f"re-runs of up to {step} steps")
        started = time.monotonic()
        # A diagnostic stops at the first bad value: it names it, it cannot repair it.
        settings = dataclasses.replace(self.settings, budget=max(1, step), diagnostics=False)
        checked = verify_report(report, self.script, self.args, settings, self.say)
        took = round(time.monotonic() - started, 3)
        self.record["verify_s"] = round(self.record.get("verify_s", 0.0) + took, 3)
        self.record["findings"] = [f.to_dict() for f in checked.findings
                                   if f.severity in ("warning", "error")]
        self.record["verify"] = checked.to_dict().get("verify")
        self.repair = choose(checked)
        self.passes.append({"step": step, "kinds": problems,
                            "verify_s": took,
                            "repaired": self.repair.kinds if self.repair else []})
        self.record["passes"] = list(self.passes)
        if self.repair is None:
            self.say("fix: no remedy repaired it yet; the run goes on unchanged" +
                     (", and is checked again" if len(self.passes) < MAX_PASSES else ""))
            return
        self.say(f"fix: {self.repair.remedy['id']} repairs {', '.join(self.repair.kinds)}: "
                 "restarting the script from its start with it")


def final_run(script: str | os.PathLike[str], args: Sequence[str], parts: Parts,
              settings: VerifySettings) -> tuple[int, Report | None]:
    """Run the script again from its start, in the user's folder and with the user's
    output, with ``parts`` applied: its exit status and its report (None when the run wrote
    none). Forked from the server that already imported torch where there is one."""
    with tempfile.TemporaryDirectory(prefix="gradwatch-fix-") as tmp:
        report_path = Path(tmp) / "report.json"
        process = zygote.start(final_main, (
            str(Path(script).resolve()), list(args), parts, os.getcwd(), str(report_path),
            settings.options, settings.thresholds), Path(tmp) / "exitcode")
        if process is not None:
            process.join()
            code = process.exitcode if process.exitcode is not None else 1
        else:
            params: Any = [p for _, p in parts] if len(parts) > 1 else parts[0][1]
            cmd = [sys.executable, "-m", "gradwatch", "run", *settings.passed_on, "--json",
                   str(report_path), "--quiet", "--apply-remedy",
                   "+".join(rid for rid, _ in parts), "--apply-params",
                   json.dumps(params, default=str), "--", str(script), *args]
            code = subprocess.run(cmd).returncode
        report = Report.load(report_path) if report_path.is_file() else None
    return code, report
