"""A self-contained HTML report (no scripts, no network); every user-provided name escaped."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from html import escape
from typing import Any

from . import plots
from .coverage import cadence_sentence, coverage_notes

__all__ = ["CSS", "figures", "render_html"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;width:100%;font-size:.9em}
td,th{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
.error{border-left:6px solid #c0392b}.warning{border-left:6px solid #e67e22}
.info{border-left:6px solid #7f8c8d}
.finding{padding:.5em 1em;margin:1em 0;background:#fafafa}
pre{background:#f0f0f0;padding:.6em;overflow-x:auto}
.sev{font-weight:bold;text-transform:uppercase}
.gw-figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:1.2em 1.6em}
.gw-figure{margin:0;min-width:0}
.gw-figure figcaption{font-size:.82em;color:#555;margin-top:.3em}
.gw-figure svg{width:100%;height:auto;border:1px solid #eee;box-sizing:border-box}
.glance li{margin:.2em 0}
"""


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _wants_log(values: Sequence[Any]) -> bool:
    """A log axis when every value is > 0 and they span more than two decades."""
    finite = [v for v in map(_finite, values) if v is not None]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100


def _layer_order(data: dict[str, Any], names: Sequence[str]) -> list[str]:
    """The report's layers in forward order (input side first), then any others."""
    ordered = [layer["name"] for layer in data.get("layers", []) if layer["name"] in names]
    return ordered + [n for n in names if n not in ordered]


