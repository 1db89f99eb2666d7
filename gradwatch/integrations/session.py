"""What the trainer callbacks share, whatever the framework: one watched run from the
trainer's start to its end, its report written once, and its findings as numbers and lines
that a trainer's logger can take.

A callback never breaks the user's run: an error inside gradwatch while it starts, ends or
writes is turned into a :class:`RuntimeWarning` and the training goes on (``strict=True``
re-raises it, as it does for ``gradwatch.watch``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..findings import KINDS, SEVERITIES
from ..report import Report
from ..report.text import printable
from ..watch import OPTION_NAMES, Watch, watch

__all__ = ["DEFAULT_NAME", "Session", "check_options", "finding_counts", "finding_lines",
           "unwrap_optimizer"]

DEFAULT_NAME = "gradwatch-report"
"""The report's file name (``.json``, and ``.html`` beside it) in the run's folder."""


def check_options(options: Mapping[str, Any]) -> None:
    """Refuse unknown ``gradwatch.watch`` options when the callback is created, not in the
    middle of training."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown gradwatch.watch option(s) {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(OPTION_NAMES)}")


def finding_counts(report: Report, prefix: str = "gradwatch/") -> dict[str, float]:
    """Numbers for a metrics logger: findings in all, per severity and per kind (every
    severity and kind, zeros included, so that runs compare column by column)."""
    counts: dict[str, float] = {f"{prefix}findings": float(len(report.findings))}
    for severity in SEVERITIES:
        counts[f"{prefix}severity/{severity}"] = float(
            sum(f.severity == severity for f in report.findings))
    for kind in KINDS:
        counts[f"{prefix}kind/{kind}"] = float(sum(f.kind == kind for f in report.findings))
    return counts


def finding_lines(report: Report, paths: Sequence[Path] = ()) -> list[str]:
    """One line per finding (severity, kind, layers, summary), the run's status and where
    the report was written: the text a logger or the console gets."""
    run = report.run
    problems = len(report.problems)
    head = (f"gradwatch: {run.get('steps')} steps ({run.get('status')}), "
            f"{len(report.findings)} finding(s), {problems} of them warning or error")
    lines = [head]
    for f in report.findings:
        where = f" [{', '.join(f.layers[:4])}{', ...' if len(f.layers) > 4 else ''}]" \
            if f.layers else ""
        lines.append(printable(f"  {f.severity}: {f.kind}{where}: {f.summary}"))
    lines += [f"  report: {p}" for p in paths]
    return lines


class Session:
    """One run watched by a callback: :meth:`start` when training starts, :meth:`finish`
    once when it ends, fails or is interrupted (later calls do nothing)."""

    def __init__(self, options: Mapping[str, Any], report_path: str | os.PathLike[str] | None,
                 html: bool, verbose: bool) -> None:
        self.options = dict(options)
        self.report_path = report_path
        self.html = html
        self.verbose = verbose
        self.watch: Watch | None = None
        self.report: Report | None = None
        self.paths: list[Path] = []

    @property
    def strict(self) -> bool:
        return bool(self.options.get("strict", False))

    @property
    def active(self) -> bool:
        return self.watch is not None

    def start(self, model: nn.Module, optimizers: Sequence[Any],
              framework: dict[str, Any] | None) -> bool:
        """Watch ``model`` and those of ``optimizers`` that are torch optimizers (wrappers
        are unwrapped through ``.optimizer``); record ``framework`` as the run's
        ``facts["framework"]`` so that remedies speak its language. False (and a warning)
        when it cannot be watched."""
        try:
            found = [unwrap_optimizer(o) for o in optimizers]
            self.watch = watch(model, [o for o in found if o is not None], **self.options)
            if framework is not None:
                self.watch.monitor.history.facts["framework"] = framework
            self.report, self.paths = None, []
            return True
        except Exception as exc:
            self.watch = None
            self.warn("could not start watching", exc)
            return False

    def finish(self, status: str, error: str | None, folder: str | os.PathLike[str]
               ) -> Report | None:
        """Close the watch (every hook removed), build the report and write it (see
        :meth:`targets`); the report, or None when nothing was watched or it failed."""
        gw, self.watch = self.watch, None
        if gw is None:
            return None
        try:
            gw.close(status, error)
            self.report = gw.report()
        except Exception as exc:
            self.warn("could not build the report", exc)
            return None
        for target in self.targets(folder):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                self.paths.append(self.report.save(target))
            except Exception as exc:
                self.warn(f"could not write the report to {target}", exc)
        return self.report

    def targets(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Where the report goes: ``report_path`` (its suffix picks the format), or
        ``gradwatch-report.json`` in ``folder``; with ``html``, a ``.json`` report gets its
        HTML page beside it."""
        path = Path(self.report_path) if self.report_path is not None else \
            Path(folder) / f"{DEFAULT_NAME}.json"
        paths = [path]
        if self.html and path.suffix.lower() == ".json":
            paths.append(path.with_suffix(".html"))
        return paths

    def say(self, lines: Sequence[str]) -> None:
        """Print the findings' lines (``verbose``): where no logger takes text, the console
        of the script or notebook does."""
        if self.verbose:
            print("\n".join(lines), flush=True)

    def warn(self, what: str, exc: BaseException) -> None:
        if self.strict:
            raise exc
        warnings.warn(f"gradwatch {what}: {type(exc).__name__}: {exc}; the training is not "
                      f"affected", RuntimeWarning, stacklevel=3)


class SessionReport:
    """What a callback built on a :class:`Session` offers its user: the last report and
    the files it went to (the Lightning and the Hugging Face callback alike)."""

    _session: Session

    @property
    def report(self) -> Report | None:
        """The report of the last run watched (None before one ended)."""
        return self._session.report

    @property
    def report_paths(self) -> list[Path]:
        """The files the last report was written to."""
        return list(self._session.paths)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside a framework's wrapper (Lightning's ``LightningOptimizer``,
    accelerate's ``AcceleratedOptimizer``: ``.optimizer``), whose ``step`` the wrapper
    calls and whose hooks therefore fire; None for what is no optimizer."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
