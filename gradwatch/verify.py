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

from .measure.probes import _compiling, unwrap_compiled
from .remedies.apply import run_added_pre_hooks

__all__ = ["ChildControl", "StopRun", "VerifySettings", "verify_report"]

#: Kinds whose remedy is not meant to change the training loss: for these, a finding gone
#: with the loss unchanged is "fixed" (a validation forward now in eval mode). Elsewhere it
#: is "no_effect": swapping ReLU for LeakyReLU hides dead units from the dying_relu
#: detector without reviving them.
LOSS_NEUTRAL = frozenset({"eval_mode"})
#: (kind, remedy) pairs whose re-run cannot show whether the finding is gone, because the
#: remedy removes what the detector measures: ``finding_gone`` is null, with this note.
BLIND = {("dying_relu", "leaky_relu"): "whether the units still sit below zero is not "
         "measured once they are LeakyReLUs (finding_gone: unknown)"}
#: Remedies that find where values go bad rather than fix anything: their re-run is
#: expected to stop with an error that names the operation.
DIAGNOSTICS = frozenset({"detect_anomaly", "assert_finite_inputs"})
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
    """Apply remedies to an unmodified script and stop it after ``max_steps`` steps.

    ``remedies`` are ``(id, params)`` pairs applied in order: usually one, two when a
    combination is verified (a re-initialisation and a lower learning rate). Global hooks,
    like :class:`~gradwatch.measure.probes.GlobalProbes`: :meth:`attach_first` is called before
    GlobalProbes registers (so that the model is changed before gradwatch adopts it, and the
    optimizer before gradwatch reads its learning rate), :meth:`attach_last` after (so that
    the stopping step is committed to the report first).
    """

    def __init__(self, remedies: Sequence[tuple[str, dict[str, Any]]],
                 max_steps: int | None) -> None:
        self.remedies = [(rid, dict(params or {})) for rid, params in remedies]
        self.max_steps = max_steps
        self.changes: list[str] = []
        self.status = "not_reached" if self.remedies else "none"
        self.error: str | None = None
        self.steps = 0
        self._depth = 0
        self._monitor: Any = None
        self._model: nn.Module | None = None
        self._model_done = False
        self._optimizers: set[int] = set()
        self._deferred: list[tuple[Any, dict[str, Any], torch.optim.Optimizer]] = []
        self._appliers: list[tuple[Any, dict[str, Any]]] = []
        self._done: set[str] = set()  # ids of the remedies that changed something
        if self.remedies:
            from .remedies.apply import APPLIERS

            for rid, params in self.remedies:
                applier = APPLIERS.get(rid)
                if applier is None:
                    self.status, self.error = "not_applicable", \
                        f"gradwatch cannot apply {rid!r} itself"
                    self._appliers = []
                    break
                self._appliers.append((applier, params))

    @property
    def remedy_id(self) -> str | None:
        """The remedies' ids joined by "+" (None without a remedy)."""
        return "+".join(rid for rid, _ in self.remedies) or None

    def attach_first(self, handles: Any, monitor: Any = None) -> None:
        """Register the hooks that change the model and optimizer; ``monitor`` counts the
        steps of a script that updates its weights by hand."""
        self._monitor = monitor
        if monitor is not None:
            monitor.step_listeners.append(self._committed)
        handles.add(module_hooks.register_module_forward_pre_hook(self._pre))
        handles.add(module_hooks.register_module_forward_hook(self._post, always_call=True))
        handles.add(optimizer_hooks.register_optimizer_step_pre_hook(self._step_pre))

    def attach_last(self, handles: Any) -> None:
        handles.add(optimizer_hooks.register_optimizer_step_post_hook(self._step_post))

    def _live(self) -> bool:
        return bool(self._appliers) and self.status in ("not_reached", "applied")

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
        if depth or self._model_done or not self._live():
            return None
        if not any(p.requires_grad for p in module.parameters()):
            return None
        # The script's first model with trainable parameters, called from outside any other
        # module: the one GlobalProbes adopts as a root right after this hook.
        self._model_done, self._model = True, module
        before = set(module._forward_pre_hooks)
        touched = False
        first = args[0] if args else None
        for applier, params in self._appliers:
            if applier.to_model is None:
                continue
            if isinstance(first, torch.Tensor):
                # What the first call feeds the model: some remedies choose by it (LayerNorm
                # rather than BatchNorm for (batch, time, features) inputs).
                params.setdefault("input_shape", list(first.shape))
            try:
                applier.to_model(module, params, self.changes)
            except Exception as exc:
                self._depth -= 1
                self._fail(exc)
            touched = True
            self._done.add(applier.id)
        if not touched:
            return None
        self.status = "applied"
        # Pre-hooks the remedy added (input standardisation, eval for no-grad forwards)
        # would only run from the next call on: run them on this first call too.
        return run_added_pre_hooks(module, before, args)[0]

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not _compiling():
            self._depth = max(0, self._depth - 1)

    def _step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._optimizers or not self._live():
            return
        self._optimizers.add(id(optimizer))
        for applier, params in self._appliers:
            if applier.to_optimizer is None:
                continue
            if applier.after_first_step:
                self._deferred.append((applier, params, optimizer))
                continue
            try:
                applier.to_optimizer(optimizer, self._model, params, self.changes)
            except Exception as exc:
                self._fail(exc)
            self._done.add(applier.id)
        self.status = "applied"

    def _committed(self, monitor: Any) -> None:
        """After gradwatch closed a step: stop a script that updates its weights by hand
        (optimizer steps stop in :meth:`_step_post`)."""
        if self.max_steps is not None and monitor.mode == "backward" and \
                monitor.step >= self.max_steps:
            raise StopRun

    def _step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        deferred, self._deferred = self._deferred, []
        for applier, params, opt in deferred:
            try:
                applier.to_optimizer(opt, self._model, params, self.changes)
            except Exception as exc:
                self._fail(exc)
            self._done.add(applier.id)
            self.changes.append(f"({applier.id} took effect from step {self.steps} on: the "
                                "first step had already started)")
        if self.max_steps is not None and self.steps >= self.max_steps:
            raise StopRun

    def summary(self) -> dict[str, Any]:
        """What the child did, for the parent: written into the child's report."""
        steps = max(self.steps, int(getattr(self._monitor, "step", 0) or 0))
        return {"remedy": self.remedy_id,
                "remedies": [{"id": rid, "params": params} for rid, params in self.remedies],
                "status": self.status, "changes": list(self.changes), "error": self.error,
                "not_reached": [rid for rid, _ in self.remedies if rid not in self._done],
                "steps": steps, "max_steps": self.max_steps}