def _profile_steps(steps: Sequence[Any], grad: dict[str, Sequence[Any]]) -> list[int]:
    """Indices of the first, middle and last steps where some layer has a finite norm."""
    measured = [i for i in range(len(steps))
                if any(i < len(v) and _finite(v[i]) is not None for v in grad.values())]
    if not measured:
        return []
    picks = [measured[0], measured[len(measured) // 2], measured[-1]]
    return sorted(set(picks))


def _preflight_figures(data: dict[str, Any]) -> list[str]:
    """One forward/backward at init: a curve over steps says nothing, the profile does."""
    series = data.get("series") or {}
    grad = series.get("grad_norm") or {}
    layers = _layer_order(data, list(grad))
    out = [plots.profile_chart(
        layers, {"at init": [(grad.get(n) or [None])[0] for n in layers]},
        "Gradient norm per layer at initialisation", notes=[
            "Input side left. A line falling steeply towards the left means the "
            "gradient vanishes before it reaches the first layers."])]
    rms = series.get("activation_rms") or {}
    if rms:
        order = _layer_order(data, list(rms))
        out.append(plots.profile_chart(
            order, {"at init": [(rms.get(n) or [None])[0] for n in order]},
            "Output RMS per layer at initialisation", "output RMS",
            kind="activation-profile"))
    return out


def _loss_figure(data: dict[str, Any]) -> list[str]:
    series = data.get("series") or {}
    loss = list(series.get("loss") or [])
    log_loss = _wants_log(loss)
    return [plots.line_chart(
        {"loss": (list(series.get("step") or []), loss)}, "Loss", "step",
        "loss (log scale)" if log_loss else "loss", log_y=log_loss, kind="loss")]


def _gradient_figures(data: dict[str, Any]) -> list[str]:
    """The gradient-flow heatmap and the per-layer profile at chosen steps."""
    series = data.get("series") or {}
    steps = list(series.get("step") or [])
    grad = series.get("grad_norm") or {}
    layers = _layer_order(data, list(grad))
    nonfinite = series.get("nonfinite") or {}
    types = {layer["name"]: layer.get("type") for layer in data.get("layers") or []}
    out = [plots.heatmap(
        [plots.row_label(n, types.get(n)) for n in layers], steps, [grad[n] for n in layers],
        nonfinite=[nonfinite.get(n) or [] for n in layers], notes=[
            "Each row is a layer, input side at the bottom; each column a step. Dark rows at "
            "the bottom mean the first layers get little gradient (vanishing); bright or red "
            "cells spreading down mean exploding or non-finite gradients."])]
    picks = _profile_steps(steps, grad)
    if picks:
        which = (["first", "middle", "last"] if len(picks) == 3 else
                 ["first", "last"] if len(picks) == 2 else ["only one"])
        names = [f"step {steps[i]} ({w})" for w, i in zip(which, picks, strict=True)]
        short = "" if len(picks) == 3 else " (too few steps with a finite norm for three)"
        out.append(plots.profile_chart(
            layers, {name: [grad[n][i] if i < len(grad[n]) else None for n in layers]
                     for name, i in zip(names, picks, strict=True)},
            "Gradient norm per layer at chosen steps", notes=[
                f"One line per step: {', '.join(names)}{short}. "
                "Input side left: a line that falls towards the left means the gradient "
                "shrinks on its way back to the input."]))
    return out


def _site_figures(data: dict[str, Any]) -> list[str]:
    """Dead ReLU units and saturated units over time, one line per activation site."""
    series = data.get("series") or {}
    site_steps = list(series.get("site_step") or [])
    kinds = {s.get("name"): s.get("kind") for s in (data.get("facts") or {}).get("sites") or []}
    out = []
    for key, kind, title, what in (
            ("dead_fraction", "dead-fraction", "Dead ReLU units over time",
             "Fraction of each ReLU site's units that output 0 for every sample of the batch."),
            ("saturated_fraction", "saturated-fraction", "Saturated units over time",
             "Fraction of each sigmoid/tanh site's units in the flat part of the curve.")):
        sites = series.get(key) or {}
        if sites and site_steps:
            seen = {v for values in sites.values() for v in map(_finite, values) if v is not None}
            notes = [what]
            if len(sites) > 1 and len(seen) == 1:
                notes.append(f"Every site stays at {seen.pop():g} throughout: the lines lie on "
                             f"top of each other.")
            out.append(plots.line_chart(
                {f"{name} ({kinds[name]})" if kinds.get(name) else name: (site_steps, values)
                 for name, values in sites.items()}, title, "step",
                "fraction of units", kind=kind, y_range=(0.0, 1.0), notes=notes))
    return out


def _through_time_figure(data: dict[str, Any]) -> list[str]:
    through = (data.get("series") or {}).get("through_time") or {}
    if not through:
        return []
    return [plots.line_chart(
        {name: (m.get("step") or [], m.get("ratio_first_to_last_timestep") or [])
         for name, m in through.items()},
        "Gradient through time: first timestep / last timestep", "step",
        "ratio (log scale)", log_y=True, kind="through-time", notes=[
            "How much of the gradient at the last timestep of the sequence reaches the "
            "first one; far below 1 means the recurrent layer forgets early inputs."])]


def figures(data: dict[str, Any]) -> list[str]:
    """The report's plots as SVG figures: loss, gradient flow, profiles, sites, through time."""
    return [fig for draw in _builders(data) for fig in draw(data)]


def _builders(data: dict[str, Any]) -> list[Any]:
    if (data.get("run") or {}).get("mode") == "preflight":
        return [_preflight_figures]
    return [_loss_figure, _gradient_figures, _site_figures, _through_time_figure]


def drawn_figures(data: dict[str, Any]) -> list[str]:
    """:func:`figures`, each plot on its own: one that cannot be drawn from this report's
    series (a report read back from an edited file) is replaced by a sentence saying so,
    and the rest of the page is still written."""
    out: list[str] = []
    for draw in _builders(data):
        try:
            out += draw(data)
        except Exception as exc:
            out.append(f"<p class='gw-figure'>Could not draw {_e(draw.__name__.strip('_'))}: "
                       f"{_e(type(exc).__name__)}: {_e(str(exc)[:200])}</p>")
    return out


def _loss(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) else "not finite"


def _verified_line(v: dict[str, Any]) -> str:
    """One sentence for a remedy's ``verified`` record."""
    text = f"{v.get('status', '?')}"
    if v.get("steps"):
        gone = {True: "finding gone", False: "finding remains"}.get(v.get("finding_gone"), "")
        text += f" over {v['steps']} steps: loss {_loss(v.get('loss_before'))} -> " \
            f"{_loss(v.get('loss_after'))}" + (f", {gone}" if gone else "")
    return text + (f"; {v['note']}" if v.get("note") else "")


def _verified_table(remedies: Sequence[dict[str, Any]]) -> list[str]:
    """The re-runs of ``--verify`` side by side, best first (the order they arrive in)."""
    rows = [r for r in remedies if r.get("verified")]
    if not rows:
        return []
    out = ["<p><b>Verified on this script</b> (each remedy re-run from the start, same "
           "seeds, against a re-run without it)</p><table><tr><th>remedy</th><th>result</th>"
           "<th>loss without</th><th>loss with</th><th>improvement</th><th>finding</th>"
           "<th>new findings</th></tr>"]
    for r in rows:
        v = r["verified"]
        imp = v.get("improvement")
        gone = {True: "gone", False: "remains"}.get(v.get("finding_gone"), "")
        out.append(f"<tr><td><code>{_e(r['id'])}</code></td><td>{_e(v.get('status'))}</td>"
                   f"<td>{_e(_loss(v.get('loss_before')) if v.get('steps') else '')}</td>"
                   f"<td>{_e(_loss(v.get('loss_after')) if v.get('steps') else '')}</td>"
                   f"<td>{_e(f'{imp:.3g}x' if isinstance(imp, (int, float)) else '')}</td>"
                   f"<td>{_e(gone)}</td><td>{_e(', '.join(v.get('new_findings') or []))}</td>"
                   "</tr>")
    out.append("</table>")
    return out


def _glance(findings: Sequence[dict[str, Any]]) -> list[str]:
    if not findings:
        return []
    items = [f"<li><a href='#finding-{i}'><span class='sev'>{_e(f['severity'])}</span></a> "
             f"<code>{_e(f['kind'])}</code>: {_e(f['summary'])}</li>"
             for i, f in enumerate(findings)]
    return ["<ul class='glance'>", *items, "</ul>"]


def render_html(data: dict[str, Any]) -> str:
    """The report as one self-contained HTML page: summary, plots, findings, layers."""
    run = data["run"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>gradwatch report</title><style>{CSS}</style></head><body>",
        f"<h1>gradwatch report</h1><p>{_e(run['steps'])} steps, run {_e(run['status'])} in "
        f"{_e(run['duration_s'])} s; gradwatch {_e(data['tool']['version'])}.</p>",
    ]
    if run.get("error"):
        parts.append(f"<p><b>The run ended with:</b> {_e(run['error'])}</p>")
    parts += [f"<p class='coverage'><b>Not measured:</b> {_e(note)}</p>"
              for note in coverage_notes(data)]
    cadence = cadence_sentence(run)
    if cadence:
        parts.append(f"<p class='cadence'>{_e(cadence[0].upper() + cadence[1:])}</p>")
    problems = [f for f in data["findings"] if f["severity"] != "info"]
    parts += _glance(data["findings"])
    figs = drawn_figures(data)
    if figs:
        parts.append("<h2>Plots</h2><div class='gw-figs'>")
        parts += figs
        parts.append("</div>")
    parts.append(f"<h2>Findings ({len(problems)} problem{'s' if len(problems) != 1 else ''})"
                 f"</h2>")
    if not data["findings"]:
        parts.append("<p>No problems found.</p>")
    for i, f in enumerate(data["findings"]):
        parts.append(f"<div class='finding {_e(f['severity'])}' id='finding-{i}'>")
        parts.append(f"<p><span class='sev'>{_e(f['severity'])}</span> <code>{_e(f['kind'])}"
                     f"</code>, steps {_e(f['first_step'])}-{_e(f['last_step'])}, layers: "
                     f"{_e(', '.join(f['layers']) or 'whole model')}</p>")
        parts.append(f"<p>{_e(f['summary'])}</p>")
        if f["causes"]:
            parts.append("<p><b>Causes measured on this model</b></p><ul>")
            parts += [f"<li><code>{_e(c['id'])}</code>: {_e(c['text'])}</li>" for c in f["causes"]]
            parts.append("</ul>")
        if f["remedies"]:
            parts += _verified_table(f["remedies"])
            parts.append("<p><b>Remedies</b></p><ol>")
            for r in f["remedies"]:
                verified = ""
                if r.get("verified"):
                    changes = r["verified"].get("changes") or []
                    verified = f"<br><i>verified: {_e(_verified_line(r['verified']))}</i>" + (
                        "<details><summary>what the re-run changed</summary><ul>" +
                        "".join(f"<li>{_e(c)}</li>" for c in changes) + "</ul></details>"
                        if changes else "")
                parts.append(f"<li><code>{_e(r['id'])}</code>: {_e(r['text'])}{verified}"
                             f"<pre>{_e(r['code'])}</pre></li>")
            parts.append("</ol>")
        parts.append("<details><summary>Evidence</summary><pre>"
                     f"{_e(json.dumps(f['evidence'], indent=2))}</pre></details></div>")
    parts.append("<h2>Layers (input side first)</h2><table><tr><th>depth</th><th>name</th>"
                 "<th>type</th><th>parameters</th></tr>")
    parts += [f"<tr><td>{_e(layer['depth'])}</td><td>{_e(layer['name'])}</td>"
              f"<td>{_e(layer['type'])}</td><td>{_e(layer['params'])}</td></tr>"
              for layer in data["layers"]]
    parts.append("</table></body></html>")
    return "\n".join(parts)
