"""The shape of a report's JSON (``gradwatch.report/v1``), checked when one is read back.

A report read from disk may come from a user's folder, another tool or another version: it
is checked against the contract of ``../shared/DESIGN.md`` before any code relies on it, so
that a malformed file gives one clear ``ValueError`` instead of an error deep inside.
Keys a later version adds are allowed; the keys of the contract must have their types.
"""

from __future__ import annotations

from typing import Any

from ..findings import KINDS, SEVERITIES

__all__ = ["SCHEMA", "check_report"]

SCHEMA = "gradwatch.report/v1"

_STATUSES = ("completed", "failed", "interrupted")


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str) -> None:
        raise ValueError(f"not a gradwatch report: {self.source}: {where} {what}")

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, f"must be a JSON object, not {_kind(value)}")
        return value

    def items(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(where, f"must be a list, not {_kind(value)}")
        return value

    def text(self, value: Any, where: str) -> None:
        if not isinstance(value, str):
            self.fail(where, f"must be a string, not {_kind(value)}")

    def whole(self, value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(where, f"must be a whole number >= 0, not {value!r:.60}")

    def one_of(self, value: Any, allowed: tuple[str, ...], where: str) -> None:
        if value not in allowed:
            self.fail(where, f"must be one of {', '.join(allowed)}, not {value!r:.60}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def check_report(data: Any, source: str = "the document") -> None:
    """Raise ``ValueError`` ("not a gradwatch report: ...") unless ``data`` has the
    contract's shape; ``source`` names the file in the message."""
    c = _Checker(source)
    c.obj(data, "the document")
    if data.get("schema") != SCHEMA:
        c.fail("its schema", f"is {data.get('schema')!r:.60}, expected {SCHEMA!r}")
    run = c.obj(data.get("run"), "run")
    c.whole(run.get("steps"), "run.steps")
    c.one_of(run.get("status"), _STATUSES, "run.status")
    for i, layer in enumerate(c.items(data.get("layers"), "layers")):
        c.text(c.obj(layer, f"layers[{i}]").get("name"), f"layers[{i}].name")
    for i, finding in enumerate(c.items(data.get("findings"), "findings")):
        _check_finding(c, c.obj(finding, f"findings[{i}]"), f"findings[{i}]")
    _check_series(c, c.obj(data.get("series"), "series"))
    _check_shown(c, data, run)


_FLAT_SERIES = ("step", "loss", "lr", "detail_step", "site_step")
_LAYER_SERIES = ("grad_norm", "weight_norm", "update_ratio", "activation_rms", "nonfinite",
                 "dead_fraction", "saturated_fraction")


def _check_series(c: _Checker, series: dict[str, Any]) -> None:
    """Series hold lists of numbers and nulls (per step), by name where they are per layer
    or per site; nothing else is plotted."""
    for key, value in series.items():
        where = f"series.{key}"
        if key in _FLAT_SERIES:
            _check_column(c, value, where)
        elif key in _LAYER_SERIES:
            for name, column in c.obj(value, where).items():
                _check_column(c, column, f"{where}.{name}")
        elif key == "through_time":
            for name, module in c.obj(value, where).items():
                for part, column in c.obj(module, f"{where}.{name}").items():
                    _check_column(c, column, f"{where}.{name}.{part}")
        elif key == "stride":
            c.whole(value, where)


def _check_column(c: _Checker, value: Any, where: str) -> None:
    for item in c.items(value, where):
        _number(c, item, f"{where}[]")


def _number(c: _Checker, value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        c.fail(where, f"must be a number or null, not {value!r:.60}")


def _texts(c: _Checker, value: Any, where: str) -> None:
    for i, item in enumerate(c.items(value, where)):
        c.text(item, f"{where}[{i}]")


def _check_shown(c: _Checker, data: dict[str, Any], run: dict[str, Any]) -> None:
    """What the text and HTML pages show beyond the contract's keys (optional, typed)."""
    c.text(c.obj(data.get("tool"), "tool").get("version"), "tool.version")
    _number(c, run.get("duration_s"), "run.duration_s")
    if run.get("error") is not None:
        c.text(run["error"], "run.error")
    for key in ("internal_errors", "detector_errors"):
        if key in run:
            _texts(c, run[key], f"run.{key}")
    if run.get("measured_steps") is not None:
        c.whole(run["measured_steps"], "run.measured_steps")
    if run.get("cadence") is not None:
        _check_cadence(c, c.obj(run["cadence"], "run.cadence"))
    for i, layer in enumerate(data["layers"]):
        c.text(layer.get("type"), f"layers[{i}].type")
        c.whole(layer.get("depth"), f"layers[{i}].depth")
        c.whole(layer.get("params"), f"layers[{i}].params")
    facts = c.obj(data.get("facts", {}), "facts")
    for key in ("compiled_roots", "forward_unseen"):
        if key in facts:
            _texts(c, facts[key], f"facts.{key}")
    for i, opt in enumerate(c.items(facts.get("optimizers", []), "facts.optimizers")):
        opt = c.obj(opt, f"facts.optimizers[{i}]")
        c.text(opt.get("type"), f"facts.optimizers[{i}].type")
        for j, group in enumerate(c.items(opt.get("groups"), f"facts.optimizers[{i}].groups")):
            _number(c, c.obj(group, f"facts.optimizers[{i}].groups[{j}]").get("lr"),
                    f"facts.optimizers[{i}].groups[{j}].lr")
    for i, site in enumerate(c.items(facts.get("sites", []), "facts.sites")):
        site = c.obj(site, f"facts.sites[{i}]")
        c.text(site.get("name"), f"facts.sites[{i}].name")
        c.text(site.get("kind"), f"facts.sites[{i}].kind")
    for i, f in enumerate(data["findings"]):
        for j, remedy in enumerate(f.get("remedies", [])):
            if remedy.get("verified") is not None:
                _check_verified(c, remedy["verified"], f"findings[{i}].remedies[{j}].verified")


def _check_verified(c: _Checker, v: dict[str, Any], where: str) -> None:
    c.text(v.get("status"), f"{where}.status")
    for key in ("loss_before", "loss_after", "improvement"):
        _number(c, v.get(key), f"{where}.{key}")
    if v.get("steps") is not None:
        c.whole(v["steps"], f"{where}.steps")
    if v.get("finding_gone") not in (None, True, False):
        c.fail(f"{where}.finding_gone", "must be true, false or null")
    for key in ("new_findings", "changes"):
        if v.get(key) is not None:
            _texts(c, v[key], f"{where}.{key}")
    if v.get("note") is not None:
        c.text(v["note"], f"{where}.note")


def _check_finding(c: _Checker, f: dict[str, Any], where: str) -> None:
    c.one_of(f.get("kind"), KINDS, f"{where}.kind")
    c.one_of(f.get("severity"), SEVERITIES, f"{where}.severity")
    c.whole(f.get("first_step"), f"{where}.first_step")
    if "last_step" in f:
        c.whole(f["last_step"], f"{where}.last_step")
    for j, layer in enumerate(c.items(f.get("layers"), f"{where}.layers")):
        c.text(layer, f"{where}.layers[{j}]")
    c.text(f.get("summary"), f"{where}.summary")
    c.obj(f.get("evidence"), f"{where}.evidence")
    for j, cause in enumerate(c.items(f.get("causes", []), f"{where}.causes")):
        cause = c.obj(cause, f"{where}.causes[{j}]")
        for key in ("id", "text"):
            c.text(cause.get(key), f"{where}.causes[{j}].{key}")
    for j, remedy in enumerate(c.items(f.get("remedies", []), f"{where}.remedies")):
        remedy = c.obj(remedy, f"{where}.remedies[{j}]")
        for key in ("id", "text", "code"):
            c.text(remedy.get(key), f"{where}.remedies[{j}].{key}")
        for key in ("verified", "params"):
            if remedy.get(key) is not None:
                c.obj(remedy[key], f"{where}.remedies[{j}].{key}")


def _check_cadence(c: _Checker, cadence: dict[str, Any]) -> None:
    """``run.cadence``: what was measured how often, and gradwatch's measured share."""
    for key in ("every", "density"):
        c.whole(cadence.get(key), f"run.cadence.{key}")
    if "site_turns" in cadence:
        c.whole(cadence["site_turns"], "run.cadence.site_turns")
    changes = c.items(cadence.get("detail_every"), "run.cadence.detail_every")
    if not changes:
        c.fail("run.cadence.detail_every", "must not be empty")
    for i, change in enumerate(changes):
        change = c.obj(change, f"run.cadence.detail_every[{i}]")
        for key in ("from_step", "every"):
            c.whole(change.get(key), f"run.cadence.detail_every[{i}].{key}")
    for key in ("overhead_budget", "overhead"):
        _number(c, cadence.get(key), f"run.cadence.{key}")
    cost = c.obj(cadence.get("cost_ms", {}), "run.cadence.cost_ms")
    for key in ("plain_step", "detail_step", "user_step"):
        _number(c, cost.get(key), f"run.cadence.cost_ms.{key}")
