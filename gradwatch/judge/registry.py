"""The detectors, and running them: pure functions ``Context -> list[Finding]``, one file per
finding kind.

To add one: write ``judge/detectors/<kind>.py`` with ``KIND``, ``CAUSES`` (the ids of its
own causes), ``detect(ctx)`` and, if it judges the whole run rather than each model,
``WHOLE_RUN = True``; add the module to ``DETECTORS`` below; put its limits in
``Thresholds``; add ``tests/test_<kind>.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from ..findings import Finding
from ..history import History
from ..thresholds import Thresholds
from . import causes, links, repeats
from .context import Context
from .detectors import (
    dying,
    eval_mode,
    exploding,
    loss_divergence,
    loss_plateau,
    loss_spike,
    nonfinite,
    saturated,
    vanishing,
)

__all__ = ["CAUSE_IDS", "DETECTORS", "REGISTRY", "WHOLE_RUN_KINDS", "Context", "run_detectors"]

DETECTORS = (nonfinite, exploding, vanishing, dying, saturated, loss_divergence, loss_spike,
             loss_plateau, eval_mode)
"""One entry per detector module, in the order they run."""

Detect = Callable[[Context], list[Finding]]
REGISTRY: list[tuple[str, Detect]] = [(m.KIND, m.detect) for m in DETECTORS]
"""(kind, detect) of every detector."""
WHOLE_RUN_KINDS = frozenset(m.KIND for m in DETECTORS if getattr(m, "WHOLE_RUN", False))
"""Kinds judged on the whole run even when it trained several models."""
CAUSE_IDS = tuple(dict.fromkeys((*causes.CAUSE_IDS, *(c for m in DETECTORS for c in m.CAUSES),
                                 *links.CAUSES)))
"""Every cause id a detector can name (the shared ones and each detector's own)."""
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def run_detectors(history: History, thresholds: Thresholds) -> tuple[list[Finding], list[str]]:
    """Every registered detector on one history; a detector that fails is reported, not fatal."""
    whole = Context(history, thresholds)
    roots = whole.active_roots()
    # Several models in one run: judge each on its own steps and layers. Non-finite
    # values are a fact of the process (one NaN ends the run), so that one stays global.
    views = [whole] if len(roots) <= 1 else [Context(history, thresholds, r) for r in roots]
    errors: list[str] = []
    whole_findings = _judge(whole, [(k, d) for k, d in REGISTRY if k in WHOLE_RUN_KINDS], errors)
    findings = list(whole_findings)
    for ctx in views:
        # Linked per model: one model's explosion does not explain another's dead units.
        mine = repeats.merge_repeated(
            _judge(ctx, [(k, d) for k, d in REGISTRY if k not in WHOLE_RUN_KINDS], errors))
        links.link([*whole_findings, *mine], thresholds)
        findings.extend(mine)
    # Roots before their consequences, each severity in the order things happened.
    findings.sort(key=lambda f: (_SEVERITY_ORDER[f.severity], "root" in f.evidence,
                                 f.first_step))
    return findings, errors


def _judge(ctx: Context, detectors: list[tuple[str, Detect]],
           errors: list[str]) -> list[Finding]:
    """The given detectors on one view; a detector that fails is named in ``errors``."""
    found: list[Finding] = []
    for kind, detect in detectors:
        try:
            # NaN marks unmeasured entries; all-NaN reductions are expected, not news.
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                found.extend(detect(ctx))
        except Exception as exc:  # one broken detector must not hide the rest
            errors.append(f"detector {kind} failed: {type(exc).__name__}: {exc}")
    return found
