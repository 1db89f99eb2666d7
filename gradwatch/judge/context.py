"""Read-only views of a History that every detector shares (pure numpy, no torch)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import cached_property
from typing import Any

import numpy as np

from ..findings import Finding
from ..history import SITE_STATS, History, LayerInfo, SiteInfo
from ..thresholds import Thresholds

__all__ = ["Context", "Group", "fmt"]


def fmt(x: float | None, digits: int = 2) -> str:
    """Format a measurement for a sentence: 1.5e-09, 0.25, 9.76, inf."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits + 1}g}"
    return f"{x:.{digits - 1}e}"


@dataclasses.dataclass
class Group:
    """The depth-ordered, weight-bearing layers of one model (a root)."""

    root: int
    name: str
    layers: list[int]  # history column indices, input side first


class Context:
    """What detectors read: the history, the thresholds and derived arrays, cached.

    With ``root`` set, the context is a view of one model of a run that trained several
    (one after the other, or alternating like a GAN): only the steps that model's
    optimizer made, and only its layers.
    """

    def __init__(self, history: History, thresholds: Thresholds, root: int | None = None) -> None:
        self.h = history
        self.t = thresholds
        self.root = root

    def dense(self) -> Context:
        """This view with the exact rows kept around loss and gradient outliers merged into
        the per-step series (``History.with_excerpts``): what the spike detectors judge, so
        that a long, downsampled run keeps every step around every spike."""
        h = self.h.with_excerpts()
        return self if h is self.h else Context(h, self.t, self.root)

    def active_roots(self) -> list[int]:
        """Models that received gradients in this run."""
        g = self.h.steps.block("grad_norm")
        roots = {self.h.layers[i].root for i in range(g.shape[1]) if np.isfinite(g[:, i]).any()}
        return sorted(roots)

    @property
    def subject(self) -> str:
        """Prefix for summaries of a per-model view (``model_relu: ``), else empty."""
        if self.root is None:
            return ""
        return f"{self.h.roots[self.root] if self.root >= 0 else 'bare tensors'}: "

    @cached_property
    def _rows(self) -> np.ndarray:
        """Rows of the per-step series that belong to this view."""
        n = len(self.h.steps.steps)
        if self.root is None:
            return np.ones(n, dtype=bool)
        owner = self.h.steps.block("optimizer")[:, 0]
        owners = self.facts.get("optimizer_roots", [])
        mine = np.array([k for k, roots in enumerate(owners) if self.root in roots])
        rows = np.isin(owner, mine) if mine.size else np.zeros(n, dtype=bool)
        cols = [i for i, layer in enumerate(self.h.layers) if layer.root == self.root]
        g = self.h.steps.block("grad_norm")[:, cols]
        # Steps without optimizer (hand-made updates): the model's gradients say whose.
        rows |= (owner < 0) & np.isfinite(g).any(axis=1)
        return rows

    @cached_property
    def _detail_rows(self) -> np.ndarray:
        d = self.h.detail.steps
        if self.root is None:
            return np.ones(len(d), dtype=bool)
        return np.isin(d, self.steps)

    # --- raw series -----------------------------------------------------------------
    @cached_property
    def steps(self) -> np.ndarray:
        return self.h.steps.steps[self._rows]

    @cached_property
    def loss(self) -> np.ndarray:
        return self.h.steps.block("loss")[self._rows, 0]

    @cached_property
    def grad(self) -> np.ndarray:
        return self.h.steps.block("grad_norm")[self._rows]

    @cached_property
    def nonfinite(self) -> np.ndarray:
        """Per step and layer: number of parameters whose gradient or weight was NaN/Inf."""
        return self.h.steps.block("nonfinite")[self._rows]

    @cached_property
    def detail_steps(self) -> np.ndarray:
        return self.h.detail.steps[self._detail_rows]

    def detail(self, name: str) -> np.ndarray:
        return self.h.detail.block(name)[self._detail_rows]

    @cached_property
    def best_loss(self) -> float:
        _, loss = self.finite_loss()
        return float(loss.min()) if loss.size else math.inf

    @cached_property
    def first_nonfinite_loss(self) -> int | None:
        """First step of this view whose loss was NaN/Inf."""
        bad = np.isinf(self.loss)
        return int(self.steps[np.argmax(bad)]) if bad.any() else None

    @cached_property
    def first_loss(self) -> float | None:
        _, loss = self.finite_loss()
        return float(loss[0]) if loss.size else None

    def io(self, name: str) -> np.ndarray:
        return self.detail("model_io")[:, History.MODEL_IO.index(name)]

    @cached_property
    def update_ratio(self) -> np.ndarray:
        """Update norm / weight norm per layer on sampled steps (NaN where unmeasured)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.detail("update_norm") / self.detail("weight_norm")

    @cached_property
    def step_update_ratio(self) -> np.ndarray:
        """Largest update / weight norm over the layers, per sampled step (NaN: none)."""
        r = self.update_ratio
        if r.size == 0:
            return np.full(len(self.detail_steps), np.nan)
        finite = np.where(np.isfinite(r), r, np.nan)
        out = np.full(r.shape[0], np.nan)
        seen = np.isfinite(finite).any(axis=1)
        out[seen] = np.nanmax(finite[seen], axis=1)
        return out

    def detail_window(self, since: int | None = None, until: int | None = None) -> np.ndarray:
        """Mask of the sampled steps in ``[since, until]`` (either end open when None)."""
        d = self.detail_steps
        mask = np.ones(len(d), dtype=bool)
        if since is not None:
            mask &= d >= since
        if until is not None:
            mask &= d <= until
        return mask

    # --- structure ------------------------------------------------------------------
    def layer(self, i: int) -> LayerInfo:
        return self.h.layers[i]

    def name(self, i: int) -> str:
        """Display name: prefixed by the model's name when the run trained several."""
        info = self.h.layers[i]
        if info.root >= 0 and self._several_models:
            prefix = self.h.roots[info.root]
            return f"{prefix}.{info.name}" if info.name else prefix
        return info.name or (self.h.roots[info.root] if info.root >= 0 else "tensor")

    @cached_property
    def _several_models(self) -> bool:
        """Whether layers of more than one model were watched (names get a model prefix)."""
        return len({layer.root for layer in self.h.layers if layer.root >= 0}) > 1

    def label(self, i: int) -> str:
        """Name for a sentence: ``layer 0`` for an nn.Sequential index, else the name."""
        name = self.name(i)
        return f"layer {name}" if name.replace(".", "").isdigit() else name

    def in_forward_order(self, names: set[str] | list[str]) -> list[str]:
        """Layer names sorted input side first (not alphabetically: layers.6 < layers.20)."""
        rank = {self.name(i): k for k, i in enumerate(self.h.layer_order())}
        return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n))

    @cached_property
    def groups(self) -> list[Group]:
        """Per model: layers that carry a weight matrix/kernel, in forward order."""
        out: dict[int, Group] = {}
        for i in self.h.layer_order():
            info = self.h.layers[i]
            if info.fan_in is None or (self.root is not None and info.root != self.root):
                continue  # biases, norm scales: no depth signal of their own
            name = self.h.roots[info.root] if info.root >= 0 else "tensors"
            out.setdefault(info.root, Group(info.root, name, [])).layers.append(i)
        return list(out.values())

    # --- activation sites -------------------------------------------------------------
    @cached_property
    def sites(self) -> list[int]:
        """Activation call sites of this view's model(s), in first-call order."""
        return [i for i, site in enumerate(self.h.sites)
                if self.root is None or site.root == self.root]

    def per_site(self, judge: Callable[[Context, int], Finding | None]) -> list[Finding]:
        """The findings ``judge`` returns for each activation site of this view."""
        return [f for f in (judge(self, i) for i in self.sites) if f is not None]

    def site(self, i: int) -> SiteInfo:
        return self.h.sites[i]

    def site_name(self, i: int) -> str:
        """Display name of a site: prefixed by the model's name when the run trained several."""
        info = self.h.sites[i]
        roots = {layer.root for layer in self.h.layers if layer.root >= 0}
        if len(roots) > 1 and 0 <= info.root < len(self.h.roots):
            return f"{self.h.roots[info.root]}.{info.name}"
        return info.name

    def site_label(self, i: int) -> str:
        """Site name for a sentence: ``layer 3 (ReLU)`` for an nn.Sequential index."""
        name = self.site_name(i)
        base = name.split("@")[0]
        if base.replace(".", "").isdigit():
            return f"layer {name} ({self.h.sites[i].kind})"
        return name

    @cached_property
    def site_steps(self) -> np.ndarray:
        """Detail steps on which the activation sites were measured (this view's only)."""
        return self._site_rows[0]

    def site_stat(self, name: str) -> np.ndarray:
        """One ``SITE_STATS`` block: rows = :attr:`site_steps`, columns = every site."""
        return self._site_rows[1][name]

    @cached_property
    def _site_rows(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        series = self.h.extra.get("sites")
        n = len(self.h.sites)
        if series is None or not len(series):
            return np.zeros(0, dtype=np.int64), {k: np.full((0, n), np.nan) for k in SITE_STATS}
        steps = series.steps
        mask = np.ones(len(steps), dtype=bool) if self.root is None else \
            np.isin(steps, self.steps)
        blocks = {}
        for k in SITE_STATS:
            b = series.block(k)[mask]
            if b.shape[1] < n:
                b = np.concatenate([b, np.full((b.shape[0], n - b.shape[1]), np.nan)], axis=1)
            blocks[k] = b
        return steps[mask], blocks

    @property
    def facts(self) -> dict[str, Any]:
        return self.h.facts

    def act_after(self, i: int) -> str:
        return self.h.layers[i].activation or "unknown"

    def init_scale(self, i: int) -> dict[str, Any] | None:
        return self.h.layers[i].init_scale

    def structure(self, root: int) -> dict[str, Any]:
        """Graph and module facts of one model (norm ops, branch merges, norm modules)."""
        graph = self.facts.get("graph", {}).get(str(root), {})
        module = self.facts.get("module", {}).get(str(root), {})
        return {**graph, **module}

    @cached_property
    def learning_rates(self) -> list[float]:
        """Distinct learning rates the optimizers stepped with in this view."""
        return self.learning_rates_between()

    @cached_property
    def lr(self) -> np.ndarray:
        """Learning rate of each step in this view (NaN where none was recorded)."""
        return self.h.steps.block("lr")[self._rows, 0]

    def learning_rates_between(self, since: int | None = None,
                               until: int | None = None) -> list[float]:
        """Distinct learning rates used on the steps in ``[since, until]``.

        Read from the per-step record (schedulers and hand-set rates included); falls back
        to the optimizers' settings when the run recorded none.
        """
        lr = self.lr
        mask = np.isfinite(lr)
        if since is not None:
            mask &= self.steps >= since
        if until is not None:
            mask &= self.steps <= until
        if mask.any():
            return sorted({float(v) for v in lr[mask]})
        return sorted({g["lr"] for o in self.facts.get("optimizers", []) for g in o["groups"]
                       if g.get("lr") is not None})

    # --- derived ----------------------------------------------------------------------
    @cached_property
    def total_grad(self) -> np.ndarray:
        """Whole-model raw gradient norm per step (NaN where nothing was measured)."""
        g = self.grad
        with np.errstate(invalid="ignore"):
            total = np.sqrt(np.nansum(g ** 2, axis=1))
        total[np.all(np.isnan(g), axis=1)] = np.nan
        return total

    def early_level(self, norms: np.ndarray) -> float:
        """The gradient norm's level at the start of the run: the median over the first
        ``baseline_steps`` finite values, or over those before a jump of more than
        ``exploding_growth``-fold inside that window (a rate typed 1000x too high blows up
        on the first update, and a baseline that includes the blow-up would hide it)."""
        head = norms[: self.t.baseline_steps]
        for j in range(1, len(head)):
            before = float(np.median(head[:j]))
            if head[j] > self.t.exploding_growth * before:
                return before
        return float(np.median(head))

    def learns_after(self, step: int) -> tuple[float, float] | None:
        """(loss then, loss at the end) when the model kept learning after ``step``: the
        median of the last losses is at least ``still_learning_fall`` below both the median
        just after ``step`` and the best loss before it (a loss coming back down from a
        blow-up is recovering, not learning); else None. Windows of ``baseline_steps`` or a
        tenth of the steps after ``step``, whichever is longer."""
        steps, loss = self.finite_loss()
        after = loss[steps >= step]
        w = max(self.t.baseline_steps, after.size // 10)
        if after.size < 2 * w:
            return None
        then, end = float(np.median(after[:w])), float(np.median(after[-w:]))
        before = loss[steps < step]
        ref = min(then, float(before.min())) if before.size else then
        if not end <= ref * (1 - self.t.still_learning_fall):
            return None
        return then, end

    def finite_loss(self) -> tuple[np.ndarray, np.ndarray]:
        mask = np.isfinite(self.loss)
        return self.steps[mask], self.loss[mask]

    def depth_ratio(self, group: Group) -> tuple[np.ndarray, np.ndarray]:
        """Steps and first-layer / last-layer gradient norm where both were measured."""
        first, last = group.layers[0], group.layers[-1]
        g = self.grad
        ok = np.isfinite(g[:, first]) & np.isfinite(g[:, last]) & (g[:, last] > 0)
        if ok.any():
            ok &= g[:, last] >= self.t.active_grad_fraction * np.max(g[ok, last])
        with np.errstate(divide="ignore"):
            return self.steps[ok], g[ok, first] / g[ok, last]

    def log_profile(self, group: Group, steps: np.ndarray | None = None) -> np.ndarray:
        """Median log10 gradient norm of each layer of the group (over ``steps`` if given)."""
        g = self.grad[:, group.layers]
        if steps is not None:
            g = g[np.isin(self.steps, steps)]
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(np.isfinite(g) & (g > 0), np.log10(np.where(g > 0, g, 1)),
                            np.where(g == 0, -30.0, np.nan))
        out = np.full(len(group.layers), np.nan)
        for j in range(len(group.layers)):
            col = logs[:, j][~np.isnan(logs[:, j])]
            if col.size:
                out[j] = float(np.median(col))
        return out
