"""Dense excerpts of the per-step rows around outliers, kept exactly whatever the stride.

A long run's per-step series is downsampled (every other row dropped each time it fills),
so a loss spike of one step in a 100k-step run survives in it with a chance of 1 in 64, and
the window of 50 steps before it is gone. Here every per-step row is looked at once, on the
host, as the flush hands it over: a row whose loss sits far above the losses before it (or
is non-finite), or whose gradient norm jumps far above its recent median, is an *outlier*,
and the ``BEFORE`` rows before it and the ``AFTER`` rows after it are kept as they are. The
judge merges them into the series (:meth:`gradwatch.history.History.with_excerpts`), so the
spike detectors see every step around every spike, as in a short run.

The limits here are looser than the judge's (4 window standard deviations and a quarter of
the mean above it, 5x the largest loss, 10x the median gradient): they only decide what is
kept; the judge's thresholds decide what is a spike. Windows are per optimizer, so that a
GAN's two losses are not compared with each other.
"""

from __future__ import annotations

import collections

import numpy as np

__all__ = ["AFTER", "BEFORE", "Excerpts"]

WINDOW = 50  # rows before a step its loss and gradient norm are compared with
BEFORE, AFTER = 64, 64  # rows kept around an outlier (more than the judge's 50-row window)
MAX_ROWS = 16384  # rows kept over the whole run; later outliers are counted, not kept ...
MAX_BYTES = 16 << 20  # ... and fewer for wide rows (a model with thousands of layers)
LOSS_SIGMA = 4.0  # a loss this many window standard deviations above the window mean ...
LOSS_RISE = 0.25  # ... and this fraction of the mean above it
LOSS_FACTOR = 5.0  # or this many times the largest loss before it
GRAD_FACTOR = 10.0  # a total gradient norm this many times the window's median