# --------------------------------------------------------------------------- parent side
@dataclasses.dataclass
class VerifySettings:
    """How ``--verify`` re-runs: steps per re-run, seconds for the whole pass, repeats
    when the script is not deterministic, how many re-runs at once, and whether to try
    pairs of remedies where no single one fixes a finding."""

    budget: int = 200
    time_s: float = 600.0
    repeats: int = 3
    workers: int = 2
    only: frozenset[str] | None = None  # remedy ids to verify (None: every one offered)
    combine: bool = True
    options: Any = None  # the first run's Options and Thresholds, used by every re-run
    thresholds: Any = None


#: One candidate: the remedies applied together in one re-run, as (id, params) pairs.
Parts = tuple[tuple[str, dict[str, Any]], ...]


@dataclasses.dataclass
class _Job:
    key: str  # "baseline" or a candidate key
    parts: Parts
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
    #: The remedies the re-run's own report offers for what is still wrong, worst first.
    follow_ups: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _candidate_key(parts: Parts) -> str:
    return " + ".join(rid + " " + json.dumps(params, sort_keys=True, default=str)
                      for rid, params in parts)


def _remedy_params(remedy: Any) -> dict[str, Any]:
    params = getattr(remedy, "params", None)
    return dict(params) if isinstance(params, dict) else {}


def _remedy_parts(remedy: Any) -> Parts:
    """The (id, params) pairs a report's remedy applies: one, or a verified combination's."""
    params = _remedy_params(remedy)
    if "+" in remedy.id and isinstance(params.get("parts"), list):
        return tuple((p["id"], dict(p.get("params") or {})) for p in params["parts"])
    return ((remedy.id, params),)


