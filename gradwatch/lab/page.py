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
"""

_VERDICT_CLASS = {"holds": "v-holds", "does not hold": "v-not", "partly": "v-partly"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def _e(x: Any) -> str:
    return escape("" if x is None else str(x), quote=True)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
        and math.isfinite(v) else None


def _number(v: Any) -> str:
    """A number in three significant digits; None (non-finite in the JSON) as 'non-finite'."""
    f = _finite(v)
    if f is None:
        return "non-finite" if v is None or isinstance(v, float) else _e(v)
    if f == 0 or 1e-3 <= abs(f) < 1e5:
        return f"{f:.3g}"
    return f"{f:.2e}"


def _metric(name: str, value: Any) -> str:
    """``final loss 9.76 (9.75-9.77)`` from a summary entry {median, min, max}."""
    label = _e(name.replace("_", " "))
    if isinstance(value, dict) and "median" in value:
        spread = ""
        if "min" in value and "max" in value and value["min"] != value["max"]:
            spread = f" <span class='small'>({_number(value['min'])} to " \
                     f"{_number(value['max'])})</span>"
        return f"{label} {_number(value['median'])}{spread}"
    if isinstance(value, (int, float)) or value is None:
        return f"{label} {_number(value)}"
    return f"{label} {_e(value)}"


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
    lines: dict[str, tuple[list[Any], list[Any]]] = {}
    faint: dict[str, list[tuple[list[Any], list[Any]]]] = {}
    notes = []
    for arm in exp.get("arms") or []:
        curves = [(list((r.get("loss_curve") or {}).get("step") or []),
                   list((r.get("loss_curve") or {}).get("loss") or []))
                  for r in arm.get("runs") or [] if r.get("loss_curve")]
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
    log_y = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100
    seeds = max((len(c) for c in faint.values()), default=1)
    if seeds > 1:
        notes.insert(0, f"Bold: the median over {seeds} seeds; faint: each seed.")
    return plots.line_chart(lines, "Loss of every arm", "step",
                            "loss (log scale)" if log_y else "loss", log_y=log_y, kind="loss",
                            faint=faint, notes=notes)


def _log_range(maps: Sequence[dict[str, Any]]) -> tuple[float, float] | None:
    """log10 of the smallest and largest positive finite norm over several heatmaps."""
    logs = [math.log10(f) for hm in maps for row in hm.get("grad_norm") or [] for v in row
            if (f := _finite(v)) is not None and f > 0]
    return (min(logs), max(logs)) if logs else None


def _heatmaps(exp: dict[str, Any]) -> list[str]:
    """Seed 0's gradient flow per arm, all on one colour scale so the arms compare."""
    maps = [(arm, run) for arm in exp.get("arms") or [] for run in
            [next((r for r in arm.get("runs") or [] if r.get("heatmap")), None)] if run]
    shared = _log_range([run["heatmap"] for _, run in maps])
    note = ["One colour scale for every arm of this experiment."] if len(maps) > 1 else []
    out = []
    for arm, run in maps:
        hm = run["heatmap"]
        layers = [str(n) for n in hm.get("layers") or []]
        grad = hm.get("grad_norm") or []
        # The lab measures every layer at every step it keeps, so a null there is a
        # non-finite norm (drawn red), not a gap, unless the JSON says otherwise.
        nonfinite = hm.get("nonfinite") or [[1 if v is None else 0 for v in row]
                                            for row in grad]
        out.append(plots.heatmap(
            layers, hm.get("step") or [], grad,
            f"{arm.get('name')}: gradient flow, seed {run.get('seed')}",
            nonfinite=nonfinite, log_range=shared, notes=note))
    return out


