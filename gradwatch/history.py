"""The one mutable store of measurements: bounded, downsampled series plus exact events.

Memory stays bounded whatever the run's length: each :class:`Series` holds at most
``capacity`` rows; when it is full, every other row is dropped and only every
``stride``-th new row is kept, so the kept rows always span the whole run at an even
spacing. Things that must be exact (the first non-finite value, the best loss) are kept
as events, outside the series, before any row is dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np

from .excerpts import Excerpts

__all__ = ["PROFILE_POINTS", "SITE_STATS", "Events", "History", "LayerInfo", "Series", "SiteInfo",
           "sampled_timesteps"]

DEFAULT_CAPACITY = 2048

SITE_STATS = ("fraction", "persistent", "pre_mean", "pre_std", "pre_rms", "dead_pre_max")
"""Blocks of the ``sites`` series, one column per activation site (``activations.py``):
ReLU sites: fraction of units dead for the whole batch, fraction dead on
``dying_persist_measurements`` consecutive measurements, ..., the dead units' mean largest
pre-activation; saturating sites: fraction of outputs saturated, fraction of units
saturated for the whole batch, ..., NaN; both: pre-activation mean, std and RMS."""


PROFILE_POINTS = 16
"""Timesteps whose input-gradient norm is kept per module and step (first and last included)."""


def sampled_timesteps(length: int, points: int = PROFILE_POINTS) -> np.ndarray:
    """The timesteps kept for a sequence of ``length``: all of them if it is short, else
    ``points`` evenly spaced ones (integer rounding, half up), the first and last included."""
    if length <= points:
        return np.arange(length)
    i = np.arange(points)
    return (i * (length - 1) + (points - 1) // 2) // (points - 1)


class Series:
    """Rows of named column blocks on one step axis, downsampled to a fixed capacity.

    Storage grows geometrically, in rows up to ``capacity`` and in columns as layers are
    discovered, so that a short run or a model with thousands of layers costs what it
    holds, and adding one layer at a time costs amortised constant time.
    """

    _INITIAL_ROWS = 64

    def __init__(self, widths: dict[str, int], capacity: int = DEFAULT_CAPACITY,
                 whole: bool = False) -> None:
        if capacity < 4 or capacity % 2:
            raise ValueError(f"capacity must be an even number >= 4, got {capacity}")
        self.capacity = capacity
        self.stride = 1
        self._arrivals = 0  # rows offered so far
        self._n = 0
        rows = capacity if whole else min(self._INITIAL_ROWS, capacity)
        self._steps = np.zeros(rows, dtype=np.int64)
        self._width = dict(widths)  # columns in use per block
        self._blocks = {k: np.full((rows, w), np.nan) for k, w in widths.items()}
        self._last: tuple[int, dict[str, np.ndarray]] | None = None

    def widen(self, name: str, width: int) -> None:
        """Grow a block to ``width`` columns (new layers discovered mid-run), padding NaN."""
        if width <= self._width[name]:
            return
        old = self._blocks[name]
        if width > old.shape[1]:
            grown = np.full((old.shape[0], max(width, 2 * old.shape[1])), np.nan)
            grown[:, : old.shape[1]] = old
            self._blocks[name] = grown
        self._width[name] = width

    def _grow_rows(self) -> None:
        rows = min(2 * len(self._steps), self.capacity)
        steps = np.zeros(rows, dtype=np.int64)
        steps[: self._n] = self._steps[: self._n]
        self._steps = steps
        for k, old in self._blocks.items():
            grown = np.full((rows, old.shape[1]), np.nan)
            grown[: self._n] = old[: self._n]
            self._blocks[k] = grown

    def append(self, steps: np.ndarray, blocks: dict[str, np.ndarray]) -> None:
        """Offer rows (one per step, in step order); keep those the current stride allows."""
        for i, step in enumerate(steps):
            row = {k: v[i] for k, v in blocks.items()}
            self._last = (int(step), row)
            index = self._arrivals  # position of this row among all rows ever offered
            self._arrivals += 1
            if index % self.stride:
                continue
            if self._n == self.capacity:
                self._decimate()
                # The capacity is even, so rows kept so far are multiples of the new stride.
                if index % self.stride:
                    continue
            elif self._n == len(self._steps):
                self._grow_rows()
            self._steps[self._n] = step
            for k, v in row.items():
                block = self._blocks[k]
                block[self._n, : v.shape[0]] = v
            self._n += 1

    def _decimate(self) -> None:
        half = self.capacity // 2
        self._steps[:half] = self._steps[: self.capacity : 2]
        for block in self._blocks.values():
            block[:half] = block[: self.capacity : 2]
            block[half:] = np.nan
        self._n = half
        self.stride *= 2

    @property
    def steps(self) -> np.ndarray:
        """Steps of the kept rows, plus the run's latest row so the series reaches the end."""
        steps = self._steps[: self._n]
        if self._last is not None and (self._n == 0 or steps[-1] != self._last[0]):
            return np.append(steps, self._last[0])
        return steps.copy()

    def block(self, name: str) -> np.ndarray:
        """Values of one block, rows aligned with :attr:`steps`."""
        width = self._width[name]
        values = self._blocks[name][: self._n, :width]
        if self._last is not None and (self._n == 0 or self._steps[self._n - 1] != self._last[0]):
            last = np.full((1, width), np.nan)
            v = self._last[1][name][:width]
            last[0, : v.shape[0]] = v
            return np.concatenate([values, last], axis=0)
        return values.copy()

    def __len__(self) -> int:
        return len(self.steps)

    def nbytes(self) -> int:
        """Memory held by the series (grows with the rows and columns it holds)."""
        return self._steps.nbytes + sum(b.nbytes for b in self._blocks.values())