def _child_command(script: Path, args: Sequence[str], job: _Job, report_path: Path,
                   steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "gradwatch", "run", "--json", str(report_path), "--quiet",
           "--max-steps", str(steps)]
    if job.parts:
        params: Any = [p for _, p in job.parts] if len(job.parts) > 1 else job.parts[0][1]
        cmd += ["--apply-remedy", "+".join(rid for rid, _ in job.parts), "--apply-params",
                json.dumps(params, default=str)]
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


def _follow_ups(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _read_outcome(report_path: Path, steps: int, returncode: int | None,
                  log: Path) -> _Outcome:
    if not report_path.is_file():
        tail = log.read_text(errors="replace")[-400:] if log.is_file() else ""
        return _Outcome("failed", note=f"the re-run wrote no report (exit {returncode}):"
                        f" {tail.strip()}")
    data = json.loads(report_path.read_text())
    applied = data.get("applied") or {}
    run = data["run"]
    series = data["series"]
    losses = list(zip(series.get("step", []), series.get("loss", []), strict=False))
    kinds = {f["kind"] for f in data["findings"] if f["severity"] in ("warning", "error")}
    out = _Outcome("ok", steps=int(run["steps"]), losses=losses, kinds=kinds,
                   changes=list(applied.get("changes") or []),
                   follow_ups=_follow_ups(data["findings"]))
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
    out.loss = _window_loss(losses, out.steps)
    out.first_loss = losses[0][1] if losses else None
    return out


def _run_job(script: Path, args: Sequence[str], job: _Job, steps: int, workdir: Path,
             deadline: float, settings: VerifySettings | None = None) -> _Outcome:
    """One re-run in a fresh process and its own temporary folder, killed at the deadline."""
    left = deadline - time.monotonic()
    if left <= 1:
        return _Outcome("not_finished", note="the --verify-time budget ran out before it "
                        "started")
    folder = Path(tempfile.mkdtemp(prefix="rerun-", dir=workdir))
    report_path, log = folder / "gradwatch-report.json", folder / "output.log"
    settings = settings or VerifySettings()
    context = _forkserver()
    if context is not None:
        process = context.Process(target=_child_main, args=(
            str(script), list(args), job.parts, steps, str(folder), str(report_path), str(log),
            settings.options, settings.thresholds), daemon=True)
        process.start()
        process.join(left)
        if process.is_alive():
            process.kill()
            process.join()
            return _Outcome("not_finished", note="stopped when the --verify-time budget ran "
                            "out")
        returncode = process.exitcode
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(log, "w") as out:
            try:
                returncode = subprocess.run(
                    _child_command(script, args, job, report_path, steps), cwd=folder, env=env,
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    timeout=left).returncode
            except subprocess.TimeoutExpired:
                return _Outcome("not_finished", note="stopped when the --verify-time budget "
                                "ran out")
    return _read_outcome(report_path, steps, returncode, log)


_FORKSERVER: list[Any] = []


def _forkserver() -> Any:
    """A multiprocessing context whose server has imported torch and gradwatch once, so that
    a re-run starts in a fresh process forked from it without paying the imports again (2-3 s
    each); None where there is no fork server (Windows) or GRADWATCH_VERIFY_SPAWN is set,
    and re-runs start as ``python -m gradwatch run`` processes instead."""
    if os.environ.get("GRADWATCH_VERIFY_SPAWN"):
        return None
    if not _FORKSERVER:
        import multiprocessing

        try:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["gradwatch.verify", "gradwatch.runner"])
        except (ValueError, AttributeError):
            context = None
        _FORKSERVER.append(context)
    return _FORKSERVER[0]


