"""``verify_report``: one ``--verify`` pass over a report, its re-runs and their verdicts."""

from __future__ import annotations

import concurrent.futures
import inspect
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..remedies import CATALOGUE, refuses
from ..report import Report
from .launch import Job, VerifySettings, run_job
from .search import asked, candidate_key, next_round, remedy_parts
from .settle import Settle
from .verdict import WINDOW, Outcome, Parts, declares_all, deterministic, rank, solved, verdict

__all__ = ["CHECK_STEPS", "DEFAULT_STEPS", "MAX_ROUNDS", "MIN_STEPS", "VerifySettings",
           "rerun_steps", "verify_report"]

#: Rounds of the search after the single remedies: lower rates, pairs, then pairs of what
#: still did not repair a finding.
MAX_ROUNDS = 3
#: Steps of the re-run without a remedy that checks whether the script repeats its first
#: run (a fixed seed): if it does, the first run itself is what every remedy is compared
#: with, and no full-length re-run without a remedy is needed.
CHECK_STEPS = 12
#: Re-run length when the first run's length is unknown, and the least one the time
#: budget may cut re-runs to.
DEFAULT_STEPS = 200
MIN_STEPS = 50
#: A one-thread re-run's time per step against the first run's (which may use every
#: core): a guess on the slow side, used only to fit re-runs into --verify-time.
ONE_THREAD_SLOWDOWN = 1.5


def rerun_steps(report: Any, settings: VerifySettings, candidates: int) -> int:
    """Steps per re-run: ``--budget`` when given (at most the first run's); otherwise as
    many as the first run had, cut where the single remedies' re-runs, side by side,
    would take more than half of ``--verify-time`` (the rest is for pairs and rates)."""
    original = int(report.run.get("steps") or 0)
    if settings.budget is not None:
        return min(settings.budget, original) if original > 0 else settings.budget
    if original <= 0:
        return DEFAULT_STEPS
    per_step = float(report.run.get("duration_s") or 0.0) / original * ONE_THREAD_SLOWDOWN
    waves = math.ceil((candidates + 1) / max(1, settings.workers))
    if per_step <= 0:
        return original
    fit = int(settings.time_s * 0.5 / waves / per_step)
    return max(min(original, fit), min(original, MIN_STEPS))


def _first_run(report: Any, steps: int, problems: list[Any]) -> Outcome:
    """The first run as the run without a remedy, over the re-runs' ``steps``."""
    series = report.series
    losses = [(int(s), v) for s, v in zip(series.get("step", []), series.get("loss", []),
                                          strict=False) if s is not None and s < steps]
    return Outcome("ok", steps=min(steps, int(report.run.get("steps") or steps)),
                   losses=losses, kinds={f.kind for f in problems},
                   first_loss=losses[0][1] if losses else None)


def _default_lr(report: Any) -> float | None:
    """The default learning rate of the run's (first) optimizer class, from its signature
    in torch.optim: the last rung of the learning-rate ladder."""
    optimizers = (report.to_dict().get("facts") or {}).get("optimizers") or []
    cls = getattr(torch.optim, optimizers[0]["type"], None) if optimizers else None
    try:
        default = inspect.signature(cls).parameters["lr"].default if cls else None
    except (TypeError, ValueError, KeyError):
        return None
    return float(default) if isinstance(default, (int, float)) else None


class _Pass:
    """Re-runs of one ``--verify`` pass: a thread pool of child processes against one
    deadline, and their outcomes by candidate key."""

    def __init__(self, script: Path, args: Sequence[str], steps: int, workdir: Path,
                 deadline: float, pool: concurrent.futures.Executor,
                 settings: VerifySettings,
                 settle: Callable[[str], Settle | None] = lambda _key: None) -> None:
        self.script, self.args, self.steps, self.workdir = script, args, steps, workdir
        self.deadline, self.pool, self.settings = deadline, pool, settings
        self.settle = settle
        self.results: dict[str, list[Outcome]] = {}

    def submit(self, key: str, parts: Parts, repeat: int, steps: int = 0
               ) -> tuple[Job, concurrent.futures.Future[Outcome]]:
        job = Job(key, parts, repeat, steps, None if key == "baseline" else self.settle(key))
        return job, self.pool.submit(run_job, self.script, self.args, job, self.steps,
                                     self.workdir, self.deadline, self.settings)

    def run(self, candidates: dict[str, Parts], repeats: int, first: int = 0,
            say: Callable[[str], None] = lambda _m: None, stop: _Stop | None = None) -> None:
        """Re-run every candidate ``repeats`` times (repeat numbers from ``first``)."""
        futures = [self.submit(key, parts, r) for r in range(first, repeats)
                   for key, parts in candidates.items()]
        self.collect(futures, say if repeats == 1 else None, stop if repeats == 1 else None)
        if repeats > 1:
            for key, parts in candidates.items():
                outcome = self.results[key][-1]
                say(f"verify: {'+'.join(rid for rid, _ in parts)}: {outcome.status}")

    def collect(self, futures: list[tuple[Job, concurrent.futures.Future[Outcome]]],
                say: Callable[[str], None] | None, stop: _Stop | None) -> None:
        """The outcomes of ``futures`` as they finish; with ``stop``, the re-runs not
        started yet of candidates whose every finding a finished re-run repaired are
        cancelled and recorded as not tried."""
        jobs = {future: job for job, future in futures}
        for future in concurrent.futures.as_completed(jobs):
            job = jobs[future]
            if future.cancelled():
                continue
            outcome = future.result()
            self.results.setdefault(job.key, []).append(outcome)
            if say is not None and job.key != "baseline":
                say(f"verify: {'+'.join(rid for rid, _ in job.parts)}: {outcome.status}")
            if stop is None or not stop.repaired_by(job, outcome, self.results):
                continue
            for other, waiting in jobs.items():
                why = stop.skip(waiting)
                if not why or other.done():
                    continue
                if other.cancel():  # not started yet
                    self.results.setdefault(waiting.key, []).append(
                        Outcome("not_tried", note=why))
                else:  # running: its process is stopped, and its outcome says why
                    waiting.why = why
                    waiting.cancel.set()


