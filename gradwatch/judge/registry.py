"""Detectors: pure functions ``Context -> list[Finding]``, one file per finding kind.

To add one: write ``judge/detectors/<kind>.py`` with ``KIND`` and ``detect(ctx)``, add it to
``REGISTRY`` below, and add ``tests/test_<kind>.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from ..findings import Finding
from ..history import History
from ..thresholds import Thresholds
from .context import Context
from .detectors import (
    dying,
    eval_mode,
    exploding,
    loss_divergence,
    loss_plateau,
    nonfinite,
    saturated,
    vanishing,
)

__all__ = ["REGISTRY", "Context", "run_detectors"]

REGISTRY: dict[str, Callable[[Context], list[Finding]]] = {
    m.KIND: m.detect for m in (nonfinite, exploding, vanishing, dying, saturated,
                               loss_divergence, loss_plateau, eval_mode)
}

# Eval-mode facts are per model already, and cover models that are only evaluated.
GLOBAL_KINDS = {nonfinite.KIND, eval_mode.KIND}
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def run_detectors(history: History, thresholds: Thresholds) -> tuple[list[Finding], list[str]]:
    """Every registered detector on one history; a detector that fails is reported, not fatal."""
    whole = Context(history, thresholds)
    roots = whole.active_roots()
    # Several models in one run: judge each on its own steps and layers. Non-finite
    # values are a fact of the process (one NaN ends the run), so that one stays global.
    views = [whole] if len(roots) <= 1 else [Context(history, thresholds, r) for r in roots]
    findings: list[Finding] = []
    errors: list[str] = []
    jobs = [(kind, detect, ctx) for kind, detect in REGISTRY.items()
            for ctx in (views if kind not in GLOBAL_KINDS else [whole])]
    for kind, detect, ctx in jobs:
        try:
            # NaN marks unmeasured entries; all-NaN reductions are expected, not news.
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                findings.extend(detect(ctx))
        except Exception as exc:  # one broken detector must not hide the rest
            errors.append(f"detector {kind} failed: {type(exc).__name__}: {exc}")
    findings.sort(key=lambda f: (_SEVERITY_ORDER[f.severity], f.first_step))
    return findings, errors