def _claims_table(experiments: Sequence[dict[str, Any]], n_seeds: int) -> list[str]:
    """One block per experiment: claim, verdict and observed numbers on the first row, the
    measured reason and the repair that works across the full width below them."""
    head = ("experiment", "the seed's claim", "verdict",
            f"observed over {n_seeds} seed{'s' if n_seeds != 1 else ''}")
    rows = ["<table class='claims'><colgroup><col style='width:14%'><col style='width:29%'>"
            "<col style='width:11%'><col></colgroup><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for i, exp in enumerate(experiments):
        finals = [f"{_e(arm.get('name'))} {_metric('', final).strip()}"
                  for arm in exp.get("arms") or []
                  if (final := (arm.get("summary") or {}).get("final_loss")) is not None]
        finals_text = f"<br><span class='small'>final loss: {' · '.join(finals)}</span>" \
            if finals else ""
        rows.append(
            f"<tr><td rowspan='2'><a href='#exp-{i}'>{_e(exp.get('title') or exp.get('name'))}"
            f"</a><br><span class='small'>{_e(exp.get('source'))}</span></td>"
            f"<td>{_e(exp.get('claim'))}</td><td>{_badge(exp.get('verdict'))}</td>"
            f"<td>{_e(exp.get('observed'))}{finals_text}</td></tr>"
            f"<tr class='why'><td colspan='3'><b>Measured reason:</b> {_e(exp.get('reason'))}"
            f"<br><b>Repair that works:</b> {_e(exp.get('repair'))}</td></tr>")
    rows.append("</table>")
    return rows


def _arms_table(exp: dict[str, Any]) -> list[str]:
    rows = ["<table><tr><th>arm</th><th>what it is</th><th>over the seeds</th>"
            "<th>per seed: final loss, findings, reports</th></tr>"]
    for arm in exp.get("arms") or []:
        summary = "<br>".join(_metric(k, v) for k, v in (arm.get("summary") or {}).items())
        per_seed = []
        for run in arm.get("runs") or []:
            tags = "".join(f"<span class='tag {_e(f.get('severity'))}' "
                           f"title='{_e(f.get('summary'))}'>{_e(f.get('kind'))}</span>"
                           for f in run.get("findings") or []
                           if f.get("severity") in ("warning", "error"))
            links = " ".join(f"<a href='{href}'>{label}</a>" for label, href in (
                ("report", _href(run.get("report_html"))),
                ("json", _href(run.get("report_json")))) if href)
            per_seed.append(f"seed {_e(run.get('seed'))}: {_number(run.get('final_loss'))} "
                            f"{tags or '<span class=small>no problem found</span>'} {links}")
        role = f" <span class='small'>({_e(arm.get('role'))})</span>" if arm.get("role") else ""
        claim = f"<br><span class='small'>claim: {_e(arm.get('claim'))}</span>" \
            if arm.get("claim") else ""
        rows.append(f"<tr><td><b>{_e(arm.get('name'))}</b>{role}</td>"
                    f"<td>{_e(arm.get('description'))}{claim}</td><td>{summary}</td>"
                    f"<td>{'<br>'.join(per_seed)}</td></tr>")
    rows.append("</table>")
    return rows


def _section(i: int, exp: dict[str, Any]) -> list[str]:
    fields = [("Claim", exp.get("claim")), ("Setup", exp.get("setup")),
              ("Observed", exp.get("observed")), ("Reason", exp.get("reason")),
              ("Repair", exp.get("repair"))]
    return [f"<section class='exp' id='exp-{i}'>",
            f"<h2>{_e(exp.get('title') or exp.get('name'))} {_badge(exp.get('verdict'))}</h2>",
            f"<p class='meta'>{_e(exp.get('source'))} · <code>{_e(exp.get('name'))}</code></p>",
            "<dl>", *(f"<dt>{k}</dt><dd>{_e(v)}</dd>" for k, v in fields if v), "</dl>",
            "<div class='gw-figs'>", _loss_figure(exp), *_heatmaps(exp), "</div>",
            "<h3>Arms</h3>", *_arms_table(exp), "</section>"]


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
        "<p class='lead'>Each experiment below is run exactly as the seed document writes it "
        "(data, layers, initialisation, optimiser, learning rate, epochs), under gradwatch and "
        f"over {len(seeds) or 'several'} random seeds, next to the repair that really works. "
        "The table compares each claim with what was measured; the verdict says whether the "
        "claim holds. Further down, every experiment shows the loss curves of all its arms, "
        "where the gradient flows (layer by step, input side at the bottom) and links to every "
        "run's full report.</p>",
        f"<p class='meta'>{' · '.join(m for m in meta if m)}</p>",
        "<h2>Claim vs observed</h2>",
        *_claims_table(experiments, len(seeds)),
    ]
    for i, exp in enumerate(experiments):
        parts += _section(i, exp)
    if not experiments:
        parts.append("<p>No experiment in this lab run.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
