"""The report: findings plus the run's layers and series, as JSON, text or HTML."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..findings import Finding, jsonable
from ..judge.context import Context
from ..judge.registry import run_detectors
from ..judge.timesteps import report_series
from ..remedies import describe_findings
from . import html, text
from .atomic import write_text_atomic
from .schema import SCHEMA, check_report

__all__ = ["SCHEMA", "Report", "build_report", "check_report"]


class Report:
    """A finished diagnosis in the contract's shape (``schema`` gradwatch.report/v1)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self.findings: list[Finding] = [Finding.from_dict(f) for f in data["findings"]]

    @property
    def run(self) -> dict[str, Any]:
        return self._data["run"]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self._data["layers"]

    @property
    def series(self) -> dict[str, Any]:
        return self._data["series"]

    @property
    def problems(self) -> list[Finding]:
        """Findings of severity warning or error (a healthy run has none)."""
        return [f for f in self.findings if f.severity in ("warning", "error")]

    def kinds(self) -> set[str]:
        return {f.kind for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        data = dict(self._data)
        data["findings"] = [f.to_dict() for f in self.findings]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """The report as strict JSON (non-finite numbers are written as null)."""
        return json.dumps(jsonable(self.to_dict()), indent=indent, allow_nan=False)

    def summary(self, width: int = 100) -> str:
        """A one-page plain-text summary for a terminal."""
        return text.render_text(self.to_dict(), width)

    def to_html(self) -> str:
        """A self-contained HTML page: the findings, their causes and remedies, the plots."""
        return html.render_html(self.to_dict())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically; the format follows the suffix: .json, .html/.htm, .txt/.md."""
        suffix = Path(path).suffix.lower()
        if suffix == ".json":
            text = self.to_json()
        elif suffix in (".html", ".htm"):
            text = self.to_html()
        elif suffix in (".txt", ".md", ".log"):
            text = self.summary()
        else:
            raise ValueError(f"cannot tell the report format from {str(path)!r}: use a "
                             f".json, .html or .txt file name")
        return write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        """Read a report saved as JSON.

        Raises ``OSError`` when the file cannot be read and ``ValueError`` ("not a gradwatch
        report: ...") when its content is not a report of this schema.
        """
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting
            raise ValueError(f"not a gradwatch report: {path} is not JSON "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
        check_report(data, str(path))
        try:
            return cls(data)
        except (KeyError, TypeError, ValueError) as exc:  # a shape the checks let through
            raise ValueError(f"not a gradwatch report: {path}: {exc}") from None

    def __repr__(self) -> str:
        run = self._data.get("run") or {}
        return (f"Report(steps={run.get('steps')}, status={run.get('status')!r}, "
                f"findings={[f.kind for f in self.findings]})")


def _column(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in values]


def _site_series(ctx: Context) -> dict[str, Any]:
    """Per activation site: dead fraction (ReLU family) or saturated fraction over time."""
    frac = ctx.site_stat("fraction")
    dead = {ctx.site_name(i): _column(frac[:, i]) for i in ctx.sites
            if ctx.site(i).kind in ("relu", "relu6")}
    saturated = {ctx.site_name(i): _column(frac[:, i]) for i in ctx.sites
                 if ctx.site(i).kind not in ("relu", "relu6")}
    return {"site_step": ctx.site_steps.tolist(), "dead_fraction": dead,
            "saturated_fraction": saturated}


def _site_facts(ctx: Context, i: int) -> dict[str, Any]:
    site = ctx.site(i)
    return {"name": ctx.site_name(i), "kind": site.kind, "module": site.module,
            "functional": site.functional, "units": site.units,
            "feeding_layer": ctx.name(site.layer) if site.layer is not None else None,
            "final": site.final}


def build_report(monitor: Any) -> Report:
    """Run the detectors over a monitor's history and assemble the contract's JSON.

    Never raises: if assembling the report fails (a bug of gradwatch's), the report still
    has the run's facts, with the error among its internal errors.
    """
    try:
        findings, detector_errors = run_detectors(monitor.history, monitor.thresholds)
        describe_findings(findings, monitor.history.facts.get("framework"))
    except Exception as exc:
        findings, detector_errors = [], [f"the detectors could not run: "
                                          f"{type(exc).__name__}: {exc}"]
    try:
        return _assemble(monitor, findings, detector_errors)
    except Exception as exc:
        return _minimal(monitor, findings, [*detector_errors, f"the report could not be "
                                            f"assembled: {type(exc).__name__}: {exc}"])


def _run_facts(monitor: Any, detector_errors: list[str]) -> dict[str, Any]:
    # A report taken inside the with-block is a snapshot of a run that has not ended:
    # the contract knows no "running", so it says "interrupted" and in_progress true.
    d = monitor.history.facts.get("distributed") or {}
    ranks = {"world_size": d.get("world_size"), "rank": d.get("rank"),
             "failed_ranks": d.get("failed_ranks", []),
             "rank_errors": {str(i["rank"]): i["error"] for i in d.get("ranks", [])
                             if i.get("error") and i["rank"] != d.get("rank")}} if d else {}
    return {**ranks, "steps": int(monitor.step),
            "status": "interrupted" if monitor.status == "running" else monitor.status,
            "in_progress": monitor.status == "running", "error": monitor.error,
            "duration_s": round(monitor.duration, 3), "mode": monitor.mode,
            "internal_errors": list(monitor.errors) + detector_errors,
            "detector_errors": detector_errors, "measured_steps": monitor.stopped_at,
            "cadence": {**monitor.cadence.facts(monitor.options.every),
                        "site_turns": monitor.history.facts.get("site_turns", 1)}}


def _minimal(monitor: Any, findings: list[Finding], errors: list[str]) -> Report:
    """The run, its layers' names and the findings, without series or facts."""
    layers = [{"name": layer.name, "type": layer.type, "depth": i, "params": layer.params}
              for i, layer in enumerate(monitor.history.layers)]
    return Report(jsonable({"schema": SCHEMA, "tool": {"name": "gradwatch",
                                                       "version": __version__},
                            "run": _run_facts(monitor, errors), "layers": layers,
                            "findings": [f.to_dict() for f in findings], "series": {},
                            "facts": {}}))


def _assemble(monitor: Any, findings: list[Finding], detector_errors: list[str]) -> Report:
    history = monitor.history
    ctx = Context(history, monitor.thresholds)
    order = history.layer_order()
    layers = [{"name": ctx.name(i), "type": history.layers[i].type, "depth": depth,
               "params": history.layers[i].params} for depth, i in enumerate(order)]
    layer_facts = {ctx.name(i): {"activation": history.layers[i].activation,
                                 "init_scale": history.layers[i].init_scale,
                                 "fan_in": history.layers[i].fan_in}
                   for i in order}
    grad = history.steps.block("grad_norm")
    detail = history.detail
    with np.errstate(divide="ignore", invalid="ignore"):
        update_ratio = detail.block("update_norm") / detail.block("weight_norm")
    series: dict[str, Any] = {
        "step": history.steps.steps.tolist(),
        "loss": _column(history.steps.block("loss")[:, 0]),
        "lr": _column(history.steps.block("lr")[:, 0]),
        "grad_norm": {ctx.name(i): _column(grad[:, i]) for i in order},
        "detail_step": detail.steps.tolist(),
        "weight_norm": {ctx.name(i): _column(detail.block("weight_norm")[:, i]) for i in order},
        "update_ratio": {ctx.name(i): _column(update_ratio[:, i]) for i in order},
        "activation_rms": {ctx.name(i): _column(detail.block("act_rms")[:, i]) for i in order},
        "nonfinite": {ctx.name(i): _column(history.steps.block("nonfinite")[:, i])
                      for i in order},
        "stride": history.steps.stride,
        **_site_series(ctx),
        "through_time": report_series(ctx),
    }
    data = {
        "schema": SCHEMA,
        "tool": {"name": "gradwatch", "version": __version__},
        "run": _run_facts(monitor, detector_errors),
        "layers": layers,
        "findings": [f.to_dict() for f in findings],
        "series": series,
        "facts": jsonable({**history.facts, "layers": layer_facts,
                           "sites": [_site_facts(ctx, i) for i in ctx.sites]}),
    }
    return Report(jsonable(data))
