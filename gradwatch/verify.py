"""``gradwatch run --verify``: prove a remedy on the user's own, unmodified script.

Two halves:

* the parent (:func:`verify_report`) re-runs the script in fresh processes, one per remedy
  of each warning/error finding plus one baseline without any remedy, all for the same
  bounded number of steps, and writes ``verified`` into each remedy of the report;
* the child (:class:`ChildControl`, inside ``gradwatch run --apply-remedy ...``) applies the
  remedy to the script's live model before its first forward and to its optimizer before
  its first step, and stops the script cleanly after ``--max-steps`` optimizer steps.

Re-runs start from the user's script file, never a copy, and never write to it. Each runs
in its own temporary folder (its current directory), so that whatever the script writes
(checkpoints, logs) lands there and not over the user's files. The script's own folder is
on ``sys.path`` as in a normal run; data read by a path relative to the current folder is
not found, which the report says when the baseline fails.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.optim import optimizer as optimizer_hooks

from .probes import _compiling, unwrap_compiled
from .remedies.apply import run_added_pre_hooks

__all__ = ["ChildControl", "StopRun", "VerifySettings", "verify_report"]

#: Share of a re-run's last steps whose mean loss is compared (at least one step).
WINDOW = 0.1
#: A remedy is "better" above this improvement (loss_before / loss_after), "worse" below
#: its inverse; in between it has no measurable effect.
MARGIN = 1.1
#: Relative tolerance when the baseline re-run's first losses are compared with the first
#: run's: the re-runs use one thread, the first run may use several, so sums can round
#: differently; an unseeded script differs by far more.
DETERMINISM_RTOL = 1e-3


class StopRun(BaseException):
    """Raised inside the script to end a re-run cleanly; a BaseException so that the
    script's own ``except Exception`` does not swallow it."""


# ---------------------------------------------------------------------------- child side
class ChildControl:
    """Apply one remedy to an unmodified script and stop it after ``max_steps`` steps.

    Global hooks, like :class:`~gradwatch.probes.GlobalProbes`: :meth:`attach_first` is
    called before GlobalProbes registers (so that the model is changed before gradwatch
    adopts it, and the optimizer before gradwatch reads its learning rate), :meth:`attach_last`
    after (so that the stopping step is committed to the report first).
    """

    def __init__(self, remedy_id: str | None, params: dict[str, Any] | None,
                 max_steps: int | None) -> None:
        self.remedy_id, self.params, self.max_steps = remedy_id, dict(params or {}), max_steps
        self.changes: list[str] = []
        self.status = "not_reached" if remedy_id else "none"
        self.error: str | None = None
        self.steps = 0
        self._depth = 0
        self._model: nn.Module | None = None
        self._model_done = False
        self._optimizers: set[int] = set()
        self._applier: Any = None
        if remedy_id:
            from .remedies.apply import APPLIERS

            self._applier = APPLIERS.get(remedy_id)
            if self._applier is None:
                self.status, self.error = "not_applicable", \
                    f"gradwatch cannot apply {remedy_id!r} itself"

    def attach_first(self, handles: Any) -> None:
        handles.add(module_hooks.register_module_forward_pre_hook(self._pre))
        handles.add(module_hooks.register_module_forward_hook(self._post, always_call=True))
        handles.add(optimizer_hooks.register_optimizer_step_pre_hook(self._step_pre))

    def attach_last(self, handles: Any) -> None:
        handles.add(optimizer_hooks.register_optimizer_step_post_hook(self._step_post))

    def _fail(self, exc: BaseException) -> None:
        from .remedies.apply import NotApplicable

        if isinstance(exc, NotApplicable):
            self.status, self.error = "not_applicable", str(exc)
        else:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
        raise StopRun from exc

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if _compiling():
            return None
        module = unwrap_compiled(module)
        depth, self._depth = self._depth, self._depth + 1
        if depth or self._model_done or self._applier is None or \
                self.status not in ("not_reached", "applied"):
            return None
        if not any(p.requires_grad for p in module.parameters()):
            return None
        # The script's first model with trainable parameters, called from outside any other
        # module: the one GlobalProbes adopts as a root right after this hook.
        self._model_done, self._model = True, module
        if self._applier.to_model is None:
            return None
        before = set(module._forward_pre_hooks)
        try:
            self._applier.to_model(module, self.params, self.changes)
        except Exception as exc:
            self._fail(exc)
            return None
        self.status = "applied"
        # Pre-hooks the remedy added (input standardisation, eval for no-grad forwards)
        # would only run from the next call on: run them on this first call too.
        return run_added_pre_hooks(module, before, args)[0]

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not _compiling():
            self._depth = max(0, self._depth - 1)

    def _step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._applier is None or self._applier.to_optimizer is None or \
                id(optimizer) in self._optimizers or self.status not in ("not_reached",
                                                                          "applied"):
            return
        self._optimizers.add(id(optimizer))
        try:
            self._applier.to_optimizer(optimizer, self._model, self.params, self.changes)
        except Exception as exc:
            self._fail(exc)
        self.status = "applied"

    def _step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self.max_steps is not None and self.steps >= self.max_steps:
            raise StopRun

    def summary(self) -> dict[str, Any]:
        """What the child did, for the parent: written into the child's report."""
        return {"remedy": self.remedy_id, "params": self.params, "status": self.status,
                "changes": list(self.changes), "error": self.error, "steps": self.steps,
                "max_steps": self.max_steps}


