"""Log a run to TensorBoard through ``torch.utils.tensorboard.SummaryWriter``.

What is logged, and when, is the logger core's (:mod:`gradwatch.integrations.loggers`): the
scalars with ``add_scalar``, findings with ``add_text``, and the HTML report written into
the log folder as ``gradwatch-report.html`` (TensorBoard has no artifacts), with a text entry
``gradwatch/report`` naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..report.atomic import write_text_atomic
from .loggers import REPORT_NAME, Logger, metric_name
from .optional import require

__all__ = ["TensorBoard"]


class TensorBoard(Logger):
    """Log to TensorBoard event files in ``log_dir`` (``SummaryWriter``'s default
    ``runs/<date>_<host>`` when None), or through a ``writer`` the caller already has (left
    open at the end): ``gradwatch.watch(model, opt, loggers=[TensorBoard("runs/exp1")])``.
    """

    title = "TensorBoard"

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None,
                 findings_budget: float = 0.01) -> None:
        super().__init__(findings_budget=findings_budget)
        require("tensorboard", "gradwatch's TensorBoard logger")
        self._module = require("torch.utils.tensorboard", "gradwatch's TensorBoard logger")
        self.log_dir = None if log_dir is None else str(log_dir)
        self.writer = writer
        self._owns_writer = writer is None

    def open(self) -> None:
        if self.writer is None:
            self.writer = self._module.SummaryWriter(log_dir=self.log_dir)

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def write_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def write_report(self, html: str, step: int) -> None:
        path = write_text_atomic(Path(self.writer.log_dir) / REPORT_NAME, html)
        self.writer.add_text(metric_name("report"), f"HTML report: `{path}`", step)

    def close_backend(self, status: str) -> None:
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()