def _child_main(script: str, args: list[str], parts: Parts, steps: int, folder: str,
                report_path: str, log: str, options: Any, thresholds: Any) -> None:
    """A re-run inside a process forked from the fork server: the same as ``gradwatch run
    --max-steps N --apply-remedy ...``, with the script's output in ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(folder)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from .runner import run_script

    try:
        result = run_script(script, args, options, thresholds, ChildControl(parts, steps))
        if result.report is None:  # a process the re-run forked: not the re-run's report
            return
        result.report.save(report_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


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


def _verdict(kind: str, base: list[_Outcome], runs: list[_Outcome], steps: int,
             parts: Parts = ()) -> dict[str, Any]:
    """The ``verified`` record of one remedy against the baseline, over its repeats."""
    blind = next((BLIND[(kind, rid)] for rid, _ in parts if (kind, rid) in BLIND), None)
    done = [r for r in runs if r.status == "ok"]
    if not done:
        worst = next((r for r in runs if r.status in ("failed", "not_applicable")), None) or \
            (runs[0] if runs else _Outcome("not_finished", note="never started"))
        out: dict[str, Any] = {"steps": 0, "loss_before": None, "loss_after": None,
                               "improvement": None, "finding_gone": None,
                               "status": worst.status}
        if worst.note:
            out["note"] = worst.note
        if worst.status == "failed" and parts and all(rid in DIAGNOSTICS for rid, _ in parts):
            # Stopping at the first bad value, and naming it, is what it is for.
            out["status"] = "diagnostic"
            out["note"] = "a diagnostic, not a fix: it stopped the re-run where the first " \
                f"non-finite value appeared: {worst.note}"
        return out
    base_ok = [b for b in base if b.status == "ok"]
    before = _mean([b.loss for b in base_ok]) if base_ok else None
    after = _mean([r.loss for r in done])
    first = _mean([r.first_loss for r in done])
    gone = [kind not in r.kinds for r in done]
    finding_gone: bool | None = sum(gone) * 2 > len(gone)
    if blind:
        finding_gone = None  # the re-run no longer has what the detector measures
    in_baseline = not base_ok or any(kind in b.kinds for b in base_ok)
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
        status = "better" if learned else "fixed" if finding_gone else "no_effect"
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
        if status == "no_effect" and finding_gone and in_baseline and kind in LOSS_NEUTRAL:
            # What it fixes is not the training loss (a validation forward in eval mode).
            status, note = "fixed", f"the finding is gone; the training loss is unchanged " \
                f"({before:.3g} -> {after:.3g})"
    # Problems the remedy brings that the run without it did not have.
    before_kinds = set().union(*(b.kinds for b in base_ok)) if base_ok else set()
    new = sorted(k for k in set().union(*(r.kinds for r in done)) - before_kinds
                 if sum(k in r.kinds for r in done) * 2 > len(done))
    if new:
        out["new_findings"] = new
        note = (note + "; " if note else "") + "but the re-run has new findings: " + \
            ", ".join(new)
    if blind:
        note = (note + "; " if note else "") + blind
    out["status"] = status
    if note:
        out["note"] = note
    if base_ok and not in_baseline:
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


_RANK = {"better": 0, "fixed": 0, "no_effect": 1, "worse": 2, "diagnostic": 3, "failed": 3,
         "not_applicable": 4, "not_finished": 5}


def _rank(verified: dict[str, Any] | None) -> tuple[Any, ...]:
    """Sort key: better (or fixed) first; among those the finding gone, then the larger
    improvement (a fix that only ends non-finite values learns or it is not better), the
    lower loss, and no new findings."""
    if not verified:
        return (9, True, 0.0, math.inf, True)
    improvement = verified.get("improvement")
    if improvement is None:
        improvement = math.inf if verified.get("status") == "better" else 0.0
    after = verified.get("loss_after")
    return (_RANK.get(verified.get("status", ""), 6), not verified.get("finding_gone"),
            -improvement, after if after is not None else math.inf,
            bool(verified.get("new_findings")))


def _asked(settings: VerifySettings, parts: Parts) -> bool:
    """Is every remedy of ``parts`` among those ``--verify-remedies`` asked for?"""
    return settings.only is None or all(rid in settings.only for rid, _ in parts)


def _solved(verified: dict[str, Any] | None) -> bool:
    """A single remedy settles its finding: it helps, the finding goes, nothing new comes."""
    return bool(verified) and verified.get("status") in ("better", "fixed") and \
        bool(verified.get("finding_gone")) and not verified.get("new_findings")


def _combined_remedy(first: Any, second: dict[str, Any]) -> Any:
    """A report remedy for ``first`` and the re-run's follow-up ``second`` applied together."""
    from .findings import Remedy

    parts = [{"id": first.id, "params": _remedy_params(first)},
             {"id": second["id"], "params": dict(second.get("params") or {})}]
    text = (f"{first.id} and {second['id']} together (with {first.id} alone, the re-run "
            f"still needed {second['id']}): {first.text} {second.get('text') or ''}").strip()
    code = f"{first.code}\n{second.get('code') or ''}".strip()
    return Remedy(f"{first.id}+{second['id']}", text, code, params={"parts": parts})


