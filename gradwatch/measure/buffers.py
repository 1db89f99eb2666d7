"""Per-step statistics on the tensors' device: one preallocated row per step, and the single
host copy of all rows every ``sync_every`` steps.

On device a norm of -1 means "not measured", so that a measured NaN stays distinguishable
(:func:`decode_norms` turns that into the host's encoding). Host-side per-row facts (which
optimizer stepped, its learning rate, whether a loss was recorded) are plain Python numbers
kept beside the buffers: no device work for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..history import History

__all__ = ["NORM_KEYS", "UNMEASURED", "StepBuffers", "decode_norms", "layer_norms"]

NORM_KEYS = ("grad", "grad_applied", "weight", "update", "act")
UNMEASURED = -1.0  # norms are >= 0, so -1 marks "not measured" on device, NaN stays NaN


class StepBuffers:
    """The device rows of the steps since the last host copy, ``rows`` of them at most."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.buf: dict[str, torch.Tensor] = {}
        self.start = 0  # the step of row 0
        self.widths = (0, 0)  # (parameter slots, layers) the buffers are sized for
        self.extra: dict[str, tuple[int, ...]] = {}  # extension buffers: per-row shape
        self.loss_seen: list[bool] = []
        self.optimizer: list[int] = []  # which optimizer made the step (-1: none)
        self.lr: list[float] = []  # the learning rate it used

    def row(self, step: int, slots: int, layers: int, device: torch.device,
            flush: Callable[[], None]) -> int:
        """``step``'s row, the buffers first sized for ``slots`` parameters and ``layers``
        layers: when new ones appear mid-run, ``flush`` copies the committed rows out and
        the current row moves to the new buffers."""
        if not (self.buf and self.widths == (slots, layers)):
            carried = self.take_row(step) if self.buf else None
            if carried is not None:
                flush()
            self.allocate(slots, layers, step, device)
            if carried is not None:
                self.put_first_row(carried)
        return step - self.start

    def allocate(self, slots: int, layers: int, step: int, device: torch.device) -> None:
        """Fresh buffers for ``slots`` parameters and ``layers`` layers, from ``step`` on."""
        cap = self.rows
        shapes = {"loss": (cap,), "grad": (cap, slots), "grad_applied": (cap, slots),
                  "weight": (cap, slots), "update": (cap, slots), "act": (cap, layers),
                  "io": (cap, len(History.MODEL_IO))}
        shapes.update({k: (cap, *s) for k, s in self.extra.items()})
        self.buf = {k: torch.empty(s, dtype=torch.float64, device=device)
                    for k, s in shapes.items()}
        self.reset()
        self.widths, self.start = (slots, layers), step

    def reset(self) -> None:
        for k, v in self.buf.items():
            v.fill_(UNMEASURED if k in NORM_KEYS else math.nan)
        self.loss_seen = [False] * self.rows
        self.optimizer = [-1] * self.rows
        self.lr = [math.nan] * self.rows

    def take_row(self, step: int) -> tuple[dict[str, torch.Tensor], bool]:
        """A copy of ``step``'s row (new parameters mid-run: it moves to new buffers)."""
        r = step - self.start
        return {k: v[r].clone() for k, v in self.buf.items()}, self.loss_seen[r]

    def put_first_row(self, row: tuple[dict[str, torch.Tensor], bool]) -> None:
        """Write a row taken by :meth:`take_row` as row 0 (narrower rows are padded)."""
        values, seen = row
        for k, v in values.items():
            if v.dim() == 0 or k in self.extra:
                self.buf[k][0] = v
            else:
                self.buf[k][0, : v.shape[0]] = v
        self.loss_seen[0] = seen

    def add(self, key: str, shape: tuple[int, ...], device: torch.device) -> None:
        """An extension's per-step buffer: float64, NaN = not measured."""
        if key in self.extra:
            return
        self.extra[key] = tuple(shape)
        if self.buf:
            self.buf[key] = torch.full((self.rows, *shape), math.nan, dtype=torch.float64,
                                       device=device)

    def host_copy(self, step: int) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """The rows committed before ``step``, on the host: their steps and every buffer."""
        n = step - self.start
        if not self.buf or n <= 0:
            return None
        keys = list(self.buf)
        # The one host synchronisation: all statistics of n steps in a single copy.
        host = torch.cat([self.buf[k][:n].reshape(-1) for k in keys]).cpu().numpy()
        arrays: dict[str, np.ndarray] = {}
        offset = 0
        for k in keys:
            shape = (n, *tuple(self.buf[k].shape[1:]))
            size = int(np.prod(shape))
            arrays[k] = host[offset: offset + size].reshape(shape)
            offset += size
        return np.arange(self.start, self.start + n), arrays


def decode_norms(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    """Turn device encoding into host encoding, in place; return the non-finite mask.

    On device a norm buffer holds -1 where nothing was measured, so that a measured NaN
    (a NaN in the tensor) stays distinguishable. On the host NaN means "not measured" and
    +inf means "measured, non-finite" (NaN or Inf in the tensor), which plots and
    reductions handle without a separate mask.
    """
    a = arrays[key]
    bad = ~np.isfinite(a)
    a[bad] = np.inf
    a[a == UNMEASURED] = np.nan
    return bad


def layer_norms(values: np.ndarray, owners: np.ndarray, n_layers: int) -> np.ndarray:
    """Per-parameter norms -> per-layer norms (root of the sum of squares); NaN if unmeasured."""
    out = np.zeros((values.shape[0], n_layers))
    seen = np.zeros((values.shape[0], n_layers), dtype=bool)
    finite = ~np.isnan(values)
    np.add.at(out.T, owners, np.where(finite, values, 0.0).T ** 2)
    np.logical_or.at(seen.T, owners, finite.T)
    out = np.sqrt(out)
    out[~seen] = np.nan
    return out