def verify_report(report: Any, script: str | os.PathLike[str], args: Sequence[str] = (),
                  settings: VerifySettings | None = None,
                  progress: Callable[[str], None] | None = None) -> Any:
    """Re-run ``script`` with each remedy of each warning/error finding; return the report
    with ``verified`` in every remedy tried and each finding's remedies ordered by effect.

    Where no single remedy settles a finding (it stays, or new problems come with it), the
    best of them is re-run again together with the remedy its own re-run's report offers
    for what is still wrong: a re-initialisation that stops the overflow, then a lower
    learning rate for the updates that kill the units. Such pairs are added to the
    finding's remedies with an id like ``kaiming_init+lower_learning_rate``.
    """
    settings = settings or VerifySettings()
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    deadline = started + settings.time_s
    script = Path(script).resolve()
    problems = [f for f in report.findings if f.severity in ("warning", "error")]
    candidates: dict[str, Parts] = {}
    results: dict[str, list[Outcome]] = {}
    for finding in problems:
        for remedy in finding.remedies:
            parts = remedy_parts(remedy)
            key = candidate_key(parts)
            if not asked(settings, parts) or (not settings.diagnostics and
                                               declares_all(parts, "diagnostic")):
                continue  # not asked for (--verify-remedies): left without "verified"
            if any(rid not in CATALOGUE for rid, _ in parts):
                # No process for what gradwatch cannot do itself (residual connections, ...).
                results[key] = [Outcome("not_applicable", note="gradwatch cannot apply this "
                                         "remedy itself: change the code as shown")]
                continue
            why = next((w for w in (refuses(rid) for rid, _ in parts) if w), None)
            if why:  # no process for a remedy that needs what only the script has
                results[key] = [Outcome("not_applicable", note=why)]
                continue
            candidates.setdefault(key, parts)
    steps = rerun_steps(report, settings, len(candidates))
    summary: dict[str, Any] = {"budget": steps, "candidates": len(candidates),
                               "window": WINDOW}
    combos: dict[str, Parts] = {}

    def settle(key: str) -> Settle | None:
        """The early stop of a re-run of candidate ``key``: against the first run, for the
        findings that offer it."""
        parts = {**candidates, **combos}.get(key, ())
        if not settings.settle or declares_all(parts, "loss_neutral"):
            return None  # a remedy the training loss cannot judge runs its whole budget
        mine = [f for f in problems
                if any(candidate_key(remedy_parts(r)) == key for r in f.remedies)]
        return Settle.for_run(original, mine or problems, steps)

    original = list(zip(report.series.get("step", []), report.series.get("loss", []),
                        strict=False))
    if candidates:
        with tempfile.TemporaryDirectory(prefix="gradwatch-verify-") as tmp, \
                concurrent.futures.ThreadPoolExecutor(max(1, settings.workers)) as pool:
            runs = _Pass(script, args, steps, Path(tmp), deadline, pool, settings, settle)
            base_future = runs.submit("baseline", (), 0, min(steps, CHECK_STEPS))[1]
            say(f"verify: {len(candidates)} remedies, up to {steps} steps each, "
                f"{settings.workers} at a time")
            firsts = [runs.submit(key, parts, 0) for key, parts in candidates.items()]
            base = base_future.result()
            repeatable = base.status == "ok" and deterministic(original, base.losses)
            summary["deterministic"] = repeatable
            # A script that repeats its first run is compared with that run itself; one
            # that does not, with re-runs without a remedy as long as the others.
            if repeatable:
                runs.results["baseline"] = [_first_run(report, steps, problems)]
            elif base.status == "ok":
                runs.results["baseline"] = [runs.submit("baseline", (), 0)[1].result()]
            else:
                runs.results["baseline"] = [base]
            summary["baseline"] = "first run" if repeatable else "re-runs"
            base = runs.results["baseline"][0]
            if base.status != "ok":
                note = base.note or base.status
                if "No such file" in note or "FileNotFound" in note:
                    note += " (re-runs start in a temporary folder: a path relative to the " \
                        "current folder is not found there)"
                summary["baseline_error"] = note
            repeats = 1 if repeatable or base.status != "ok" else max(1, settings.repeats)
            summary["repeats"] = repeats
            if repeats > 1:
                say(f"verify: the first losses differ between runs (no fixed seed?): "
                    f"{repeats} repeats each")
            # In order of prior; once a re-run repairs a finding, the remedies queued only
            # for it are not re-run (with repeats, every candidate runs).
            stop = _Stop(problems, steps) if repeats == 1 else None
            runs.collect(firsts, say if repeats == 1 else None, stop)
            if repeats > 1:
                runs.run({"baseline": (), **candidates}, repeats, first=1, say=say)
            results.update(runs.results)
            default_lr = _default_lr(report)
            framework = (report.to_dict().get("facts") or {}).get("framework")
            for _ in range(MAX_ROUNDS if settings.combine and base.status == "ok" else 0):
                if time.monotonic() >= deadline:
                    break
                batch = next_round(problems, {**candidates, **combos}, results, steps,
                                   settings, default_lr, framework)
                if not batch:
                    break
                say(f"verify: {len(batch)} more re-run(s) for what no re-run repaired yet: "
                    + ", ".join("+".join(rid for rid, _ in parts) for parts in batch.values()))
                combos.update(batch)
                if stop is not None:
                    stop.refresh()
                runs.run(batch, repeats, say=say, stop=stop)
                results.update(runs.results)
    base_runs = results.get("baseline", [])
    for finding in problems:
        for remedy in finding.remedies:
            if not asked(settings, remedy_parts(remedy)):
                continue  # not asked for: no "verified", ranked after the verified ones
            key = candidate_key(remedy_parts(remedy))
            remedy.verified = verdict(finding.kind, base_runs, results.get(key, []), steps,
                                      remedy_parts(remedy)).to_dict()
        finding.remedies.sort(key=lambda r: rank(r.verified))
    summary["combined"] = ["+".join(rid for rid, _ in parts) for parts in combos.values()]
    summary["not_tried"] = sorted({
        "+".join(rid for rid, _ in parts)
        for key, parts in {**candidates, **combos}.items()
        if any(o.status == "not_tried" for o in results.get(key, []))})
    summary["not_finished"] = sorted({
        "+".join(rid for rid, _ in parts)
        for key, parts in {**candidates, **combos}.items()
        if any(o.status == "not_finished" for o in results.get(key, []))})
    summary["duration_s"] = round(time.monotonic() - started, 3)
    data = report.to_dict()
    data["verify"] = summary
    return Report(data)


