"""Run lab experiments over several seeds, judge them, and write the lab's files.

For every experiment, seed and arm it writes ``<out>/<experiment>/<arm>-seed<k>.json`` and
``.html`` (the full gradwatch report of that run), then ``<out>/lab.json`` (every experiment
with its claim, the numbers per seed, the verdict, the reason and the repair) and
``<out>/index.html`` (the claim-vs-observed table and the plots). It opens nothing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from .._version import __version__
from ..findings import jsonable
from ..report.atomic import write_text_atomic
from .core import ArmResults, Experiment, RunResult, stat
from .page import render_lab_page

__all__ = ["LAB_SCHEMA", "Progress", "experiment_entry", "lab_json", "run_experiment",
           "run_lab"]

LAB_SCHEMA = "gradwatch.lab/v1"
CURVE_POINTS = 200  # loss-curve points kept per run in lab.json
HEATMAP_STEPS = 100  # gradient-heatmap columns kept for seed 0's runs


class Progress:
    """One status line on a terminal: which experiment, arm and seed, and the time left.

    Silent when the stream is not a terminal (CI logs, pipes) or when disabled (--quiet).
    The ETA starts from each experiment's ``cost_s`` estimate and is rescaled by how long
    the finished work really took.
    """

    def __init__(self, total_cost: float, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.done_cost = total_cost, 0.0
        self.started = time.perf_counter()
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        rate = elapsed / self.done_cost if self.done_cost > 0 else 1.0
        left = max(0.0, (self.total - self.done_cost) * rate)
        line = f"{text} · {elapsed:.0f} s, about {left:.0f} s left"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def advance(self, cost: float) -> None:
        self.done_cost += cost

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _downsample(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int)) if n else \
        np.zeros(0, dtype=int)


def _loss_curve(result: RunResult) -> dict[str, list[Any]]:
    """The run's per-step loss, evenly downsampled; non-finite losses become null."""
    idx = _downsample(len(result.losses), CURVE_POINTS)
    return {"step": idx.tolist(),
            "loss": [v if math.isfinite(v) else None for v in np.asarray(result.losses)[idx]]}


def _heatmap(data: dict[str, Any]) -> dict[str, Any] | None:
    """Per-layer gradient norm by step, from a report's series, for the index page."""
    series = data["series"]
    steps, grads = series.get("step", []), series.get("grad_norm", {})
    if not steps or not grads:
        return None
    idx = _downsample(len(steps), HEATMAP_STEPS)
    bad = series.get("nonfinite", {})
    types = {layer["name"]: layer.get("type") for layer in data.get("layers") or []}
    return {"layers": list(grads), "types": [types.get(name) for name in grads],
            "step": [steps[i] for i in idx],
            "grad_norm": [[values[i] for i in idx] for values in grads.values()],
            "nonfinite": [[(bad.get(name) or [0] * len(steps))[i] or 0 for i in idx]
                          for name in grads]}


def _through_time(data: dict[str, Any]) -> dict[str, Any] | None:
    """The first recurrent module's gradient ratio, first timestep / last, by step."""
    modules = data["series"].get("through_time") or {}
    if not modules:
        return None
    name, series = next(iter(modules.items()))
    return {"module": name, "step": list(series.get("step") or []),
            "ratio": list(series.get("ratio_first_to_last_timestep") or [])}


def _dead_units(data: dict[str, Any]) -> dict[str, Any] | None:
    """The largest dead fraction of any ReLU site, by measured step (None without one)."""
    series = data["series"]
    sites = list((series.get("dead_fraction") or {}).values())
    if not sites:
        return None
    steps = list(series.get("site_step") or [])
    worst = []
    for k in range(len(steps)):
        values = [v[k] for v in sites if k < len(v) and v[k] is not None]
        worst.append(max(values) if values else None)
    return {"step": steps, "fraction": worst}


def _run_entry(result: RunResult, seed: int, folder: Path, rel: str,
               with_heatmap: bool) -> dict[str, Any]:
    stem = f"{result.variant}-seed{seed}"
    result.report.save(folder / f"{stem}.json")
    result.report.save(folder / f"{stem}.html")
    data = result.report.to_dict()
    finite = [v for v in result.losses if math.isfinite(v)]
    return {"seed": seed, "final_loss": result.final_loss,
            "first_loss": result.losses[0] if result.losses else None,
            "best_loss": min(finite) if finite else None,
            "steps": data["run"]["steps"], "metrics": dict(result.metrics),
            "findings": [{"kind": f.kind, "severity": f.severity, "summary": f.summary}
                         for f in result.report.findings],
            "report_json": f"{rel}/{stem}.json", "report_html": f"{rel}/{stem}.html",
            "loss_curve": _loss_curve(result), "through_time": _through_time(data),
            "dead_units": _dead_units(data),
            "heatmap": _heatmap(data) if with_heatmap else None}


