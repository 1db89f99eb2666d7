"""The logger core that TensorBoard, Weights & Biases and MLflow share: what is logged, under
which names, when; each backend (``tensorboard.py``, ``wandb.py``, ``mlflow.py``) only writes.

A :class:`Logger` is a monitor :class:`~gradwatch.measure.extension.Extension`. At each flush
(every ``sync_every`` steps, when the monitor has copied its rows to the host anyway, so no
device sync is added) it reads the monitor's :class:`~gradwatch.history.History` and hands the
backend one set of scalars per measured step:

- ``gradwatch/loss``, ``gradwatch/lr`` and ``gradwatch/grad_norm/<layer>``: the flush's last
  step with a measured gradient norm;
- ``gradwatch/update_ratio/<layer>`` (update norm / weight norm): the flush's last detail step;
- ``gradwatch/dead_fraction/<site>`` (ReLU family) and ``gradwatch/saturated_fraction/<site>``
  (sigmoid, tanh...): the flush's last step on which the activation sites were measured.

Names are the report's (``series`` of the JSON report), with every character other than
letters, digits, ``_``, ``-`` and ``.`` made ``_`` (MLflow allows no ``@``: site ``Net.relu@2``
is logged as ``Net.relu_2``); steps are gradwatch's 0-based step numbers, the report's too,
and the values are those of the report's series at those steps (where a long run's
downsampled series still has them). Non-finite values are not logged.

Findings as they appear: at a flush, when the time since the last judging is at least
``1 / findings_budget`` times what that judging cost (so judging takes about
``findings_budget`` of the wall time, 1% by default), the extensions write their facts as they
stand (as ``gw.report()`` inside the block does: which units are dead, a small host read),
the detectors run on the history so far, and each finding kind not logged yet is logged once
as text, ``gradwatch/findings/<kind>``. At the end of the run (:meth:`Logger.on_report`) the
kinds the final report adds are logged the same way, then every finding of the report as
``gradwatch/findings``, then the HTML report as an artifact (``gradwatch-report.html``), and
a run the logger opened is closed.

Writing happens in one background thread per logger, so a slow backend never slows the
training loop (what it cannot take is dropped and counted in :attr:`Logger.dropped`). A
backend that fails stops that logger only, with one warning; measuring and the user's run go
on. Under ``torch.distributed`` only rank 0 logs; a process forked from the training process
logs nothing.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..findings import Finding
from ..history import History, Series
from ..judge.context import Context
from ..judge.registry import run_detectors
from ..measure.extension import Extension
from ..report import Report

__all__ = ["PREFIX", "REPORT_NAME", "Logger", "finding_text", "flush_scalars", "metric_name"]

PREFIX = "gradwatch"
"""The first part of every name a logger writes."""

REPORT_NAME = "gradwatch-report.html"
"""The HTML report's file name among a run's artifacts."""

_UNSAFE = re.compile(r"[^\w.\-]")
_QUEUE_ITEMS = 256  # flushes a backend may lag behind before scalars are dropped
_CLOSE_WAIT_S = 60.0  # how long the end of a run waits for a backend to take the rest
_DEAD_KINDS = ("relu", "relu6")  # sites whose fraction is dead units (as in the report)


def metric_name(kind: str, name: str | None = None) -> str:
    """``gradwatch/<kind>``, or ``gradwatch/<kind>/<name>`` with ``name`` (a layer or an
    activation site) made safe for every backend.

    >>> metric_name("dead_fraction", "Net.relu@2")
    'gradwatch/dead_fraction/Net.relu_2'
    """
    return f"{PREFIX}/{kind}" if name is None else f"{PREFIX}/{kind}/{_UNSAFE.sub('_', name)}"


def _last_row(series: Series | None, block: str, first: int,
              last: int) -> tuple[int, np.ndarray] | None:
    """The latest row of ``series`` between steps ``first`` and ``last`` that has a finite
    value in ``block``: its step and that block's row (None: no such row)."""
    if series is None or not len(series):
        return None
    steps = series.steps
    inside = np.nonzero((steps >= first) & (steps <= last))[0]
    if not inside.size:
        return None
    values = series.block(block)
    for i in inside[::-1]:
        if np.isfinite(values[i]).any():
            return int(steps[i]), values[i]
    return None


