"""The remedies: one :class:`RemedyEntry` object per remedy, in one module per family.

Detectors name a remedy by id with the parameters they measured (``judge.advice.remedy``);
:func:`describe` fills in its text and code when the report is built, and :func:`apply`
changes a live model and optimizer with it. To add a remedy: one ``RemedyEntry`` in the
``ENTRIES`` of its family module (``init``, ``activations``, ``optimizer``, ``architecture``,
``modes``, ``recurrent``, ``data``, ``numerics``), and a test. Under Lightning or the Hugging
Face Trainer, :func:`describe` renders the code in the framework's terms (``frameworks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..findings import Finding, Remedy, set_applier
from . import activations, architecture, data, init, modes, numerics, optimizer, recurrent
from .base import SWAPS, Application, NotApplicable, RemedyEntry, check_optimizer
from .frameworks import render
from .init import following_activations

__all__ = ["CATALOGUE", "Application", "NotApplicable", "RemedyEntry", "apply", "describe",
           "describe_findings", "following_activations", "refuses", "remedy"]

CATALOGUE: dict[str, RemedyEntry] = {
    e.id: e for family in (init, activations, optimizer, architecture, modes, recurrent, data,
                           numerics)
    for e in family.ENTRIES}
"""Every remedy by id."""


def _entry(remedy_id: str) -> RemedyEntry:
    try:
        return CATALOGUE[remedy_id]
    except KeyError:
        raise KeyError(f"unknown remedy {remedy_id!r}; known: {', '.join(CATALOGUE)}") from None


def remedy(remedy_id: str, **params: Any) -> Remedy:
    """Remedy ``remedy_id`` with this run's measured parameters, its text and code filled."""
    return _entry(remedy_id).describe(**params)


def describe(r: Remedy, framework: Mapping[str, Any] | None = None) -> Remedy:
    """``r`` with its text and code filled from its parameters (a pair ``a+b`` proved by
    ``--verify`` keeps the text it was given), in the terms of ``framework`` (the run's
    ``facts["framework"]``: Lightning, the Hugging Face Trainer) where it trains the model."""
    if "+" in r.id and isinstance(r.params.get("parts"), list):
        return r
    filled = render(_entry(r.id).describe(**r.params), framework)
    filled.verified = r.verified
    return filled


def describe_findings(findings: list[Finding],
                      framework: Mapping[str, Any] | None = None) -> list[Finding]:
    """Every remedy of every finding described (for ``framework``, see :func:`describe`),
    in place; the findings are returned."""
    for f in findings:
        f.remedies = [describe(r, framework) for r in f.remedies]
    return findings


def refuses(remedy_id: str) -> str | None:
    """Why gradwatch can never apply ``remedy_id`` to a live model (None when it can try):
    such a remedy needs something only the user's code has, like the training data."""
    entry = CATALOGUE.get(remedy_id)
    return entry.needs if entry is not None else None


def apply(model: nn.Module, optimizer: torch.optim.Optimizer | None, remedy_id: str, /,
          **params: Any) -> Application:
    """Apply remedy ``remedy_id`` to a live model (and optimizer) in place, before
    training, with the run's measured ``params``; returns what changed.

    Raises KeyError for an unknown id, TypeError for arguments of the wrong type,
    ValueError when the remedy needs an optimizer and none is given, and
    :class:`NotApplicable` when the remedy cannot apply itself to this model.
    """
    if not isinstance(remedy_id, str):
        raise TypeError(f"remedy_id must be a string, got {type(remedy_id).__name__}")
    if "+" in remedy_id and isinstance(params.get("parts"), list):
        # A combination ``--verify`` proved together: each part in order.
        done: list[str] = []
        for part in params["parts"]:
            done += apply(model, optimizer, part["id"], **dict(part.get("params") or {})).changes
        return Application(remedy_id, done)
    entry = _entry(remedy_id)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None:
        check_optimizer(optimizer)
    if entry.needs is not None:
        raise NotApplicable(entry.needs)
    if entry.to_process is not None:
        raise NotApplicable(f"remedy {remedy_id!r} changes how the whole script computes, "
                            "from its start: `gradwatch run --verify` (or --fix) applies it to "
                            "a re-run; in code, write what its code shows")
    if entry.needs_optimizer and optimizer is None:
        raise ValueError(f"remedy {remedy_id!r} changes the optimizer: pass the optimizer "
                         "(apply(model, optimizer, ...))")
    changes: list[str] = []
    if entry.to_model is not None:
        entry.to_model(model, params, changes)
    if entry.to_optimizer is not None:
        if optimizer is not None:
            entry.to_optimizer(optimizer, model, params, changes)
        elif SWAPS.get(model):
            changes.append("create the optimizer after this call (or pass it): the new "
                           "modules' parameters are in no optimizer yet")
    return Application(remedy_id, changes)


# Remedy.apply (the report's remedies, also of a loaded report) applies through this module.
set_applier(lambda r, model, opt: apply(model, opt, r.id, **r.params))
