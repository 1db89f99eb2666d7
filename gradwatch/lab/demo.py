"""``gradwatch demo``: run seed 002's experiments under gradwatch and write their reports.

For every arm of every experiment (see :mod:`gradwatch.lab.seed002`) it writes
``<out>/<experiment>-<variant>.json`` and ``.html``, then ``<out>/summary.json`` and an
``<out>/index.html`` that links them, and prints what gradwatch found. It opens nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any, TextIO

import torch

from ..findings import jsonable
from ..report.atomic import write_text_atomic
from .seed002 import EXPERIMENTS, RUNS, RunResult, Variant

__all__ = ["SUMMARY_SCHEMA", "main", "run_demo"]

SUMMARY_SCHEMA = "gradwatch.demo/v1"
DEFAULT_OUT = "gradwatch-demo"


class DemoError(Exception):
    """A problem with the user's arguments (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch demo",
        description="Run the three experiments of seed 002 (sigmoid vs ReLU, N(0,10) weights "
        "without/with clipping, Xavier vs Kaiming) under gradwatch, print what it finds and "
        "write a JSON and an HTML report per run plus an index page. Opens nothing.")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"folder for the reports (default: ./{DEFAULT_OUT}; created if "
                        f"missing, existing reports in it are overwritten)")
    parser.add_argument("--seed", metavar="N", type=int, default=0,
                        help="torch seed for the models' initial weights (default 0); the "
                        "data always use the seed's numpy seed 0")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the path of the index page")
    return parser


def _prepare_out(out: str) -> Path:
    """Create the output folder, or say why it cannot be used."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise DemoError(f"--out {out!r} is an existing file, not a folder: give a folder "
                        f"name (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoError(f"cannot create the output folder {out!r}: {exc.strerror or exc}") \
            from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DemoError(f"cannot write into the output folder {out!r}: permission denied")
    return path


def _stem(result: RunResult) -> str:
    return f"{result.experiment}-{result.variant}"


def _finding_rows(result: RunResult) -> list[dict[str, Any]]:
    return [{"kind": f.kind, "severity": f.severity, "summary": f.summary,
             "first_step": f.first_step, "layers": f.layers,
             "causes": [c.id for c in f.causes], "remedies": [r.id for r in f.remedies]}
            for f in result.report.findings]


def summary_entry(result: RunResult, variant: Variant) -> dict[str, Any]:
    """One run's line in summary.json (non-finite losses become null)."""
    stem = _stem(result)
    return jsonable({
        "experiment": result.experiment,
        "variant": result.variant,
        "claim": result.claim,
        "description": variant.description,
        "epochs": len(result.losses),
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.final_loss,
        "findings": _finding_rows(result),
        "report_json": f"{stem}.json",
        "report_html": f"{stem}.html",
    })


def _fmt_loss(x: float | None) -> str:
    if x is None:
        return "NaN/Inf"
    return f"{x:.4g}"


def _print_run(entry: dict[str, Any], stream: TextIO) -> None:
    stream.write(f"\n[{entry['experiment']} / {entry['variant']}]  seed's claim: "
                 f"{entry['claim']}\n")
    stream.write(f"  final loss {_fmt_loss(entry['final_loss'])} after {entry['epochs']} "
                 f"epochs (first {_fmt_loss(entry['first_loss'])})\n")
    if not entry["findings"]:
        stream.write("  no findings: gradwatch sees a healthy run\n")
    for f in entry["findings"]:
        stream.write(f"  {f['severity']:<7} {f['kind']:<19} {f['summary']}\n")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse;width:100%;font-size:.9em}
td,th{border:1px solid #ddd;padding:.35em .5em;text-align:left;vertical-align:top}
.error{color:#c0392b;font-weight:bold}.warning{color:#d35400;font-weight:bold}
.info{color:#7f8c8d}.ok{color:#27ae60}
"""


def _index_html(entries: list[dict[str, Any]], seed: int) -> str:
    """A self-contained page (no scripts, no network) linking every run's report."""
    e = escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>gradwatch demo</title><style>{_CSS}</style></head><body>",
        "<h1>gradwatch demo: seed 002's experiments</h1>",
        f"<p>Each run is the seed's own code (torch seed {e(str(seed))}) trained under "
        "<code>gradwatch.watch</code>. The <i>claim</i> column is what the seed says "
        "happens; the loss and the findings are what was measured.</p>",
    ]
    for exp_id, title in EXPERIMENTS.items():
        rows = [x for x in entries if x["experiment"] == exp_id]
        if not rows:
            continue
        parts.append(f"<h2>{e(title)} <small>({e(exp_id)})</small></h2>")
        parts.append("<table><tr><th>experiment</th><th>variant</th><th>seed's claim</th>"
                     "<th>final loss</th><th>findings</th><th>reports</th></tr>")
        for x in rows:
            if x["findings"]:
                found = "<br>".join(
                    f"<span class='{e(f['severity'], quote=True)}'>{e(f['severity'])}</span> "
                    f"{e(f['kind'])}" for f in x["findings"])
            else:
                found = "<span class='ok'>none</span>"
            parts.append(
                f"<tr><td>{e(x['experiment'])}</td><td>{e(x['variant'])}</td>"
                f"<td>{e(x['claim'])}<br><small>{e(x['description'])}</small></td>"
                f"<td>{e(_fmt_loss(x['final_loss']))}</td><td>{found}</td>"
                f"<td><a href='{e(x['report_html'], quote=True)}'>HTML</a> · "
                f"<a href='{e(x['report_json'], quote=True)}'>JSON</a></td></tr>")
        parts.append("</table>")
    parts.append("<p>Machine-readable: <a href='summary.json'>summary.json</a>.</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def run_demo(out: Path, seed: int = 0, stream: TextIO | None = None) -> Path:
    """Run every variant, write its reports, the summary and the index; return the index."""
    entries: list[dict[str, Any]] = []
    # The tensors here are 100 x 10: intra-op threads only add synchronisation, and on a
    # busy 2-core machine they make the runs many times slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for variant in RUNS:
            result = variant.run(seed)
            stem = _stem(result)
            result.report.save(out / f"{stem}.json")
            result.report.save(out / f"{stem}.html")
            entry = summary_entry(result, variant)
            entries.append(entry)
            if stream is not None:
                _print_run(entry, stream)
    finally:
        torch.set_num_threads(threads)
    summary = {"schema": SUMMARY_SCHEMA, "seed": seed, "runs": entries}
    write_text_atomic(out / "summary.json",
                      json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return write_text_atomic(out / "index.html", _index_html(entries, seed))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gradwatch demo``; returns the exit status."""
    parser = _parser()
    try:
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        out = _prepare_out(ns.out)
    except DemoError as exc:
        print(f"gradwatch demo: {exc}", file=sys.stderr)
        return 2
    stream = None if ns.quiet else sys.stdout
    if stream is not None:
        stream.write(f"gradwatch demo: seed 002's three experiments (torch seed {ns.seed}), "
                     f"reports in {out}\n")
    start = time.perf_counter()
    try:
        index = run_demo(out, ns.seed, stream)
    except OSError as exc:
        print(f"gradwatch demo: could not write the reports in {out}: {exc}", file=sys.stderr)
        return 1
    if stream is not None:
        stream.write(f"\n{len(RUNS)} runs in {time.perf_counter() - start:.1f} s\n")
    print(f"index: {index.resolve()}")
    return 0
