"""Log a run to MLflow, through an ``MlflowClient`` of its own (the caller's active run, if
any, is left alone).

What is logged, and when, is the logger core's (:mod:`gradwatch.integrations.loggers`): the
scalars as metrics (``log_batch``), findings as Markdown artifacts
(``gradwatch/findings/<kind>.md``, ``gradwatch/findings.md``), the HTML report as the
artifact ``gradwatch-report.html``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

from .._version import __version__
from .loggers import REPORT_NAME, Logger
from .optional import require

__all__ = ["MLflow"]

_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_BATCH = 1000  # metrics per log_batch call (MLflow's limit)


def _is_file_store(uri: str) -> bool:
    """A local folder (a path or a ``file:`` URI), as opposed to a server or a database."""
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


class MLflow(Logger):
    """Log to a new run of ``experiment`` (created if needed) at ``tracking_uri`` (MLflow's
    own default when None: ``MLFLOW_TRACKING_URI``...), finished at the end with the run's
    status; or into the existing run ``run_id`` (left open).

    A local folder is a file store: MLflow 3 refuses those unless
    ``MLFLOW_ALLOW_FILE_STORE=true``, which gradwatch then sets for the process, since the
    caller named that store: ``gradwatch.watch(model, opt, loggers=[MLflow("mlruns")])``.
    """

    title = "MLflow"

    def __init__(self, tracking_uri: str | os.PathLike[str] | None = None, *,
                 experiment: str = "gradwatch", run_name: str | None = None,
                 run_id: str | None = None, findings_budget: float = 0.01) -> None:
        super().__init__(findings_budget=findings_budget)
        mlflow = require("mlflow", "gradwatch's MLflow logger")
        uri = mlflow.get_tracking_uri() if tracking_uri is None else str(tracking_uri)
        if _is_file_store(uri):
            if not urlparse(uri).scheme:
                uri = Path(uri).resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.tracking_uri = uri
        self._metric = mlflow.entities.Metric
        self.client = mlflow.tracking.MlflowClient(uri)  # a bad URI fails here, not mid-run
        self.experiment, self.run_name = experiment, run_name
        self.run_id = run_id
        self._owns_run = run_id is None

    def open(self) -> None:
        if self.run_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found is not None else \
                self.client.create_experiment(self.experiment)
            run = self.client.create_run(experiment_id, run_name=self.run_name,
                                         tags={"gradwatch.version": __version__})
            self.run_id = run.info.run_id

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(name, value, now, step) for name, value in values.items()]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i: i + _BATCH])

    def write_text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.md")

    def write_report(self, html: str, step: int) -> None:
        self.client.log_text(self.run_id, html, REPORT_NAME)

    def close_backend(self, status: str) -> None:
        if self._owns_run:
            self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FINISHED"))