@dataclasses.dataclass
class LayerInfo:
    """A module that owns parameters, as seen by the monitor."""

    name: str
    type: str
    params: int
    root: int
    order: int | None = None  # position in forward execution order, input side first
    param_names: list[str] = dataclasses.field(default_factory=list)
    fan_in: int | None = None
    fan_out: int | None = None
    init_weight_std: float | None = None
    activation: str | None = None  # what the autograd graph applies to this layer's output
    init_scale: dict[str, Any] | None = None  # init std against Kaiming/Xavier


@dataclasses.dataclass
class SiteInfo:
    """An activation call site: an activation module, or a functional call in a forward.

    Functional calls are named by the module in whose forward they run and a 1-based call
    count of that function there (``Net.relu@2`` is the second ``relu`` of ``Net.forward``);
    activation modules by their path (``layers.1``, ``act@2`` for the second call of a
    module used several times).
    """

    name: str
    kind: str  # "relu" | "relu6" | "sigmoid" | "tanh" | "hardtanh" | "softsign" | "hardsigmoid"
    module: str  # path of the module whose forward makes the call ("" = the root)
    root: int
    functional: bool
    order: int  # first-call order, input side first
    units: int  # features (Linear outputs) or channels (conv outputs)
    unit_dim: int
    layer: int | None = None  # the layer whose output feeds it (last layer run before)
    bounds: tuple[float, float] | None = None  # output range of a saturating activation
    bias_init: float | None = None  # mean bias of the feeding layer when first seen
    final: dict[str, Any] = dataclasses.field(default_factory=dict)  # state at the end


@dataclasses.dataclass
class Events:
    """Exact facts kept outside the downsampled series."""

    first_nonfinite_loss: int | None = None
    first_nonfinite_grad: int | None = None
    nonfinite_grad_params: list[str] = dataclasses.field(default_factory=list)
    nonfinite_grad_kind: str | None = None  # "nan" | "inf"
    first_nonfinite_weight: int | None = None
    nonfinite_weight_params: list[str] = dataclasses.field(default_factory=list)
    first_nonfinite_act: int | None = None
    nonfinite_act_layers: list[str] = dataclasses.field(default_factory=list)
    #: Where the first non-finite loss was born, found by replaying its forward
    #: (``measure/extensions/nanorigin.py``): ``status`` ("producer", "input", "weights",
    #: "buffers", "output_finite", "skipped", "failed", "not_checked"), ``step`` and, for a
    #: producer, ``site``, ``module``, ``module_type``, ``op``, ``kind`` ("nan" | "inf"),
    #: ``inputs`` ("finite" | "inf"), ``input_min``/``input_max``, ``layer_index``.
    nonfinite_origin: dict[str, Any] | None = None
    nonfinite_loss_steps: int = 0
    best_loss: float = math.inf
    best_loss_step: int | None = None
    first_loss: float | None = None
    first_loss_step: int | None = None
    last_loss: float | None = None
    last_loss_step: int | None = None
    finite_loss_steps: int = 0


