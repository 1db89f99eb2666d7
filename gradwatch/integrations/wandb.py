"""Log a run to Weights & Biases (``WANDB_MODE=offline`` works: nothing leaves the machine
until ``wandb sync``).

What is logged, and when, is the logger core's (:mod:`gradwatch.integrations.loggers`). The
scalars are logged with ``gradwatch/step`` as their x-axis (``define_metric``), so that they
never disturb the run's own ``_step``; findings are ``wandb.Html`` entries; the HTML report
is written into the run's files and logged as an artifact of type ``gradwatch-report``.
"""

from __future__ import annotations

import html as html_escape
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._version import __version__
from ..report.atomic import write_text_atomic
from .loggers import PREFIX, REPORT_NAME, Logger
from .optional import require

__all__ = ["WandB"]

STEP = f"{PREFIX}/step"
"""The x-axis of every scalar gradwatch logs to W&B."""


class WandB(Logger):
    """Log to a W&B run of its own, in ``project`` (``WANDB_PROJECT``, else ``gradwatch``),
    created with ``wandb.init(**init)`` at the first flush and finished at the end of the
    run; or into the caller's ``run`` (left open). The user's own ``wandb.run`` is never
    replaced (``reinit="create_new"``):
    ``gradwatch.watch(model, opt, loggers=[WandB("my-project")])``.
    """

    title = "W&B"

    def __init__(self, project: str | None = None, *, run: Any = None,
                 init: Mapping[str, Any] | None = None, findings_budget: float = 0.01) -> None:
        super().__init__(findings_budget=findings_budget)
        self._wandb = require("wandb", "gradwatch's W&B logger")
        self.project = project or os.environ.get("WANDB_PROJECT") or "gradwatch"
        self.init = dict(init or {})
        self.run = run
        self._owns_run = run is None

    def open(self) -> None:
        if self.run is None:
            kwargs: dict[str, Any] = {"project": self.project, "reinit": "create_new",
                                      "config": {"gradwatch_version": __version__}}
            self.run = self._wandb.init(**{**kwargs, **self.init})
        self.run.define_metric(STEP)
        self.run.define_metric(f"{PREFIX}/*", step_metric=STEP)

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({STEP: step, **values})

    def write_text(self, tag: str, text: str, step: int) -> None:
        page = f"<pre>{html_escape.escape(text)}</pre>"
        self.run.log({STEP: step, tag: self._wandb.Html(page, inject=False)})

    def write_report(self, html: str, step: int) -> None:
        path = write_text_atomic(Path(self.run.dir) / REPORT_NAME, html)
        artifact = self._wandb.Artifact(f"{PREFIX}-report", type=f"{PREFIX}-report")
        artifact.add_file(str(path), name=REPORT_NAME)
        self.run.log_artifact(artifact)

    def close_backend(self, status: str) -> None:
        if self._owns_run:
            self.run.finish(exit_code=0 if status == "completed" else 1)