class _Pass:
    """Re-runs of one ``--verify`` pass: a thread pool of child processes against one
    deadline, and their outcomes by candidate key."""

    def __init__(self, script: Path, args: Sequence[str], steps: int, workdir: Path,
                 deadline: float, pool: concurrent.futures.Executor,
                 settings: VerifySettings) -> None:
        self.script, self.args, self.steps, self.workdir = script, args, steps, workdir
        self.deadline, self.pool, self.settings = deadline, pool, settings
        self.results: dict[str, list[_Outcome]] = {}

    def submit(self, key: str, parts: Parts, repeat: int
               ) -> tuple[_Job, concurrent.futures.Future[_Outcome]]:
        job = _Job(key, parts, repeat)
        return job, self.pool.submit(_run_job, self.script, self.args, job, self.steps,
                                     self.workdir, self.deadline, self.settings)

    def run(self, candidates: dict[str, Parts], repeats: int, first: int = 0,
            say: Callable[[str], None] = lambda _m: None) -> None:
        """Re-run every candidate ``repeats`` times (repeat numbers from ``first``)."""
        futures = [self.submit(key, parts, r) for r in range(first, repeats)
                   for key, parts in candidates.items()]
        for job, future in futures:
            outcome = future.result()
            self.results.setdefault(job.key, []).append(outcome)
            if job.key != "baseline" and job.repeat == repeats - 1:
                say(f"verify: {'+'.join(rid for rid, _ in job.parts)}: {outcome.status}")


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
    from .remedies.apply import APPLIERS, refuses

    candidates: dict[str, Parts] = {}
    results: dict[str, list[_Outcome]] = {}
    for finding in problems:
        for remedy in finding.remedies:
            parts = _remedy_parts(remedy)
            key = _candidate_key(parts)
            if not _asked(settings, parts):
                continue  # not asked for (--verify-remedies): left without "verified"
            if any(rid not in APPLIERS for rid, _ in parts):
                # No process for what gradwatch cannot do itself (residual connections, ...).
                results[key] = [_Outcome("not_applicable", note="gradwatch cannot apply this "
                                         "remedy itself: change the code as shown")]
                continue
            why = next((w for w in (refuses(rid) for rid, _ in parts) if w), None)
            if why:  # no process for a remedy that needs what only the script has
                results[key] = [_Outcome("not_applicable", note=why)]
                continue
            candidates.setdefault(key, parts)
    original_steps = int(report.run.get("steps") or 0)
    steps = min(settings.budget, original_steps) if original_steps > 0 else settings.budget
    summary: dict[str, Any] = {"budget": steps, "candidates": len(candidates),
                               "window": WINDOW}
    combos: dict[str, Parts] = {}
    if candidates:
        original = list(zip(report.series.get("step", []), report.series.get("loss", []),
                            strict=False))
        with tempfile.TemporaryDirectory(prefix="gradwatch-verify-") as tmp, \
                concurrent.futures.ThreadPoolExecutor(max(1, settings.workers)) as pool:
            runs = _Pass(script, args, steps, Path(tmp), deadline, pool, settings)
            base_future = runs.submit("baseline", (), 0)[1]
            say(f"verify: {len(candidates)} remedies, {steps} steps each, "
                f"{settings.workers} at a time")
            firsts = [runs.submit(key, parts, 0) for key, parts in candidates.items()]
            base = base_future.result()
            runs.results["baseline"] = [base]
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
            for job, future in firsts:
                outcome = future.result()
                runs.results.setdefault(job.key, []).append(outcome)
                if repeats == 1:
                    say(f"verify: {'+'.join(rid for rid, _ in job.parts)}: {outcome.status}")
            if repeats > 1:
                runs.run({"baseline": (), **candidates}, repeats, first=1, say=say)
            results.update(runs.results)
            if settings.combine and base.status == "ok":
                combos = _pairs(problems, candidates, results, steps, settings)
            if combos:
                say(f"verify: {len(combos)} pairs of remedies where no single one settled "
                    "a finding")
                runs.run(combos, repeats, say=say)
                results.update(runs.results)
    base_runs = results.get("baseline", [])
    for finding in problems:
        for remedy in finding.remedies:
            if not _asked(settings, _remedy_parts(remedy)):
                continue  # not asked for: no "verified", ranked after the verified ones
            key = _candidate_key(_remedy_parts(remedy))
            remedy.verified = _verdict(finding.kind, base_runs, results.get(key, []), steps,
                                       _remedy_parts(remedy))
        finding.remedies.sort(key=lambda r: _rank(r.verified))
    summary["combined"] = ["+".join(rid for rid, _ in parts) for parts in combos.values()]
    summary["not_finished"] = sorted({
        "+".join(rid for rid, _ in parts)
        for key, parts in {**candidates, **combos}.items()
        if any(o.status == "not_finished" for o in results.get(key, []))})
    summary["duration_s"] = round(time.monotonic() - started, 3)
    from .report import Report

    data = report.to_dict()
    data["verify"] = summary
    return Report(data)