def detail_capacity(capacity: int) -> int:
    """Rows of the series measured on detail steps: a quarter of the per-step ``capacity``.

    Detail steps come every ``detail_every`` (16) steps or, once the overhead budget
    stretches the cadence, only ~32 per doubling of the run: a series growing with its rows
    would still double its storage between 10k and 100k steps. So these series are
    allocated whole when created (``Series(whole=True)``): a quarter of the capacity, 512
    rows, far more than the detectors' persistence fractions need, and memory is flat from
    the first steps on (their columns still grow as layers and sites are discovered).
    """
    return max(4, capacity // 4 + capacity // 4 % 2)


class History:
    """Per-step and per-sampled-step series for every layer, and the run's exact events."""

    STEP_BLOCKS = ("loss", "grad_norm", "nonfinite", "optimizer", "lr")
    DETAIL_BLOCKS = ("weight_norm", "update_norm", "grad_norm_applied", "act_rms",
                     "model_io")
    MODEL_IO = ("output_spread", "input_rms", "input_mean", "input_std", "output_rms")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.layers: list[LayerInfo] = []
        self.roots: list[str] = []
        self.steps = Series({"loss": 1, "grad_norm": 0, "nonfinite": 0, "optimizer": 1,
                             "lr": 1}, capacity)
        self.detail = Series({"weight_norm": 0, "update_norm": 0, "grad_norm_applied": 0,
                              "act_rms": 0, "model_io": len(self.MODEL_IO)},
                             detail_capacity(capacity), whole=True)
        self.events = Events()
        self.excerpts = Excerpts()  # exact rows around loss and gradient outliers
        self.initial: dict[str, np.ndarray] = {}  # first sampled weight/act row, kept exactly
        self.facts: dict[str, Any] = {}  # structural facts (activations, norms, skips, lr)
        self.total_steps = 0
        self.sites: list[SiteInfo] = []  # activation call sites, in first-call order
        self.extra: dict[str, Series] = {}  # series of forward-side extensions, by name

    def series(self, name: str, widths: dict[str, int]) -> Series:
        """An extension's own series (created on first use), widened to ``widths``."""
        series = self.extra.get(name)
        if series is None:
            series = self.extra[name] = Series(widths, self.detail.capacity, whole=True)
        for block, width in widths.items():
            series.widen(block, width)
        return series

    def add_layer(self, layer: LayerInfo) -> int:
        self.layers.append(layer)
        width = len(self.layers)
        for name in ("grad_norm", "nonfinite"):
            self.steps.widen(name, width)
        for name in ("weight_norm", "update_norm", "grad_norm_applied", "act_rms"):
            self.detail.widen(name, width)
        return width - 1

    def record_steps(self, steps: np.ndarray, loss: np.ndarray, loss_seen: np.ndarray,
                     grad_norm: np.ndarray, nonfinite: np.ndarray,
                     optimizer: np.ndarray | None = None,
                     lr: np.ndarray | None = None) -> None:
        """Append per-step rows (loss and per-layer gradient norms) and update events.

        ``loss_seen`` tells a step without a recorded loss (NaN in ``loss``) from a step
        whose loss really was NaN.
        """
        if len(steps) == 0:
            return
        ev = self.events
        for step, value, seen in zip(steps.tolist(), loss.tolist(), loss_seen.tolist(),
                                     strict=True):
            if not seen:
                continue
            if not math.isfinite(value):
                ev.nonfinite_loss_steps += 1
                if ev.first_nonfinite_loss is None:
                    ev.first_nonfinite_loss = step
            else:
                if ev.first_loss is None:
                    ev.first_loss, ev.first_loss_step = value, step
                if value < ev.best_loss:
                    ev.best_loss, ev.best_loss_step = value, step
                ev.last_loss, ev.last_loss_step = value, step
                ev.finite_loss_steps += 1
        self.total_steps = max(self.total_steps, int(steps[-1]) + 1)
        if optimizer is None:
            optimizer = np.full(len(steps), -1.0)
        if lr is None:
            lr = np.full(len(steps), np.nan)
        # Host encoding, as for norms: NaN = no loss recorded, +inf = the loss was NaN/Inf.
        seen = loss_seen > 0
        loss = np.where(seen & ~np.isfinite(loss), np.inf, np.where(seen, loss, np.nan))
        blocks = {"loss": loss.reshape(-1, 1), "grad_norm": grad_norm, "nonfinite": nonfinite,
                  "optimizer": optimizer.reshape(-1, 1), "lr": lr.reshape(-1, 1)}
        self.steps.append(steps, blocks)
        self.excerpts.offer(steps, blocks)

    def with_excerpts(self) -> History:
        """This history with the exact rows kept around outliers merged into its per-step
        series (a view for the spike detectors: a downsampled long run then has every step
        around every spike); itself when nothing was kept."""
        if not self.excerpts.kept_rows or self.steps.stride == 1:
            return self  # nothing dropped from the series: it has every row already
        widths = dict(self.steps._width)
        extra_steps, extra = self.excerpts.rows(widths)
        steps = self.steps.steps
        new = ~np.isin(extra_steps, steps)
        all_steps = np.concatenate([steps, extra_steps[new]])
        order = np.argsort(all_steps, kind="stable")
        all_steps = all_steps[order]
        merged = Series(widths, max(4, len(all_steps) + len(all_steps) % 2))
        merged.append(all_steps, {k: np.concatenate([self.steps.block(k), extra[k][new]])[order]
                                  for k in widths})
        view = copy.copy(self)
        view.steps = merged
        return view

    def record_detail(self, steps: np.ndarray, blocks: dict[str, np.ndarray]) -> None:
        """Append rows measured on sampled steps (weights, updates, activations, model I/O)."""
        if len(steps) == 0:
            return
        if not self.initial:
            self.initial = {k: v[0].copy() for k, v in blocks.items()}
            self.initial["step"] = np.array([steps[0]])
        self.detail.append(steps, blocks)

    def layer_order(self) -> list[int]:
        """Layer indices in forward order (input side first); unseen layers last."""
        return sorted(range(len(self.layers)),
                      key=lambda i: (self.layers[i].order is None,
                                     self.layers[i].order or 0, i))

    def nbytes(self) -> int:
        return self.steps.nbytes() + self.detail.nbytes() + \
            sum(s.nbytes() for s in self.extra.values())

