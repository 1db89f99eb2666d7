"""``GradwatchCallback`` for the Hugging Face ``Trainer``: ``gradwatch.watch`` on the model
that ``Trainer.train`` trains, for code that cannot be wrapped in a ``with`` block or run
under ``gradwatch run`` (notebooks, launchers).

    from gradwatch.integrations.transformers import GradwatchCallback
    trainer = Trainer(model, args, train_dataset=data, callbacks=[GradwatchCallback()])
    trainer.train()   # report: <output_dir>/gradwatch-report.json and .html

Importing this module imports ``transformers`` through
:mod:`gradwatch.integrations.optional`; ``import gradwatch`` does not.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any

from ..measure import frameworks
from ..report import Report
from .optional import require
from .session import Session, SessionReport, check_options, finding_counts, finding_lines

__all__ = ["GradwatchCallback"]

transformers = require("transformers", "gradwatch.integrations.transformers")


class GradwatchCallback(SessionReport, transformers.TrainerCallback):  # type: ignore[misc, name-defined]
    """Watch the model a Hugging Face ``Trainer`` trains, from ``on_train_begin`` to the end
    of training.

    ``GradwatchCallback(**watch_options)`` takes the options of ``gradwatch.watch``
    (``sync_every``, ``detail_every``, ``overhead``, ``every``, ``capacity``, ``strict``,
    ``probe_backwards``, ``thresholds``) and its own:

    - ``report_path``: the report's file (the suffix picks the format: ``.json``,
      ``.html``, ``.txt``). Default: ``gradwatch-report.json`` in ``args.output_dir``.
    - ``html`` (default True): a ``.json`` report gets its HTML page beside it.
    - ``verbose`` (default True): print one line per finding and the report's paths (the
      Trainer's own log has no place for text).

    **When.** Watching starts at ``on_train_begin``: the model (``kwargs["model"]``) and
    the optimizer the Trainer made or was given (``kwargs["optimizer"]``, accelerate's
    wrapper unwrapped). It ends at ``on_step_end`` of the step after which the Trainer
    stops (``control.should_training_stop``, set when ``max_steps`` is reached), or at
    ``on_train_end`` when training ended otherwise: every hook is removed and the report
    written, once.

    **What the logs get.** At that step the findings' numbers go through the Trainer's
    ``log()``: ``gradwatch/findings``, ``gradwatch/severity/<error|warning|info>`` and
    ``gradwatch/kind/<kind>`` (each kind, zeros included) land in
    ``trainer.state.log_history`` and reach every ``report_to`` integration (TensorBoard,
    W&B, MLflow...) while they are still open. Ended at ``on_train_end`` instead (the
    integrations have closed then), the numbers are appended to ``state.log_history``
    only. With ``verbose`` the findings are printed.

    **Exceptions.** The Trainer has no exception hook. Use the callback as a context
    manager around ``train()``: when it raises, the report is written with ``run.status``
    ``"failed"`` (``"interrupted"`` on Ctrl-C) and the error, and the exception goes on::

        with callback:
            trainer.train()

    Without it, a ``train()`` that raised leaves the watch open until the next
    ``train()`` starts (which writes the failed run's report first) or :meth:`close`.

    **Clipping.** The Trainer clips the gradients to ``max_grad_norm`` in its training
    loop, after ``backward()`` and before ``on_pre_optimizer_step``. gradwatch takes the
    gradient norms inside ``backward()`` itself (it wraps ``torch.autograd.backward``), so
    the report's norms (``series.grad_norm``, the findings' evidence) are the unclipped
    ones, what the model produced, not what clipping let through; the clipped norms are
    measured too on detail steps, in the optimizer's step pre-hook, for gradwatch's own
    checks. The report's ``facts.framework`` holds the ``TrainingArguments`` values
    (rate, ``max_grad_norm``, warm-up, schedule, accumulation), so remedies are written as
    ``TrainingArguments(...)``.

    **Several processes.** Only the world's process zero watches and writes. The finished
    report is also ``callback.report``, its files ``callback.report_paths``.
    """

    def __init__(self, *, report_path: str | os.PathLike[str] | None = None,
                 html: bool = True, verbose: bool = True, **watch_options: Any) -> None:
        check_options(watch_options)
        self._session = Session(watch_options, report_path, html, verbose)
        self._folder = "."
        self._state: Any = None  # the TrainerState of the run being watched

    def close(self, status: str = "failed", error: str | None = None) -> Report | None:
        """End a watch that ``train()`` left open (it raised): every hook removed, the
        report written with ``status``; nothing when no watch is open."""
        return self._finish(status, error, None)

    def __enter__(self) -> GradwatchCallback:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close("completed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted", "KeyboardInterrupt")
        else:
            self.close("failed", f"{exc_type.__name__}: {exc}")

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._session.active:  # the previous train() raised: its report first
            self.close("failed", "the previous train() ended without on_train_end "
                                 "(it raised)")
        if not getattr(state, "is_world_process_zero", True):
            return
        model = kwargs.get("model")
        if model is None:
            return
        self._folder = str(getattr(args, "output_dir", None) or ".")
        self._state = state
        optimizer = kwargs.get("optimizer")
        self._session.start(model, [optimizer] if optimizer is not None else [],
                            _facts(sys._getframe(1)))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._session.active and getattr(control, "should_training_stop", False):
            # Trainer.log resets control.should_log (and its callbacks may set flags): put
            # every flag back, so that the Trainer still logs, saves and evaluates this step.
            flags = dict(vars(control))
            try:
                self._finish("completed", None, _trainer(sys._getframe(1)))
            finally:
                vars(control).update(flags)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish("completed", None, None)

    # ------------------------------------------------------------------ the end
    def _finish(self, status: str, error: str | None, trainer: Any) -> Report | None:
        if not self._session.active:
            return None
        report = self._session.finish(status, error, self._folder)
        state, self._state = self._state, None
        if report is None:
            return None
        counts = finding_counts(report)
        try:
            if trainer is not None and callable(getattr(trainer, "log", None)):
                trainer.log(dict(counts))  # log_history and every report_to integration
            elif state is not None:
                state.log_history.append(
                    {**counts, "step": int(getattr(state, "global_step", 0) or 0)})
        except Exception as exc:
            self._session.warn("could not log the findings", exc)
        self._session.say(finding_lines(report, self._session.paths))
        return report


def _trainer(frame: Any) -> Any | None:
    """The Trainer whose loop calls the callback (it is not among a callback's arguments)."""
    try:
        return frameworks.hf_trainer(frame)
    except Exception:  # a stack that cannot be read: the findings go to log_history then
        return None


def _facts(frame: Any) -> dict[str, Any] | None:
    """``facts["framework"]`` of the Trainer whose loop calls the callback."""
    try:
        trainer = frameworks.hf_trainer(frame)
        return frameworks.transformers_facts(trainer) if trainer is not None else None
    except Exception:  # a trainer that cannot be read: plain remedies then
        return None
