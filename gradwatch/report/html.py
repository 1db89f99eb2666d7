"""A self-contained HTML report (no scripts, no network); every user-provided name escaped."""

from __future__ import annotations

import json
from html import escape
from typing import Any

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;width:100%;font-size:.9em}
td,th{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
.error{border-left:6px solid #c0392b}.warning{border-left:6px solid #e67e22}
.info{border-left:6px solid #7f8c8d}
.finding{padding:.5em 1em;margin:1em 0;background:#fafafa}
pre{background:#f0f0f0;padding:.6em;overflow-x:auto}
.sev{font-weight:bold;text-transform:uppercase}
"""


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def render_html(data: dict[str, Any]) -> str:
    run = data["run"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>gradwatch report</title><style>{_CSS}</style></head><body>",
        f"<h1>gradwatch report</h1><p>{_e(run['steps'])} steps, run {_e(run['status'])} in "
        f"{_e(run['duration_s'])} s; gradwatch {_e(data['tool']['version'])}.</p>",
    ]
    if run.get("error"):
        parts.append(f"<p><b>The run ended with:</b> {_e(run['error'])}</p>")
    problems = [f for f in data["findings"] if f["severity"] != "info"]
    parts.append(f"<h2>Findings ({len(problems)} problem{'s' if len(problems) != 1 else ''})"
                 f"</h2>")
    if not data["findings"]:
        parts.append("<p>No problems found.</p>")
    for f in data["findings"]:
        parts.append(f"<div class='finding {_e(f['severity'])}'>")
        parts.append(f"<p><span class='sev'>{_e(f['severity'])}</span> <code>{_e(f['kind'])}"
                     f"</code>, steps {_e(f['first_step'])}-{_e(f['last_step'])}, layers: "
                     f"{_e(', '.join(f['layers']) or 'whole model')}</p>")
        parts.append(f"<p>{_e(f['summary'])}</p>")
        if f["causes"]:
            parts.append("<p><b>Causes measured on this model</b></p><ul>")
            parts += [f"<li><code>{_e(c['id'])}</code>: {_e(c['text'])}</li>" for c in f["causes"]]
            parts.append("</ul>")
        if f["remedies"]:
            parts.append("<p><b>Remedies</b></p><ol>")
            for r in f["remedies"]:
                verified = ""
                if r.get("verified"):
                    verified = f"<br>verified: {_e(json.dumps(r['verified']))}"
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