#: At most this many pairs per finding, and per pass.
PAIRS_PER_FINDING = 3
PAIRS_PER_PASS = 6


def _pairs(problems: list[Any], candidates: dict[str, Parts],
           results: dict[str, list[_Outcome]], steps: int,
           settings: VerifySettings) -> dict[str, Parts]:
    """Pairs to verify for the findings no single remedy settled; each is added to its
    finding's remedies (unverified until the pass re-runs it)."""
    from .remedies.apply import APPLIERS, refuses

    base = results.get("baseline", [])
    pairs: dict[str, Parts] = {}
    queued: dict[str, Any] = {}  # pair id -> its report remedy
    for finding in problems:
        tried = [r for r in finding.remedies if _candidate_key(_remedy_parts(r)) in candidates
                 and "+" not in r.id]
        verdicts = {id(r): _verdict(finding.kind, base, results.get(
            _candidate_key(_remedy_parts(r)), []), steps, _remedy_parts(r)) for r in tried}
        if any(_solved(v) for v in verdicts.values()):
            continue
        # The singles that ran and changed something, best first.
        firsts = sorted((r for r in tried if r.id not in DIAGNOSTICS and verdicts[id(r)][
            "status"] in ("better", "fixed", "no_effect") and verdicts[id(r)].get("changes")),
                        key=lambda r: _rank(verdicts[id(r)]))[:2]
        added = 0
        for first in firsts:
            outcome = next(o for o in results[_candidate_key(_remedy_parts(first))]
                           if o.status == "ok")
            for follow in outcome.follow_ups:
                if added >= PAIRS_PER_FINDING or len(pairs) >= PAIRS_PER_PASS:
                    break
                if follow["id"] == first.id or follow["id"] not in APPLIERS or \
                        follow["id"] in DIAGNOSTICS or refuses(follow["id"]) or \
                        not _asked(settings, ((follow["id"], {}),)):
                    continue
                remedy = _combined_remedy(first, follow)
                if remedy.id in queued:
                    # The same pair for another finding (whose measured params differ a
                    # little): one re-run answers for both.
                    remedy = dataclasses.replace(queued[remedy.id], verified=None)
                key = _candidate_key(_remedy_parts(remedy))
                if key not in candidates and all(r.id != remedy.id for r in finding.remedies):
                    pairs.setdefault(key, _remedy_parts(remedy))
                    queued.setdefault(remedy.id, remedy)
                    finding.remedies.append(remedy)
                    added += 1
                    break  # one follow-up per single: its re-run's most pressing remedy
    return pairs