def flush_scalars(history: History, ctx: Context, first: int,
                  last: int) -> dict[int, dict[str, float]]:
    """The scalars of the steps ``first`` to ``last`` (one flush), by step: the names and
    the choice of steps described in this module's docstring."""
    out: dict[int, dict[str, float]] = {}

    def put(step: int, key: str, value: float) -> None:
        if math.isfinite(value):
            out.setdefault(step, {})[key] = float(value)

    row = _last_row(history.steps, "grad_norm", first, last)
    if row is not None:
        step, grads = row
        at = int(np.searchsorted(history.steps.steps, step))
        put(step, metric_name("loss"), history.steps.block("loss")[at, 0])
        put(step, metric_name("lr"), history.steps.block("lr")[at, 0])
        for i, value in enumerate(grads):
            put(step, metric_name("grad_norm", ctx.name(i)), value)
    row = _last_row(history.detail, "update_norm", first, last)
    if row is not None:
        step, updates = row
        at = int(np.searchsorted(history.detail.steps, step))
        weights = history.detail.block("weight_norm")[at]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = updates / weights
        for i, value in enumerate(ratios):
            put(step, metric_name("update_ratio", ctx.name(i)), value)
    row = _last_row(history.extra.get("sites"), "fraction", first, last)
    if row is not None:
        step, fractions = row
        for i, value in enumerate(fractions[: len(history.sites)]):
            kind = "dead_fraction" if history.sites[i].kind in _DEAD_KINDS else \
                "saturated_fraction"
            put(step, metric_name(kind, ctx.site_name(i)), value)
    return out


def finding_text(finding: Finding) -> str:
    """One finding as a line of Markdown: severity, kind, when, where, and its summary."""
    where = ""
    if finding.layers:
        shown = ", ".join(finding.layers[:6])
        more = len(finding.layers) - 6
        where = f" in {shown}" + (f" and {more} more" if more > 0 else "")
    return (f"**{finding.severity}** `{finding.kind}` from step {finding.first_step}{where}: "
            f"{finding.summary}")


