"""Finding, Cause and Remedy: what a detector concludes, in the JSON shape of DESIGN.md."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["KINDS", "SEVERITIES", "Cause", "Finding", "Remedy", "jsonable", "set_applier"]

KINDS = ("vanishing_gradient", "exploding_gradient", "dying_relu", "saturated_activation",
         "nonfinite", "loss_plateau", "loss_spike", "loss_divergence", "eval_mode")
"""The finding kinds of the report contract, exact strings."""

SEVERITIES = ("error", "warning", "info")
Severity = Literal["error", "warning", "info"]


_APPLIER: Callable[[Remedy, Any, Any], Any] | None = None


def set_applier(applier: Callable[[Remedy, Any, Any], Any]) -> None:
    """Install how :meth:`Remedy.apply` applies a remedy (``gradwatch.remedies`` does, when
    imported): findings are plain data and import nothing of gradwatch."""
    global _APPLIER
    _APPLIER = applier


def jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats for strict JSON.

    Non-finite floats become ``None`` (JSON ``null``): NaN and Infinity are not JSON, and
    evidence that needs to say "the value was infinite" says so in its own field.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


@dataclasses.dataclass
class Cause:
    """A cause that was checked on this model and holds, with the measurement behind it."""

    id: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text}


@dataclasses.dataclass
class Remedy:
    """A remedy that fits this finding, with code filled in from this run's measurements."""

    id: str
    text: str
    code: str
    verified: dict[str, Any] | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The measured parameters the detector passed (a threshold, a layer's path...): what
    :meth:`apply` applies."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "text": self.text, "code": self.code}
        if self.params:
            out["params"] = jsonable(self.params)
        if self.verified is not None:
            out["verified"] = jsonable(self.verified)
        return out

    def apply(self, model: Any, optimizer: Any = None) -> Any:
        """Apply this remedy to a live model (and optimizer) in place, with its measured
        parameters; returns a :class:`gradwatch.remedies.Application`."""
        if _APPLIER is None:
            raise RuntimeError("import gradwatch (or gradwatch.remedies) to apply a remedy")
        return _APPLIER(self, model, optimizer)


@dataclasses.dataclass
class Finding:
    """One diagnosed problem: kind, when, where, the evidence, why, and what to do."""

    kind: str
    severity: Severity
    first_step: int
    last_step: int
    layers: list[str]
    summary: str
    evidence: dict[str, Any]
    causes: list[Cause] = dataclasses.field(default_factory=list)
    remedies: list[Remedy] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; expected one of {KINDS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; expected one of {SEVERITIES}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "first_step": int(self.first_step),
            "last_step": int(self.last_step),
            "layers": list(self.layers),
            "summary": self.summary,
            "evidence": jsonable(self.evidence),
            "causes": [c.to_dict() for c in self.causes],
            "remedies": [r.to_dict() for r in self.remedies],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """Rebuild a finding from its JSON form (e.g. a saved report)."""
        return cls(
            kind=data["kind"], severity=data["severity"], first_step=data["first_step"],
            last_step=data.get("last_step", data["first_step"]), layers=list(data["layers"]),
            summary=data["summary"], evidence=dict(data["evidence"]),
            causes=[Cause(id=c["id"], text=c["text"]) for c in data.get("causes", [])],
            # Keys a later version may add to a remedy are ignored, not an error.
            remedies=[Remedy(id=r["id"], text=r["text"], code=r["code"],
                             verified=r.get("verified"), params=dict(r.get("params") or {}))
                      for r in data.get("remedies", [])],
        )