def _arm_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"final_loss": stat([r["final_loss"] for r in runs])}
    for name in sorted({k for r in runs for k in r["metrics"]}):
        values = [r["metrics"].get(name) for r in runs]
        if all(isinstance(v, (int, float)) for v in values):
            summary[name] = stat([float(v) for v in values])
    return summary


def run_experiment(exp: Experiment, seeds: Sequence[int], out: Path,
                   progress: Progress) -> dict[str, Any]:
    """Every arm of one experiment over ``seeds``; its verdict; its lab.json entry."""
    results = ArmResults()
    per_run = exp.cost_s / max(len(exp.arms), 1)
    for seed in seeds:
        for arm in exp.arms:
            progress.show(f"{exp.name} ({exp.source}) · {arm.name} · seed {seed}")
            results.setdefault(arm.name, []).append(arm.run(seed))
            progress.advance(per_run)
    return experiment_entry(exp, results, seeds, out)


def experiment_entry(exp: Experiment, results: ArmResults, seeds: Sequence[int],
                     out: Path) -> dict[str, Any]:
    """The lab.json entry of one experiment whose arms have run: ``results`` holds every
    arm's runs over ``seeds``, in that order. Judges them, and saves each run's JSON and
    HTML report under ``out/<experiment>/``."""
    folder = out / exp.name
    folder.mkdir(parents=True, exist_ok=True)
    entries = {arm.name: [_run_entry(result, seed, folder, exp.name, seed == seeds[0])
                          for seed, result in zip(seeds, results[arm.name], strict=True)]
               for arm in exp.arms}
    verdict = exp.judge(results)
    return {"name": exp.name, "source": exp.source, "title": exp.title, "claim": exp.claim,
            "setup": exp.setup, "evidence": exp.evidence, "verdict": verdict.verdict,
            "observed": verdict.observed, "reason": verdict.reason, "repair": verdict.repair,
            "arms": [{"name": arm.name, "role": arm.role, "claim": arm.claim,
                      "description": arm.description, "summary": _arm_summary(entries[arm.name]),
                      "runs": entries[arm.name]} for arm in exp.arms]}


def run_lab(experiments: Sequence[Experiment], seeds: Sequence[int], out: Path,
            stream: TextIO | None = None, progress: bool = True) -> dict[str, Any]:
    """Run, judge and write every experiment; print each verdict to ``stream``."""
    started = time.perf_counter()
    bar = Progress(sum(e.cost_s for e in experiments) * len(seeds), enabled=progress)
    lab: dict[str, Any] = {"schema": LAB_SCHEMA, "gradwatch": __version__,
                           "seeds": list(seeds), "experiments": []}
    # The lab's tensors are small: intra-op threads only add synchronisation, and on a busy
    # 2-core machine they make the runs many times slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for exp in experiments:
            entry = run_experiment(exp, seeds, out, bar)
            lab["experiments"].append(entry)
            bar.clear()
            if stream is not None:
                print_verdict(entry, stream)
    finally:
        torch.set_num_threads(threads)
        bar.clear()
    lab["duration_s"] = round(time.perf_counter() - started, 1)
    lab = jsonable(lab)
    write_text_atomic(out / "lab.json", lab_json(lab))
    write_text_atomic(out / "index.html", render_lab_page(lab))
    return lab


def lab_json(lab: dict[str, Any]) -> str:
    """The text of lab.json: strict JSON, every non-finite number written as null."""
    return json.dumps(jsonable(lab), indent=2, allow_nan=False) + "\n"


def print_verdict(entry: dict[str, Any], stream: TextIO) -> None:
    """A few lines per experiment: the claim, the verdict and why, the repair."""
    stream.write(f"\n[{entry['name']}] {entry['source']}: {entry['title']}\n"
                 f"  claim:    {entry['claim']}\n"
                 f"  verdict:  {entry['verdict'].upper()}: {entry['observed']}\n"
                 f"  why:      {entry['reason']}\n"
                 f"  repair:   {entry['repair']}\n")
    stream.flush()