# --------------------------------------------------------------------------- parent side
@dataclasses.dataclass
class VerifySettings:
    """How ``--verify`` re-runs: steps per re-run, seconds for the whole pass, repeats
    when the script is not deterministic, and how many re-runs at once."""

    budget: int = 200
    time_s: float = 600.0
    repeats: int = 3
    workers: int = 2
    only: frozenset[str] | None = None  # remedy ids to verify (None: every one offered)


@dataclasses.dataclass
class _Job:
    key: str  # "baseline" or a candidate key
    remedy_id: str | None
    params: dict[str, Any]
    repeat: int


@dataclasses.dataclass
class _Outcome:
    """One finished re-run, reduced to what the comparison needs."""

    status: str  # "ok", "failed", "not_finished", "not_applicable"
    steps: int = 0
    loss: float | None = None  # mean over the last WINDOW of steps; None: not finite
    first_loss: float | None = None
    losses: list[tuple[int, float | None]] = dataclasses.field(default_factory=list)
    kinds: set[str] = dataclasses.field(default_factory=set)
    changes: list[str] = dataclasses.field(default_factory=list)
    note: str | None = None


def _candidate_key(remedy_id: str, params: dict[str, Any]) -> str:
    return remedy_id + " " + json.dumps(params, sort_keys=True, default=str)


def _remedy_params(remedy: Any) -> dict[str, Any]:
    params = getattr(remedy, "params", None)
    return dict(params) if isinstance(params, dict) else {}


def _child_command(script: Path, args: Sequence[str], job: _Job, report_path: Path,
                   steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "gradwatch", "run", "--json", str(report_path), "--quiet",
           "--max-steps", str(steps)]
    if job.remedy_id is not None:
        cmd += ["--apply-remedy", job.remedy_id, "--apply-params",
                json.dumps(job.params, default=str)]
    return [*cmd, "--", str(script), *args]


def _window_loss(losses: list[tuple[int, float | None]], steps: int) -> float | None:
    """Mean loss over the last WINDOW of ``steps``; None when any of it is not finite."""
    if not losses:
        return None
    start = steps - max(1, round(steps * WINDOW))
    window = [v for s, v in losses if s >= start] or [losses[-1][1]]
    if any(v is None or not math.isfinite(v) for v in window):
        return None
    return sum(window) / len(window)  # type: ignore[arg-type]


def _read_outcome(report_path: Path, steps: int, proc: subprocess.CompletedProcess[str],
                  log: Path) -> _Outcome:
    if not report_path.is_file():
        tail = log.read_text(errors="replace")[-400:] if log.is_file() else ""
        return _Outcome("failed", note=f"the re-run wrote no report (exit {proc.returncode}):"
                        f" {tail.strip()}")
    data = json.loads(report_path.read_text())
    applied = data.get("applied") or {}
    run = data["run"]
    series = data["series"]
    losses = list(zip(series.get("step", []), series.get("loss", []), strict=False))
    kinds = {f["kind"] for f in data["findings"] if f["severity"] in ("warning", "error")}
    out = _Outcome("ok", steps=int(run["steps"]), losses=losses, kinds=kinds,
                   changes=list(applied.get("changes") or []))
    if applied.get("status") in ("not_applicable", "failed"):
        out.status, out.note = applied["status"], applied.get("error")
        return out
    if applied.get("remedy") and applied.get("status") != "applied":
        out.status, out.note = "not_applicable", "the script never reached the moment " \
            "this remedy applies at (a model's first forward or an optimizer's first step)"
        return out
    if run["status"] != "completed":
        out.status, out.note = "failed", run.get("error") or f"run {run['status']}"
        return out
    out.loss = _window_loss(losses, out.steps)
    out.first_loss = losses[0][1] if losses else None
    return out


