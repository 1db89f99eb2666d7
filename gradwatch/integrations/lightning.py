"""``GradwatchCallback`` for PyTorch Lightning: ``gradwatch.watch`` on a LightningModule
trained by ``Trainer.fit``, for code that cannot be wrapped in a ``with`` block or run under
``gradwatch run`` (notebooks, launchers, the Lightning CLI).

    from gradwatch.integrations.lightning import GradwatchCallback
    trainer = Trainer(..., callbacks=[GradwatchCallback()])
    trainer.fit(model, data)   # report: <log dir>/gradwatch-report.json and .html

Importing this module imports ``lightning.pytorch`` (or, without it, ``pytorch_lightning``)
through :mod:`gradwatch.integrations.optional`; ``import gradwatch`` imports neither. A
``pytorch_lightning.Trainer`` takes the callback as well (its hooks are called by name).
"""

from __future__ import annotations

import os
from typing import Any

from ..measure import frameworks
from .optional import MissingExtra, require
from .session import Session, SessionReport, check_options, finding_counts, finding_lines

__all__ = ["GradwatchCallback"]

try:
    pl = require("lightning.pytorch", "gradwatch.integrations.lightning")
except MissingExtra as missing:
    try:
        pl = require("pytorch_lightning", "gradwatch.integrations.lightning")
    except MissingExtra:
        raise missing from None


class GradwatchCallback(SessionReport, pl.Callback):  # type: ignore[misc, name-defined]
    """Watch the LightningModule from the first training step to the end of ``fit``.

    ``GradwatchCallback(**watch_options)`` takes the options of ``gradwatch.watch``
    (``sync_every``, ``detail_every``, ``overhead``, ``every``, ``capacity``, ``strict``,
    ``probe_backwards``, ``thresholds``) and its own:

    - ``report_path``: the report's file (the suffix picks the format: ``.json``,
      ``.html``, ``.txt``). Default: ``gradwatch-report.json`` in the first logger's
      ``log_dir`` (its ``save_dir`` without one; ``trainer.default_root_dir`` without a
      logger).
    - ``html`` (default True): a ``.json`` report gets its HTML page beside it.
    - ``verbose`` (default True): print one line per finding and the report's paths.

    **When.** Watching starts at ``on_train_start``, once ``configure_optimizers`` has made
    the optimizers and after the sanity check: every optimizer of ``trainer.optimizers``
    is watched (several, and manual optimization, alike). It ends at ``on_train_end``
    (``on_fit_end`` closes a watch still open, should a trainer skip it): every hook is
    removed and the report written. When ``fit`` raises, ``on_exception`` writes it with
    ``run.status`` ``"failed"`` (``"interrupted"`` on Ctrl-C) and the error.

    **What the logger gets.** At the end, every logger of the trainer gets
    ``log_metrics`` at ``trainer.global_step``: ``gradwatch/findings``,
    ``gradwatch/severity/<error|warning|info>`` and ``gradwatch/kind/<kind>`` (each kind,
    zeros included). A logger whose ``experiment`` has ``add_text`` (TensorBoard) also gets
    the findings as text under ``gradwatch/findings``; with ``verbose`` they are printed.
    Nothing goes through ``LightningModule.log``: ``trainer.callback_metrics`` (which
    checkpointing and early stopping read) are untouched.

    **What is measured.** Layers are named by their module path in the LightningModule
    (``net.3``), the root by its class. Gradient norms are those ``backward()`` left,
    before the Trainer's ``gradient_clip_val`` clips them. The report's
    ``facts.framework`` holds the LightningModule's class, optimizers and the Trainer's
    clipping, accumulation and schedulers, so remedies are written for Lightning
    (``configure_optimizers``, ``Trainer(gradient_clip_val=...)``).

    **Several processes.** Only global rank 0 watches and writes; the other ranks run
    untouched. The finished report is also ``callback.report``, its files
    ``callback.report_paths``.
    """

    def __init__(self, *, report_path: str | os.PathLike[str] | None = None,
                 html: bool = True, verbose: bool = True, **watch_options: Any) -> None:
        super().__init__()
        check_options(watch_options)
        self._session = Session(watch_options, report_path, html, verbose)

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._session.active:  # a fit that ended without telling us: close it first
            self._finish(trainer, "failed", "the previous fit ended without on_train_end")
        if not trainer.is_global_zero:
            return
        self._session.start(pl_module, list(trainer.optimizers or []),
                            _facts(pl_module))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer, "completed", None)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # Lightning ends the fit loop with on_train_end; this only closes what it missed.
        self._finish(trainer, "completed", None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self._finish(trainer, status, f"{type(exception).__name__}: {exception}")

    # ------------------------------------------------------------------ the end
    def _finish(self, trainer: Any, status: str, error: str | None) -> None:
        if not self._session.active:
            return
        report = self._session.finish(status, error, _folder(trainer))
        if report is None:
            return
        lines = finding_lines(report, self._session.paths)
        for logger in _loggers(trainer):
            try:
                step = int(trainer.global_step)
                logger.log_metrics(finding_counts(report), step=step)
                experiment = getattr(logger, "experiment", None)
                if callable(getattr(experiment, "add_text", None)):
                    # Markdown: two spaces before a newline keep the lines apart.
                    experiment.add_text("gradwatch/findings", "  \n".join(lines), step)
            except Exception as exc:
                self._session.warn(f"could not log to {type(logger).__name__}", exc)
        self._session.say(lines)


def _facts(pl_module: Any) -> dict[str, Any] | None:
    try:
        return frameworks.lightning_facts(pl_module)
    except Exception:  # a trainer property that cannot be read: plain remedies then
        return None


def _folder(trainer: Any) -> str:
    """The run's folder, read without ``trainer.log_dir`` (which broadcasts: a collective
    call only rank 0 would make)."""
    for logger in _loggers(trainer)[:1]:
        for attribute in ("log_dir", "save_dir"):
            try:
                value = getattr(logger, attribute, None)
            except Exception:
                value = None
            if value:
                return str(value)
    return str(getattr(trainer, "default_root_dir", None) or os.getcwd())


def _loggers(trainer: Any) -> list[Any]:
    try:
        return list(trainer.loggers or [])
    except Exception:  # a trainer without loggers: the console only
        return []