class Excerpts:
    """The rows kept around outliers (see the module's docstring); bounded by ``MAX_ROWS``."""

    def __init__(self) -> None:
        # The last batches offered (at least BEFORE rows), and which of their rows are kept.
        self._recent: collections.deque[tuple[np.ndarray, dict[str, np.ndarray],
                                              np.ndarray]] = collections.deque()
        self._recent_rows = 0
        self._after = 0  # rows still to keep after the last outlier
        self.kept: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self.kept_rows = 0
        self.outliers = 0
        self.dropped = 0  # outliers seen once MAX_ROWS rows were kept
        self._loss: dict[float, np.ndarray] = {}  # per optimizer: the last finite losses
        self._top: dict[float, float] = {}  # per optimizer: the largest finite loss so far
        self._grad: dict[float, np.ndarray] = {}  # per optimizer: the last gradient norms

    def offer(self, steps: np.ndarray, blocks: dict[str, np.ndarray]) -> None:
        """Per-step rows in step order (the blocks of ``History.steps``: ``loss`` with
        non-finite losses as +inf, ``grad_norm`` per layer, ``optimizer``, ...)."""
        if len(steps) == 0:
            return
        hit = np.nonzero(self._outliers(blocks))[0]
        keep = np.zeros(len(steps), dtype=bool)
        carry = min(self._after, len(steps))
        keep[:carry] = True
        self._after -= carry
        width = sum(v.shape[1] if v.ndim > 1 else 1 for v in blocks.values())
        room = hit if self.kept_rows < min(MAX_ROWS, MAX_BYTES // (8 * width)) else hit[:0]
        self.outliers += len(hit)
        self.dropped += len(hit) - len(room)
        for i in room.tolist():
            keep[max(0, i - BEFORE): i + AFTER + 1] = True
            self._after = max(self._after, i + AFTER + 1 - len(steps))
        if room.size and room[0] < BEFORE:  # its rows before, in earlier batches
            self._keep_recent(BEFORE - int(room[0]))
        if keep.any():
            self._add(steps[keep], {k: v[keep] for k, v in blocks.items()})
        self._remember(steps, blocks, keep)

    def _add(self, steps: np.ndarray, blocks: dict[str, np.ndarray]) -> None:
        self.kept.append((steps.copy(), {k: v.copy() for k, v in blocks.items()}))
        self.kept_rows += len(steps)

    def _remember(self, steps: np.ndarray, blocks: dict[str, np.ndarray],
                  kept: np.ndarray) -> None:
        """The last BEFORE rows offered (and whether each is kept already): the rows
        before an outlier that comes in a later batch."""
        self._recent.append((steps, blocks, kept.copy()))
        self._recent_rows += len(steps)
        while self._recent and self._recent_rows - len(self._recent[0][0]) >= BEFORE:
            self._recent_rows -= len(self._recent.popleft()[0])

    def _keep_recent(self, n: int) -> None:
        """Keep those of the last ``n`` remembered rows that are not kept yet."""
        for steps, blocks, kept in reversed(self._recent):
            if n <= 0:
                break
            take = np.zeros(len(steps), dtype=bool)
            take[max(0, len(steps) - n):] = True
            n -= len(steps)
            take &= ~kept
            if take.any():
                self._add(steps[take], {k: v[take] for k, v in blocks.items()})
                kept |= take

    def _outliers(self, blocks: dict[str, np.ndarray]) -> np.ndarray:
        loss = blocks["loss"][:, 0]
        owner = blocks["optimizer"][:, 0]
        g = blocks["grad_norm"]
        with np.errstate(invalid="ignore"):
            total = np.sqrt(np.nansum(g ** 2, axis=1)) if g.shape[1] else np.full(len(loss),
                                                                                   np.nan)
        if g.shape[1]:
            total[np.all(np.isnan(g), axis=1)] = np.nan
        hit = np.isinf(loss)  # a non-finite loss: its steps before are worth keeping
        for k in np.unique(owner).tolist():
            rows = np.nonzero(owner == k)[0]
            hit[rows] |= self._loss_outliers(k, loss[rows]) | self._grad_outliers(k, total[rows])
        return hit

    def _loss_outliers(self, k: float, loss: np.ndarray) -> np.ndarray:
        out = np.zeros(len(loss), dtype=bool)
        finite = np.nonzero(np.isfinite(loss))[0]
        before = self._loss.get(k, np.array([]))
        values = np.concatenate([before, loss[finite]])
        start = len(before)
        idx = np.arange(max(WINDOW, start), len(values))
        if idx.size:
            csum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
            csq = np.concatenate([[0.0], np.cumsum(np.square(values, dtype=np.float64))])
            mean = (csum[idx] - csum[idx - WINDOW]) / WINDOW
            std = np.sqrt(np.maximum((csq[idx] - csq[idx - WINDOW]) / WINDOW - mean ** 2, 0))
            top = np.maximum(np.maximum.accumulate(values)[idx - 1], self._top.get(k, -np.inf))
            x = values[idx]
            hit = ((x - mean > LOSS_SIGMA * std) & (x - mean > LOSS_RISE * np.abs(mean))) | \
                ((top > 0) & (x >= LOSS_FACTOR * top))
            out[finite[idx[hit] - start]] = True
        if values.size:
            self._top[k] = max(self._top.get(k, -np.inf), float(values.max()))
        self._loss[k] = values[-WINDOW:]
        return out

    def _grad_outliers(self, k: float, total: np.ndarray) -> np.ndarray:
        out = np.zeros(len(total), dtype=bool)
        ok = np.nonzero(np.isfinite(total) & (total > 0))[0]
        before = self._grad.get(k, np.array([]))
        values = np.concatenate([before, total[ok]])
        start = len(before)
        idx = np.arange(max(WINDOW, start), len(values))
        if idx.size:
            windows = np.lib.stride_tricks.sliding_window_view(values[:-1], WINDOW)
            median = np.median(windows[idx - WINDOW], axis=1)
            hit = values[idx] > GRAD_FACTOR * median
            out[ok[idx[hit] - start]] = True
        self._grad[k] = values[-WINDOW:]
        return out

    def rows(self, widths: dict[str, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Every kept row, in step order, its blocks padded with NaN to ``widths``."""
        if not self.kept:
            return np.array([], dtype=np.int64), {k: np.empty((0, w)) for k, w in
                                                  widths.items()}
        steps = np.concatenate([s for s, _ in self.kept])
        blocks = {}
        for name, width in widths.items():
            parts = []
            for s, b in self.kept:
                part = np.full((len(s), width), np.nan)
                v = b[name][:, :width]
                part[:, : v.shape[1]] = v
                parts.append(part)
            blocks[name] = np.concatenate(parts)
        order = np.argsort(steps, kind="stable")
        return steps[order], {k: v[order] for k, v in blocks.items()}

    def nbytes(self) -> int:
        """Host memory of the kept rows and of the recent rows remembered for the next
        outlier (bounded: ``MAX_ROWS`` kept rows, ``BEFORE`` recent ones, the windows)."""
        def size(steps: np.ndarray, blocks: dict[str, np.ndarray]) -> int:
            return steps.nbytes + sum(v.nbytes for v in blocks.values())
        windows = sum(v.nbytes for d in (self._loss, self._grad) for v in d.values())
        return (sum(size(s, b) for s, b in self.kept) + windows
                + sum(size(s, b) + k.nbytes for s, b, k in self._recent))