def _run_job(script: Path, args: Sequence[str], job: _Job, steps: int, workdir: Path,
             deadline: float) -> _Outcome:
    """One re-run in a fresh process and its own temporary folder, killed at the deadline."""
    left = deadline - time.monotonic()
    if left <= 1:
        return _Outcome("not_finished", note="the --verify-time budget ran out before it "
                        "started")
    folder = Path(tempfile.mkdtemp(prefix="rerun-", dir=workdir))
    report_path, log = folder / "gradwatch-report.json", folder / "output.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as out:
        try:
            proc = subprocess.run(_child_command(script, args, job, report_path, steps),
                                  cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=left, text=True)
        except subprocess.TimeoutExpired:
            return _Outcome("not_finished", note="stopped when the --verify-time budget ran "
                            "out")
    return _read_outcome(report_path, steps, proc, log)


def _deterministic(original: list[tuple[int, float | None]],
                   rerun: list[tuple[int, float | None]]) -> bool:
    """Do the first losses of the baseline re-run repeat those of the first run?"""
    first = dict(original)
    common = [(first[s], v) for s, v in rerun if s in first][:10]
    if not common:
        return False
    for a, b in common:
        if a is None or b is None:
            if a is not b:
                return False
        elif not math.isclose(a, b, rel_tol=DETERMINISM_RTOL, abs_tol=1e-12):
            return False
    return True


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _spread(values: list[float | None]) -> list[float | None]:
    finite = [v for v in values if v is not None]
    return [min(finite), max(finite)] if finite else [None, None]


def _verdict(kind: str, base: list[_Outcome], runs: list[_Outcome],
             steps: int) -> dict[str, Any]:
    """The ``verified`` record of one remedy against the baseline, over its repeats."""
    done = [r for r in runs if r.status == "ok"]
    if not done:
        worst = next((r for r in runs if r.status in ("failed", "not_applicable")), None) or \
            (runs[0] if runs else _Outcome("not_finished", note="never started"))
        out: dict[str, Any] = {"steps": 0, "loss_before": None, "loss_after": None,
                               "improvement": None, "finding_gone": None,
                               "status": worst.status}
        if worst.note:
            out["note"] = worst.note
        return out
    base_ok = [b for b in base if b.status == "ok"]
    before = _mean([b.loss for b in base_ok]) if base_ok else None
    after = _mean([r.loss for r in done])
    first = _mean([r.first_loss for r in done])
    gone = [kind not in r.kinds for r in done]
    finding_gone = sum(gone) * 2 > len(gone)
    improvement = before / after if before is not None and after not in (None, 0.0) \
        else None
    out = {"steps": min(r.steps for r in done), "loss_before": before, "loss_after": after,
           "improvement": improvement, "finding_gone": finding_gone}
    if after is None:
        status = "worse" if before is not None else "no_effect"
        note = "the loss is not finite with this remedy" + \
            ("" if before is not None else ", as without it")
    elif before is None:
        # Without the remedy the loss is not finite: finite is better only if it learns.
        learned = first is not None and after < 0.9 * first
        status = "better" if learned or finding_gone else "no_effect"
        note = "without it the loss is not finite; with it the loss " + \
            (f"falls from {first:.3g} to {after:.3g}" if learned else
             f"stays finite but does not fall ({after:.3g})")
    else:
        assert improvement is not None or after == 0.0
        ratio = improvement if improvement is not None else math.inf
        status = "better" if ratio >= MARGIN else "worse" if ratio <= 1 / MARGIN else \
            "no_effect"
        note = {"better": None, "no_effect": "no measurable effect on the loss",
                "worse": f"makes the loss worse: {before:.3g} -> {after:.3g}"}[status]
    out["status"] = status
    if note:
        out["note"] = note
    if base_ok and all(kind not in b.kinds for b in base_ok):
        out["finding_in_baseline"] = False
    changes = next((r.changes for r in done if r.changes), [])
    if changes:
        out["changes"] = changes
    if len(runs) > 1:
        out["repeats"] = len(done)
        out["spread"] = {"loss_before": _spread([b.loss for b in base_ok]),
                         "loss_after": _spread([r.loss for r in done])}
        out["finding_gone_runs"] = f"{sum(gone)}/{len(gone)}"
    return out


_RANK = {"better": 0, "no_effect": 1, "worse": 2, "failed": 3, "not_applicable": 4,
         "not_finished": 5}


def _rank(verified: dict[str, Any] | None) -> tuple[Any, ...]:
    """Sort key: better first, the finding gone before not, then larger improvement."""
    if not verified:
        return (9, 1, 0.0)
    improvement = verified.get("improvement")
    if improvement is None:
        improvement = math.inf if verified.get("status") == "better" else 0.0
    return (_RANK.get(verified.get("status", ""), 6), not verified.get("finding_gone"),
            -improvement)


