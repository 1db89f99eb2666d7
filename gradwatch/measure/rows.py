"""A host copy of the step buffers, into :class:`History`: parameters into layers, and the
first non-finite values as exact events before any row can be downsampled."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..history import History
from .buffers import NORM_KEYS, StepBuffers, decode_norms, layer_norms

__all__ = ["record_rows"]


def record_rows(history: History, buffers: StepBuffers, steps: np.ndarray,
                arrays: dict[str, np.ndarray], slot_layer: Sequence[int],
                slot_names: Sequence[str], is_detail: Callable[[int], bool]) -> None:
    """Append the rows of ``steps`` (``arrays``, one column per parameter slot) to History."""
    n_l = len(history.layers)
    owners = np.asarray(slot_layer[: arrays["grad"].shape[1]], dtype=np.int64)
    nan_grad = np.isnan(arrays["grad"])
    bad = {k: decode_norms(arrays, k) for k in NORM_KEYS}
    bad_g, bad_w = bad["grad"], bad["weight"]
    nonfinite = np.zeros((len(steps), n_l))
    np.add.at(nonfinite.T, owners, (bad_g | bad_w).T.astype(float))
    _note_nonfinite(history, steps, bad_g, bad_w, nan_grad, arrays, slot_names)
    n = len(steps)
    history.record_steps(steps, arrays["loss"], np.array(buffers.loss_seen[:n]),
                         layer_norms(arrays["grad"], owners, n_l), nonfinite,
                         np.array(buffers.optimizer[:n], dtype=float),
                         np.array(buffers.lr[:n], dtype=float))
    detail = np.array([is_detail(int(s)) for s in steps])
    if detail.any():
        d = np.nonzero(detail)[0]
        history.record_detail(steps[d], {
            "weight_norm": layer_norms(arrays["weight"][d], owners, n_l),
            "update_norm": layer_norms(arrays["update"][d], owners, n_l),
            "grad_norm_applied": layer_norms(arrays["grad_applied"][d], owners, n_l),
            "act_rms": arrays["act"][d],
            "model_io": arrays["io"][d],
        })


def _note_nonfinite(history: History, steps: np.ndarray, bad_g: np.ndarray, bad_w: np.ndarray,
                    nan_grad: np.ndarray, arrays: dict[str, np.ndarray],
                    names: Sequence[str]) -> None:
    ev = history.events
    if ev.first_nonfinite_grad is None and bad_g.any():
        r = int(np.nonzero(bad_g.any(axis=1))[0][0])
        ev.first_nonfinite_grad = int(steps[r])
        cols = np.nonzero(bad_g[r])[0]
        ev.nonfinite_grad_params = [names[c] for c in cols]
        ev.nonfinite_grad_kind = "nan" if nan_grad[r, cols].any() else "inf"
    if ev.first_nonfinite_weight is None and bad_w.any():
        r = int(np.nonzero(bad_w.any(axis=1))[0][0])
        ev.first_nonfinite_weight = int(steps[r])
        ev.nonfinite_weight_params = [names[c] for c in np.nonzero(bad_w[r])[0]]
    bad_a = np.isinf(arrays["act"])
    if ev.first_nonfinite_act is None and bad_a.any():
        r = int(np.nonzero(bad_a.any(axis=1))[0][0])
        ev.first_nonfinite_act = int(steps[r])
        ev.nonfinite_act_layers = [history.layers[c].name for c in np.nonzero(bad_a[r])[0]]