class _Stop:
    """Which findings a re-run has repaired so far (``solved``: better, the finding gone,
    nothing new), and so which candidates need not be re-run."""

    def __init__(self, problems: list[Any], steps: int) -> None:
        self.problems, self.steps = problems, steps
        self.serves: dict[str, list[Any]] = {}
        self.by: dict[int, str] = {}  # id(finding) -> the remedy that repaired it
        self.refresh()

    def refresh(self) -> None:
        """Take in the remedies a search round added to the findings."""
        self.serves = {}
        for finding in self.problems:
            for remedy in finding.remedies:
                self.serves.setdefault(candidate_key(remedy_parts(remedy)), []).append(finding)

    def repaired_by(self, job: Job, outcome: Outcome,
                    results: dict[str, list[Outcome]]) -> bool:
        """Record the findings ``outcome`` repairs; True when it repaired any."""
        if job.key == "baseline" or outcome.status != "ok":
            return False
        base = results.get("baseline", [])
        found = False
        for finding in self.serves.get(job.key, []):
            if id(finding) not in self.by and solved(verdict(
                    finding.kind, base, [outcome], self.steps, job.parts).to_dict()):
                self.by[id(finding)] = "+".join(rid for rid, _ in job.parts)
                found = True
        return found

    def skip(self, job: Job) -> str | None:
        """Why ``job`` need not run (every finding it is for is repaired), or None."""
        served = self.serves.get(job.key, [])
        if job.key == "baseline" or not served or any(id(f) not in self.by for f in served):
            return None
        names = sorted({f"{self.by[id(f)]} ({f.kind})" for f in served})
        return "not re-run: " + ", ".join(names) + " repaired it first"