def _other_rank() -> bool:
    """Whether this process is a ``torch.distributed`` rank other than 0."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


class Logger(Extension):
    """A monitor extension that logs the run to one backend (a subclass).

    Pass loggers to ``gradwatch.watch(model, optimizer, loggers=[...])`` or
    ``gradwatch.runner.run_script(..., extensions=[...])``; one logger serves one run. A
    backend implements :meth:`open`, :meth:`write_scalars`, :meth:`write_text`,
    :meth:`write_report` and :meth:`close_backend`; they run in the logger's own thread, in
    that order, never concurrently. ``findings_budget`` is the share of the run's wall time
    that judging findings during the run may take (0: findings only at the end; 1: judged
    at every flush).
    """

    title = "logger"  # the backend's name in messages

    def __init__(self, *, findings_budget: float = 0.01) -> None:
        if not 0 <= findings_budget <= 1:
            raise ValueError(f"findings_budget is a share of the run's time, in [0, 1]; got "
                             f"{findings_budget!r}")
        self.findings_budget = findings_budget
        self.errors: list[str] = []  # what stopped the backend (one at most)
        self.dropped = 0  # sets of scalars a lagging backend could not take
        self.logged_kinds: set[str] = set()  # finding kinds logged so far
        self.last_step = -1  # the latest step logged
        self._state = "new"  # "new" | "open" | "off" (other rank, failed) | "closed"
        self._pid = os.getpid()
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(_QUEUE_ITEMS)
        self._thread: threading.Thread | None = None
        self._judged_at = 0.0  # perf_counter of the last judging
        self._judge_cost = 0.0  # seconds it took

    # ------------------------------------------------------------------ the backend
    def open(self) -> None:
        """Open the run or writer (in the logger's thread, at the first flush)."""

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        """Log scalars (``metric_name`` names) at ``step``."""
        raise NotImplementedError

    def write_text(self, tag: str, text: str, step: int) -> None:
        """Log Markdown ``text`` under ``tag`` at ``step``."""
        raise NotImplementedError

    def write_report(self, html: str, step: int) -> None:
        """Store the HTML report as an artifact named :data:`REPORT_NAME`."""
        raise NotImplementedError

    def close_backend(self, status: str) -> None:
        """The run ended with ``status`` (``completed``, ``failed``, ``interrupted``)."""

    # ------------------------------------------------------------------ the extension
    def bind(self, monitor: Any) -> None:
        if getattr(self, "monitor", None) is not None and self.monitor is not monitor:
            raise ValueError(f"this {self.title} logger already logs another run: make one "
                             f"logger per watch or per gradwatch run")
        super().bind(monitor)

    def on_flush(self, steps: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        if len(steps) == 0 or not self._active():
            return
        try:
            first, last = int(steps[0]), int(steps[-1])
            history = self.monitor.history
            ctx = Context(history, self.monitor.thresholds)
            for step, values in sorted(flush_scalars(history, ctx, first, last).items()):
                self._submit(lambda s=step, v=values: self.write_scalars(s, v))
                self.last_step = max(self.last_step, step)
            self._judge(last)
        except Exception as exc:  # gradwatch's own bug: this logger stops, nothing else
            self._fail(exc)

    def on_report(self, report: Report | None) -> None:
        """The run is over: its remaining findings, the list of all of them and the HTML
        report, then the run is closed. ``report`` None (the script never ran): close only.
        Waits up to a minute for the backend to take what is queued."""
        if report is not None and self._active():
            try:
                step = max(self.last_step, int(report.run.get("steps") or 0) - 1, 0)
                self._log_findings(report.findings, step, wait=True)
                lines = [finding_text(f) for f in report.findings] or ["no findings"]
                status = report.run.get("status", "completed")
                text = f"run {status} after {report.run.get('steps')} steps\n\n" + \
                    "\n".join(f"- {line}" for line in lines)
                self._submit(lambda: self.write_text(metric_name("findings"), text, step),
                             wait=True)
                html = report.to_html()
                self._submit(lambda: self.write_report(html, step), wait=True)
                self._submit(lambda: self.close_backend(status), wait=True)
            except Exception as exc:
                self._fail(exc)
        self._stop()
        monitor = getattr(self, "monitor", None)
        if self.errors and monitor is not None and monitor.options.strict:
            raise RuntimeError(f"the {self.title} logger failed: {self.errors[0]}")

    # ------------------------------------------------------------------ inside
    def _active(self) -> bool:
        """Whether to log now; starts the backend's thread at the first call that does."""
        if self._state in ("off", "closed") or os.getpid() != self._pid:
            return False
        if _other_rank():
            self._state = "off"  # under DDP only rank 0 logs
            return False
        if self._state == "new":
            self._state = "open"
            self._thread = threading.Thread(target=self._work, daemon=True,
                                            name=f"gradwatch-{self.title}")
            self._thread.start()
            self._submit(self.open, wait=True)
        return True

    def _submit(self, call: Callable[[], None], wait: bool = False) -> None:
        """Queue a backend call; without ``wait``, one the queue has no room for is dropped."""
        if self._state != "open":
            return
        try:
            if wait:
                self._queue.put(call, timeout=_CLOSE_WAIT_S)
            else:
                self._queue.put_nowait(call)
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            if self._state == "open":
                try:
                    call()
                except Exception as exc:
                    self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._state == "off":
            return
        self._state = "off"
        self.errors.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"gradwatch: the {self.title} logger stopped and logs nothing more "
                      f"({type(exc).__name__}: {exc}); measuring and the run go on",
                      RuntimeWarning, stacklevel=2)

    def _stop(self) -> None:
        """End the backend's thread once it has taken what is queued."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put(None, timeout=_CLOSE_WAIT_S)
            except queue.Full:
                pass
            self._thread.join(_CLOSE_WAIT_S)
        if self._state != "off":
            self._state = "closed"

    def _judge(self, step: int) -> None:
        """Run the detectors if the budget allows, and log the finding kinds not logged yet."""
        if self.findings_budget <= 0:
            return
        started = time.perf_counter()
        if self.findings_budget < 1 and \
                started - self._judged_at < self._judge_cost / self.findings_budget:
            return
        for ext in self.monitor.extensions:  # their facts as they stand, as gw.report() does
            if not isinstance(ext, Logger):
                ext.on_snapshot()
        findings, _ = run_detectors(self.monitor.history, self.monitor.thresholds)
        self._log_findings(findings, step, wait=False)
        self._judged_at = time.perf_counter()
        self._judge_cost = self._judged_at - started

    def _log_findings(self, findings: list[Finding], step: int, wait: bool) -> None:
        for finding in findings:
            if finding.kind in self.logged_kinds:
                continue
            self.logged_kinds.add(finding.kind)
            text = finding_text(finding)
            self._submit(lambda k=finding.kind, t=text: self.write_text(
                metric_name("findings", k), t, step), wait=wait)
