"""The lab's index page: claim vs observed, loss curves and gradient flow per experiment.

One self-contained HTML file (inline CSS and SVG, no scripts, no network) from the lab's
JSON (schema ``gradwatch.lab/v1``); every text that comes from the JSON is escaped and
links to the runs' own reports are kept only when they are relative paths.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from ..report import plots
from ..report.html import CSS
from .names import first_sentence, metric_label, metric_text, value_text

__all__ = ["render_lab_page"]

_PAGE_CSS = CSS + """
.lead{font-size:1.02em;max-width:52em}.meta{color:#666;font-size:.9em}
.badge{display:inline-block;padding:.1em .55em;border-radius:.8em;font-weight:600;
font-size:.85em;white-space:nowrap;color:#fff;background:#7f8c8d}
.v-holds{background:#2e7d32}.v-not{background:#c62828}.v-partly{background:#ef8f00}
table.claims{table-layout:fixed}table.claims td{font-size:.92em}
table.claims tr.why td{background:#fafafa;color:#333;border-bottom:2px solid #ccc}
.exp{border-top:2px solid #eee;margin-top:2.2em}.exp dl{display:grid;
grid-template-columns:8em 1fr;gap:.25em 1em;margin:.6em 0}.exp dt{font-weight:600;color:#444}
.exp dd{margin:0}.tag{font-family:monospace;font-size:.85em;background:#f3f3f3;
padding:0 .3em;border-radius:.2em;margin-right:.3em}
.tag.error{border-left:3px solid #c0392b}.tag.warning{border-left:3px solid #e67e22}
.small{font-size:.85em;color:#555}
body{max-width:1340px}.exp{min-height:0}.exp h2{margin:.3em 0 .1em}
.exp p.claim,.exp p.what{margin:.3em 0;max-width:70em}
.gw-row{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:.8em 1.4em;
margin:.6em 0;align-items:start}.gw-row>.gw-figure:first-child{grid-row:span 2}
.gw-row .gw-figure figcaption{font-size:.78em}
details{margin:.4em 0 1em}details>summary{cursor:pointer;color:#1f4e8c;font-weight:600}
table.arms td{overflow-wrap:anywhere}td,th,dd,p,figcaption{overflow-wrap:anywhere}
"""

_VERDICT_CLASS = {"holds": "v-holds", "does not hold": "v-not", "partly": "v-partly"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def _e(x: Any) -> str:
    return escape("" if x is None else str(x), quote=True)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
        and math.isfinite(v) else None


def _href(path: Any) -> str | None:
    """A relative link to a run's report, or None for anything that could leave the folder
    of the page or load from elsewhere (schemes such as http: or javascript:, //host)."""
    if not isinstance(path, str) or not path or path.startswith(("/", "\\")) or \
            _SCHEME.match(path) or ".." in path.replace("\\", "/").split("/"):
        return None
    return _e(quote(path, safe="/._-~+=,@"))  # only spaces, %, #, ?, quotes... are encoded


def _badge(verdict: Any) -> str:
    cls = _VERDICT_CLASS.get(str(verdict), "v-unknown")
    return f"<span class='badge {cls}'>{_e(verdict or 'no verdict')}</span>"


def _median_curve(curves: Sequence[tuple[list[Any], list[Any]]]) -> tuple[list[Any], list[Any]]:
    """The median over seeds at each step, when all seeds share the steps; a non-finite
    loss counts as +inf, so the median is a gap only when most seeds diverged there."""
    steps = curves[0][0]
    out = []
    for i in range(len(steps)):
        vals = sorted(math.inf if (v := _finite(c[1][i] if i < len(c[1]) else None)) is None
                      else v for c in curves)
        mid = len(vals) // 2
        m = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
        out.append(m if math.isfinite(m) else None)
    return steps, out


def _loss_figure(exp: dict[str, Any]) -> str:
    """All arms' loss curves: the median over seeds bold, every seed faint behind it."""
    return _arms_figure(exp, "loss_curve", "loss", "Loss of every arm", "loss")


def _through_time_figure(exp: dict[str, Any]) -> str:
    """Every arm's gradient reaching the first timestep / the last one's, over the run."""
    return _arms_figure(exp, "through_time", "ratio",
                        "Gradient reaching the first timestep / the last one's",
                        "ratio", log=True, kind="through-time",
                        extra=["Measured on gradwatch's detail steps (0-7, then every 16th); "
                               "lower means less of the gradient survives the trip back in "
                               "time."])


def _dead_units_figure(exp: dict[str, Any]) -> str:
    """Every arm's largest share of dead ReLU units in any layer, over the run."""
    return _arms_figure(exp, "dead_units", "fraction",
                        "Dead ReLU units: the largest share in any layer", "dead fraction",
                        log=False, kind="dead-units", y_range=(0.0, 1.0),
                        extra=["A unit is dead on a step when it outputs 0 for every sample "
                               "of the batch; measured on gradwatch's detail steps (0-7, then "
                               "every 16th). Arms without ReLU units have no curve."])


_EVIDENCE = {"through_time": _through_time_figure, "dead_units": _dead_units_figure}


def _arms_figure(exp: dict[str, Any], key: str, value: str, title: str, label: str,
                 log: bool | None = None, kind: str = "loss",
                 extra: Sequence[str] = (), y_range: tuple[float, float] | None = None
                 ) -> str:
    """One curve per arm from each run's ``key`` ({"step": [...], value: [...]}): the median
    over seeds bold, every seed faint behind it; log scale when ``log`` (None: when the
    values span more than 100x)."""
    lines: dict[str, tuple[list[Any], list[Any]]] = {}
    faint: dict[str, list[tuple[list[Any], list[Any]]]] = {}
    notes = list(extra)
    for arm in exp.get("arms") or []:
        curves = [(list((r.get(key) or {}).get("step") or []),
                   list((r.get(key) or {}).get(value) or []))
                  for r in arm.get("runs") or [] if r.get(key)]
        if not curves:
            continue
        name = str(arm.get("name"))
        same = all(c[0] == curves[0][0] for c in curves)
        lines[name] = _median_curve(curves) if same else curves[0]
        if len(curves) > 1:
            faint[name] = curves
        if not same:
            notes.append(f"{name}: the seeds logged different steps, the bold line is "
                         f"the first seed's.")
    values = [v for xs, ys in lines.values() for v in ys] + \
        [v for cs in faint.values() for _, ys in cs for v in ys]
    finite = [v for v in map(_finite, values) if v is not None]
    log_y = bool(finite) and min(finite) > 0 and (log if log is not None else
                                                  max(finite) / min(finite) > 100)
    seeds = max((len(c) for c in faint.values()), default=1)
    if seeds > 1:
        notes.insert(0, f"Bold: the median over {seeds} seeds; faint: each seed.")
    # Each arm keeps its colour on every chart of the experiment, with or without a curve.
    names = [str(arm.get("name")) for arm in exp.get("arms") or []]
    colors = {n: plots.PALETTE[i % len(plots.PALETTE)] for i, n in enumerate(names)}
    return plots.line_chart(lines, title, "step", f"{label} (log scale)" if log_y else label,
                            log_y=log_y, kind=kind, faint=faint, notes=notes,
                            y_range=y_range, colors=colors)


def _pair(arms: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two arms whose gradient flow the first screen shows: the first seed arm and the
    first repair (or the second seed arm when there is no repair)."""
    seed = [a for a in arms if a.get("role") != "repair"]
    repair = [a for a in arms if a.get("role") == "repair"]
    first = (seed or list(arms))[:1]
    other = (repair or [a for a in arms if a not in first])[:1]
    return first + other


def _heatmap(arm: dict[str, Any], title_extra: str = "") -> str | None:
    """The gradient flow of an arm's first seed that has one, on its own colour scale."""
    run = next((r for r in arm.get("runs") or [] if r.get("heatmap")), None)
    if run is None:
        return None
    hm = run["heatmap"]
    layers = [str(n) for n in hm.get("layers") or []]
    types = list(hm.get("types") or [])
    rows = [plots.row_label(n, types[i] if i < len(types) else None)
            for i, n in enumerate(layers)]
    grad = hm.get("grad_norm") or []
    # The lab measures every layer at every step it keeps, so a null there is a
    # non-finite norm (drawn red), not a gap, unless the JSON says otherwise.
    nonfinite = hm.get("nonfinite") or [[1 if v is None else 0 for v in row] for row in grad]
    return plots.heatmap(
        rows, hm.get("step") or [], grad,
        f"{arm.get('name')}{title_extra}: gradient flow, seed {run.get('seed')}",
        nonfinite=nonfinite, notes=["Own colour scale (the bar on the right); rows are layers, "
                                    "input side at the bottom."])


def _summary_table(experiments: Sequence[dict[str, Any]]) -> list[str]:
    """One line per experiment: its title (a link to its screen) and the verdict."""
    rows = ["<table class='claims'><colgroup><col style='width:26%'><col style='width:12%'>"
            "<col></colgroup><tr><th>experiment</th><th>verdict</th><th>the seed's claim</th>"
            "</tr>"]
    for i, exp in enumerate(experiments):
        rows.append(f"<tr><td><a href='#exp-{i}'>{_e(exp.get('title') or exp.get('name'))}"
                    f"</a></td><td>{_badge(exp.get('verdict'))}</td>"
                    f"<td>{_e(exp.get('claim'))}</td></tr>")
    rows.append("</table>")
    return rows


def _arms_table(exp: dict[str, Any], n_seeds: int) -> list[str]:
    """Every arm: what it is, its metrics by their human names with units over the seeds,
    and per seed its final loss, findings and reports."""
    rows = ["<table class='arms'><colgroup><col style='width:14%'><col style='width:30%'>"
            "<col style='width:32%'><col></colgroup><tr><th>arm</th><th>what it is</th>"
            "<th>measured over the seeds</th><th>per seed: final loss, findings, reports</th>"
            "</tr>"]
    for arm in exp.get("arms") or []:
        n = len(arm.get("runs") or []) or n_seeds
        summary = "<br>".join(
            f"{_e(metric_label(k))}: <b>{_e(metric_text(k, v, n))}</b>"
            for k, v in (arm.get("summary") or {}).items())
        per_seed = []
        for run in arm.get("runs") or []:
            tags = "".join(f"<span class='tag {_e(f.get('severity'))}' "
                           f"title='{_e(f.get('summary'))}'>{_e(f.get('kind'))}</span>"
                           for f in run.get("findings") or []
                           if f.get("severity") in ("warning", "error"))
            links = " ".join(f"<a href='{href}'>{label}</a>" for label, href in (
                ("report", _href(run.get("report_html"))),
                ("json", _href(run.get("report_json")))) if href)
            per_seed.append(f"seed {_e(run.get('seed'))}: "
                            f"{_e(value_text(run.get('final_loss'), 'loss'))} "
                            f"{tags or '<span class=small>no problem found</span>'} {links}")
        role = f" <span class='small'>({_e(arm.get('role'))})</span>" if arm.get("role") else ""
        claim = f"<br><span class='small'>claim: {_e(arm.get('claim'))}</span>" \
            if arm.get("claim") else ""
        rows.append(f"<tr><td><b>{_e(arm.get('name'))}</b>{role}</td>"
                    f"<td>{_e(arm.get('description'))}{claim}</td><td>{summary}</td>"
                    f"<td>{'<br>'.join(per_seed)}</td></tr>")
    rows.append("</table>")
    return rows


def _section(i: int, exp: dict[str, Any], n_seeds: int) -> list[str]:
    """One screen per experiment: the claim, the verdict, one measured sentence and one row
    of figures; the full texts, the other arms' gradient flow and the tables folded below."""
    arms = list(exp.get("arms") or [])
    evidence = str(exp.get("evidence"))
    special = evidence in _EVIDENCE and any(r.get(evidence) for a in arms
                                            for r in a.get("runs") or [])
    shown = _pair(arms)[:1] if special else _pair(arms)
    first = [h for a in shown if (h := _heatmap(a, f" ({a.get('role')})"
                                                 if a.get("role") else ""))]
    if special:
        first.insert(0, _EVIDENCE[evidence](exp))
    rest = [h for a in arms if a not in shown and (h := _heatmap(a))]
    fields = [("Setup", exp.get("setup")), ("Observed", exp.get("observed")),
              ("Reason", exp.get("reason")), ("Repair", exp.get("repair"))]
    return [f"<section class='exp' id='exp-{i}'>",
            f"<h2>{_e(exp.get('title') or exp.get('name'))} {_badge(exp.get('verdict'))}</h2>",
            f"<p class='meta'>{_e(exp.get('source'))} · <code>{_e(exp.get('name'))}</code></p>",
            f"<p class='claim'><b>The seed claims:</b> {_e(exp.get('claim'))}</p>",
            f"<p class='what'><b>What happened:</b> {_e(first_sentence(exp.get('observed')))}"
            "</p>",
            "<div class='gw-row'>", _loss_figure(exp), *first, "</div>",
            "<details><summary>Details: setup, the full measured text, the repair, every "
            "arm's numbers and reports</summary>",
            "<dl>", *(f"<dt>{k}</dt><dd>{_e(v)}</dd>" for k, v in fields if v), "</dl>",
            *(["<div class='gw-figs'>", *rest, "</div>"] if rest else []),
            *_arms_table(exp, n_seeds), "</details></section>"]


def render_lab_page(lab: dict[str, Any]) -> str:
    """The lab's self-contained index page from its JSON (schema ``gradwatch.lab/v1``)."""
    experiments = list(lab.get("experiments") or [])
    seeds = list(lab.get("seeds") or [])
    duration = _finite(lab.get("duration_s"))
    meta = [f"seeds {_e(', '.join(map(str, seeds)))}" if seeds else "",
            f"{duration:.1f} s" if duration is not None else "",
            f"gradwatch {_e(lab.get('gradwatch'))}" if lab.get("gradwatch") else ""]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>gradwatch lab</title><style>{_PAGE_CSS}</style></head><body>",
        "<h1>gradwatch lab: what the seed documents claim, and what really happens</h1>",
        "<p class='lead'>Each experiment is run exactly as the seed document writes it "
        "(data, layers, initialisation, optimiser, learning rate, epochs), under gradwatch and "
        f"over {len(seeds) or 'several'} random seeds, next to the repair that really works. "
        "Each one gets a screen: the claim, the verdict, what was measured, the loss of every "
        "arm and where the gradient flows in the seed's arm and in its repair (layer by step, "
        "input side at the bottom). Open <i>Details</i> for the full text, every arm's "
        "numbers and each run's report.</p>",
        f"<p class='meta'>{' · '.join(m for m in meta if m)}</p>",
        "<h2>The experiments</h2>",
        *_summary_table(experiments),
    ]
    for i, exp in enumerate(experiments):
        parts += _section(i, exp, len(seeds))
    if not experiments:
        parts.append("<p>No experiment in this lab run.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
