"""The one-page text summary (stderr of ``gradwatch run``, ``Report.summary()``)."""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from typing import Any

from .coverage import cadence_sentence, coverage_notes

__all__ = ["printable", "render_text"]

_MARK = {"error": "ERROR", "warning": "WARN ", "info": "info "}


def _wrap(text: str, width: int, indent: str, hang: str | None = None) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent,
                         subsequent_indent=hang if hang is not None else indent) or [indent]


def _label(name: str) -> str:
    """``layer 0`` for an nn.Sequential index, so that a bare number reads as a layer."""
    return f"layer {name}" if name.replace(".", "").isdigit() else name


def _layers(names: list[str]) -> str:
    if not names:
        return "whole model"
    if len(names) <= 4:
        return ", ".join(_label(n) for n in names)
    return f"{_label(names[0])} .. {_label(names[-1])} ({len(names)} layers)"


def _rates(optimizer: dict[str, Any], lr_series: list[float | None]) -> str:
    """An optimizer's learning rates, or the range a schedule moved them through."""
    used = [v for v in lr_series if v is not None]
    if used and min(used) != max(used):  # a schedule (the largest group's rate)
        return f"{min(used):.3g} to {max(used):.3g} over the run"
    rates = [g.get("lr") for g in optimizer["groups"]]
    return ", ".join(f"{r:.3g}" if isinstance(r, (int, float)) else "?" for r in rates)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _loss(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "not finite"


def _verified_lines(remedies: list[dict[str, Any]], width: int) -> list[str]:
    """What ``gradwatch run --verify`` measured: the best remedy, the ones that made things
    worse, and the ones the time budget left untried (remedies arrive ordered by effect)."""
    tried = [r for r in remedies if r.get("verified")]
    if not tried:
        return []
    lines: list[str] = []
    best = tried[0]["verified"]
    if best.get("status") in ("better", "fixed"):
        gone = {True: ", finding gone", False: ", finding remains"}.get(
            best.get("finding_gone"), ", finding not measurable after it")
        new = best.get("new_findings")
        gone += f", new: {', '.join(new)}" if new else ""
        lines += _wrap(f"verified best: {tried[0]['id']}, loss {_loss(best['loss_before'])} -> "
                       f"{_loss(best['loss_after'])} in {best['steps']} steps{gone}",
                       width, "  = ", "    ")
    else:
        lines += _wrap("verified: no remedy gradwatch could apply helped within the budget",
                       width, "  = ", "    ")
    for status, label in (("worse", "verified worse"), ("no_effect", "no effect"),
                          ("failed", "re-run failed"), ("diagnostic", "diagnostic, stopped at "
                                                        "the first bad value"),
                          ("not_finished", "not verified in time"),
                          ("not_tried", "not re-run, another repaired it first")):
        ids = [r["id"] + (f" (loss {_loss(r['verified']['loss_before'])} -> "
                          f"{_loss(r['verified']['loss_after'])})" if status == "worse" else "")
               for r in tried if r["verified"].get("status") == status]
        if ids:
            lines += _wrap(f"{label}: {', '.join(ids)}", width, "  = ", "    ")
    return lines


def _fix_lines(fix: dict[str, Any], width: int) -> list[str]:
    """What ``gradwatch run --fix`` did: the remedy it restarted the run with, or why not."""
    found = fix.get("found_at_step")
    if fix.get("restarted"):
        remedy = fix.get("remedy") or {}
        v = remedy.get("verified") or {}
        gone = ", finding gone" if v.get("finding_gone") else ""
        kinds = ", ".join(fix.get("kinds") or [fix.get("kind")])
        # the pass that found what the remedy repairs: the last one, not the first
        passes = [p for p in fix.get("passes") or [] if isinstance(p, dict)]
        at = passes[-1].get("step", found) if passes else found
        lines = _wrap(f"fixed: {kinds} found after {at} steps; {remedy.get('id')} "
                      f"repaired it in a re-run (loss {_loss(v.get('loss_before'))} -> "
                      f"{_loss(v.get('loss_after'))} in {v.get('steps')} steps{gone}); the "
                      f"script was restarted from its start with it, and this report is of "
                      f"that run.", width, "")
        for change in (v.get("changes") or [])[:6]:
            lines += _wrap(f"changed: {change}", width, "  - ", "    ")
        return lines
    if found is None:
        return _wrap("fix: no problem found while the run went on; nothing was changed.",
                     width, "")
    return _wrap(f"fix: a problem was found after {found} steps, but no remedy gradwatch "
                 f"could apply repaired it in a re-run; the run went on unchanged (the "
                 f"remedies tried are in the JSON report's fix.findings).", width, "")


def render_text(data: dict[str, Any], width: int = 100) -> str:
    run, findings, layers = data["run"], data["findings"], data["layers"]
    counts = Counter(f["severity"] for f in findings)
    problems = counts["error"] + counts["warning"]
    took = run.get("duration_s")  # the contract allows null (a report written by hand)
    head = (f"gradwatch {data['tool']['version']}: {run['steps']} steps, run {run['status']}"
            + (f" in {took:.1f} s" if isinstance(took, (int, float)) else ""))
    lines = [head]
    types = Counter(layer["type"] for layer in layers)
    opt = data.get("facts", {}).get("optimizers", [])
    model = ", ".join(f"{t} x{n}" if n > 1 else t for t, n in types.most_common()) or "none"
    lr_series = data["series"].get("lr", []) if len(opt) == 1 else []
    # A sweep trains one model after another: the same optimizer once per model, grouped.
    described = Counter(f"{o['type']} (lr {_rates(o, lr_series)})" for o in opt)
    opts = ", ".join(f"{d} x{n}" if n > 1 else d for d, n in described.items()) or "none seen"
    lines.append(f"model: {len(layers)} layer{'s' if len(layers) != 1 else ''} with "
                 f"parameters ({model}); optimizer: {opts}")
    if data.get("fix"):
        lines += _fix_lines(data["fix"], width)
    cadence = cadence_sentence(run)
    if cadence:
        lines += _wrap(cadence, width, "")
    if run.get("world_size"):
        lines.append(f"processes: {run['world_size']} ranks; this report is rank "
                     f"{run['rank']}'s")
    if run.get("error"):
        error = " ".join(str(run["error"]).split())
        lines += _wrap(f"the run ended with {_shorten(error, 300)}", width, "")
    for rank, error in (run.get("rank_errors") or {}).items():
        lines += _wrap(f"rank {rank} ended with {_shorten(' '.join(str(error).split()), 200)}",
                       width, "")
    if not problems and not run.get("steps"):
        lines.append("no step was completed: nothing to judge.")
    elif not problems:
        lines.append("no problems found" + (f" ({counts['info']} note"
                                             f"{'s' if counts['info'] != 1 else ''})"
                                             if counts["info"] else "") + ".")
    else:
        lines.append(f"{problems} problem{'s' if problems != 1 else ''} found: "
                     f"{counts['error']} error, {counts['warning']} warning.")
    for f in findings:
        lines.append("")
        lines.append(f"{_MARK[f['severity']]} {f['kind']}  steps {f['first_step']}-"
                     f"{f['last_step']}  {_layers(f['layers'])}")
        lines += _wrap(f["summary"], width, "  ")
        for c in f["causes"][:4]:
            lines += _wrap(f"cause: {c['text']}", width, "  - ", "    ")
        if f["remedies"]:
            best = f["remedies"][0]
            lines += _wrap(f"try first ({best['id']}): {best['text']}", width, "  > ", "    ")
            lines += ["      " + code_line for code_line in best["code"].splitlines()]
            others = [r["id"] for r in f["remedies"][1:]]
            if others:
                lines.append(f"  also: {', '.join(others)}")
            lines += _verified_lines(f["remedies"], width)
    notes = coverage_notes(data)
    if notes:
        lines.append("")
        for note in notes:
            lines += _wrap(f"not measured: {note}", width, "", "  ")
    return "\n".join(map(printable, lines)) + "\n"


# C0 and C1 control characters (the newline is added between lines) and the bidirectional
# overrides: names from the user's code must not move the cursor, retitle the terminal or
# reorder what the reader sees.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x1b``), safe for a terminal."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)