def verify_report(report: Any, script: str | os.PathLike[str], args: Sequence[str] = (),
                  settings: VerifySettings | None = None,
                  progress: Callable[[str], None] | None = None) -> Any:
    """Re-run ``script`` with each remedy of each warning/error finding; return the report
    with ``verified`` in every remedy tried and each finding's remedies ordered by effect."""
    settings = settings or VerifySettings()
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    deadline = started + settings.time_s
    script = Path(script).resolve()
    problems = [f for f in report.findings if f.severity in ("warning", "error")]
    candidates: dict[str, tuple[str, dict[str, Any]]] = {}
    for finding in problems:
        for remedy in finding.remedies:
            params = _remedy_params(remedy)
            candidates.setdefault(_candidate_key(remedy.id, params), (remedy.id, params))
    try:
        from .remedies.apply import APPLIERS
    except ImportError:  # pragma: no cover - the catalogue ships with its appliers
        APPLIERS = {}
    results: dict[str, list[_Outcome]] = {}
    for key, (rid, _params) in list(candidates.items()):
        if settings.only is not None and rid not in settings.only:
            del candidates[key]  # not asked for (--verify-remedies): left without "verified"
            continue
        if rid not in APPLIERS:
            # No process for what gradwatch cannot do itself (residual connections, ...).
            results[key] = [_Outcome("not_applicable", note="gradwatch cannot apply this "
                                     "remedy itself: change the code as shown")]
            del candidates[key]
    original_steps = int(report.run.get("steps") or 0)
    steps = min(settings.budget, original_steps) if original_steps > 0 else settings.budget
    summary: dict[str, Any] = {"budget": steps, "candidates": len(candidates),
                               "window": WINDOW}
    if candidates:
        original = list(zip(report.series.get("step", []), report.series.get("loss", []),
                            strict=False))
        with tempfile.TemporaryDirectory(prefix="gradwatch-verify-") as tmp, \
                concurrent.futures.ThreadPoolExecutor(max(1, settings.workers)) as pool:
            workdir = Path(tmp)

            def submit(job: _Job) -> concurrent.futures.Future[_Outcome]:
                return pool.submit(_run_job, script, args, job, steps, workdir, deadline)

            futures: list[tuple[_Job, concurrent.futures.Future[_Outcome]]] = []
            base_job = _Job("baseline", None, {}, 0)
            base_future = submit(base_job)
            futures.append((base_job, base_future))
            for key, (rid, params) in candidates.items():
                job = _Job(key, rid, params, 0)
                futures.append((job, submit(job)))
            say(f"verify: {len(candidates)} remedies, {steps} steps each, "
                f"{settings.workers} at a time")
            base = base_future.result()
            deterministic = base.status == "ok" and _deterministic(original, base.losses)
            summary["deterministic"] = deterministic
            if base.status != "ok":
                note = base.note or base.status
                if "No such file" in note or "FileNotFound" in note:
                    note += " (re-runs start in a temporary folder: a path relative to the " \
                        "current folder is not found there)"
                summary["baseline_error"] = note
            repeats = 1 if deterministic or base.status != "ok" else max(1, settings.repeats)
            summary["repeats"] = repeats
            if repeats > 1:
                say(f"verify: the first losses differ between runs (no fixed seed?): "
                    f"{repeats} repeats each")
            for r in range(1, repeats):
                futures.append((_Job("baseline", None, {}, r), submit(_Job("baseline", None,
                                                                           {}, r))))
                for key, (rid, params) in candidates.items():
                    job = _Job(key, rid, params, r)
                    futures.append((job, submit(job)))
            for job, future in futures:
                outcome = future.result()
                results.setdefault(job.key, []).append(outcome)
                if job.key != "baseline" and job.repeat == repeats - 1:
                    say(f"verify: {job.remedy_id}: {outcome.status}")
    base_runs = results.get("baseline", [])
    for finding in problems:
        for remedy in finding.remedies:
            if settings.only is not None and remedy.id not in settings.only:
                continue  # not asked for: no "verified", ranked after the verified ones
            key = _candidate_key(remedy.id, _remedy_params(remedy))
            remedy.verified = _verdict(finding.kind, base_runs, results.get(key, []), steps)
        finding.remedies.sort(key=lambda r: _rank(r.verified))
    summary["not_finished"] = sorted({
        cand[0] for key, cand in candidates.items()
        if any(o.status == "not_finished" for o in results.get(key, []))})
    summary["duration_s"] = round(time.monotonic() - started, 3)
    from .report import Report

    data = report.to_dict()
    data["verify"] = summary
    return Report(data)
