"""Eval-mode misuse: a watched model run without gradients while Dropout or BatchNorm train.

``torch.no_grad()`` and ``torch.inference_mode()`` only stop gradient tracking; only
``model.eval()`` switches Dropout off and makes BatchNorm use (and stop updating) its
running statistics. Forgetting it makes evaluation outputs random (Dropout), dependent on
the batch (BatchNorm), and mixes evaluation data into the running statistics the model
later uses.

Per forward of a watched model with gradients disabled, this extension checks the
``training`` flag of the model's mode-dependent layers (found once per model and cached):
Dropout of every kind (``nn.Dropout*``, ``AlphaDropout``, ``FeatureAlphaDropout``, the
dropout of ``MultiheadAttention`` and of multi-layer RNNs, DropPath/StochasticDepth),
normalisation layers with running statistics (every ``_BatchNorm`` incl. ``SyncBatchNorm``,
``InstanceNorm`` with ``track_running_stats=True``) and ``RReLU``. Forwards with gradients
cost one ``torch.is_grad_enabled()`` check.

Measured once per model, on the first such forward (all host work, once per run):

* how much the output differs from eval mode: the forward is run again on a copy of the
  same inputs with every module in eval mode, BatchNorm reading its running statistics as
  they were before the user's forward, and the RNG replayed from the same state. Nothing
  of the user's model is written: the re-run reads clones of the buffers (swapped in and
  back, the user's own tensors untouched), every module's ``training`` flag and the RNG
  state (CPU and accelerators) are restored, and the monitor is suspended so that no hook
  measures it;
* how much the BatchNorm running statistics changed in that forward and in the whole
  first pass of consecutive no-grad forwards (until the model's next forward with
  gradients), against a clone taken before it.

A model without known mode-dependent layers, still in training mode, is checked once the
same way under ``watch`` (``F.dropout(x, training=self.training)`` or custom
``self.training`` logic would show as a difference); with no difference it is not a
finding. Facts go to ``history.facts["eval_mode"][str(root index)]``.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from ..extension import Extension
from .rerun import (
    Pending,
    compare_outputs,
    lazy,
    norm_buffers,
    prepare,
    relative_change,
    rerun_in_eval,
)

__all__ = ["EvalModeCheck", "mode_dependent"]

_DROP_NAMES = ("droppath", "stochasticdepth", "dropblock")
_MAX_NAMES = 256  # layer names kept per model in the facts


def mode_dependent(module: nn.Module) -> tuple[str, float | None] | None:
    """``(kind, rate)`` if the module behaves differently in training mode, else None.

    ``kind`` is ``"dropout"``, ``"batchnorm"`` (any normalisation with running statistics)
    or ``"other"``; ``rate`` is the drop probability or the running-statistics momentum.
    """
    if isinstance(module, _DropoutNd):
        return ("dropout", float(module.p)) if module.p > 0 else None
    if isinstance(module, _NormBase):
        # Without running statistics a norm layer uses batch statistics in both modes.
        if module.track_running_stats and module.running_mean is not None:
            return "batchnorm", module.momentum
        return None
    if isinstance(module, nn.MultiheadAttention):
        return ("dropout", float(module.dropout)) if module.dropout > 0 else None
    if isinstance(module, nn.RNNBase):
        p = float(module.dropout)
        return ("dropout", p) if p > 0 and module.num_layers > 1 else None
    if isinstance(module, nn.RReLU):
        return "other", None
    name = type(module).__name__.lower()
    if any(n in name for n in _DROP_NAMES):  # timm DropPath, torchvision StochasticDepth
        p = getattr(module, "p", getattr(module, "drop_prob", None))
        if isinstance(p, (int, float)):
            return ("dropout", float(p)) if p > 0 else None
        return "dropout", None
    return None


class _RootState:
    """One watched model: its mode-dependent layers and what was seen of it."""

    def __init__(self, index: int, root: nn.Module, name: str, discover: bool) -> None:
        self.index = index
        self.key = id(root)
        # Weak: the root itself may be one of them (an nn.LSTM with dropout), and models
        # are never kept alive by gradwatch.
        self._entries: list[tuple[str, weakref.ref[nn.Module], str, float | None]] = []
        for path, mod in root.named_modules():
            found = mode_dependent(mod)
            if found is not None:
                self._entries.append((path or type(root).__name__, weakref.ref(mod),
                                      found[0], found[1]))
        self.generic = not self._entries  # no known layer: one behavioural check instead
        self.generic_done = False
        self.measured = False
        self.pending: Pending | None = None
        self.in_pass = 0  # forwards of the current pass (no-grad forwards in a row)
        self.pass_snapshot: list[torch.Tensor] | None = None  # BN buffers before pass 1
        self.forward_snapshot: list[torch.Tensor] | None = None  # BN buffers before forward 1
        self.last_step = -1
        self.seen: set[str] = set()
        self.facts: dict[str, Any] = {
            "root": name, "type": type(root).__name__, "generic": self.generic,
            "forwards": 0, "inference_mode_forwards": 0, "first_step": None,
            "last_step": None, "steps_with_forwards": 0, "passes": 0, "longest_pass": 0,
            "dropout_layers": [], "batchnorm_layers": [], "other_layers": [],
            "layers_in_training": [], "measured": None, "batchnorm": None,
            "keyword_arguments_seen": not discover,
        }

    @property
    def entries(self) -> list[tuple[str, nn.Module, str, float | None]]:
        """The mode-dependent layers still alive: (path, module, kind, rate)."""
        return [(path, mod, kind, rate) for path, ref, kind, rate in self._entries
                if (mod := ref()) is not None]

    @property
    def norms(self) -> list[nn.Module]:
        """Normalisation layers with running statistics, in model order."""
        return [mod for _, mod, kind, _ in self.entries if kind == "batchnorm"]

    def layer_facts(self) -> None:
        """Names, types and rates of the layers that were in training mode."""
        by_kind: dict[str, list[dict[str, Any]]] = {"dropout": [], "batchnorm": [], "other": []}
        for path, mod, kind, rate in self.entries:
            if path not in self.seen:
                continue
            row: dict[str, Any] = {"name": path, "type": type(mod).__name__}
            if kind == "dropout":
                row["p"] = rate
            elif kind == "batchnorm":
                row["momentum"] = rate
            by_kind[kind].append(row)
        for kind, rows in by_kind.items():
            self.facts[f"{kind}_layers"] = rows[:_MAX_NAMES]
        self.facts["layers_in_training"] = [path for path, *_ in self.entries
                                            if path in self.seen][:_MAX_NAMES]


class EvalModeCheck(Extension):
    """Finds forwards without gradients of a model whose mode-dependent layers train."""

    def __init__(self) -> None:
        self._states: dict[int, _RootState] = {}
        self._open: set[int] = set()  # roots inside a pass of no-grad train-mode forwards

    # ------------------------------------------------------------------ events
    def on_root_forward_pre(self, module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled():
            # The hot path: a training forward. It ends this model's no-grad pass, if any.
            if self._open and id(module) in self._open:
                self._end_pass(self._states[id(module)])
            return
        m = self.monitor
        st = self._states.get(id(module))
        if st is None:
            index = m.watched.root_of_module(module)
            if index is None:
                return
            name = m.history.roots[index] if index < len(m.history.roots) else str(index)
            st = self._states[id(module)] = _RootState(index, module, name, m.discover)
        if st.generic:
            if st.generic_done or not module.training or m.discover:
                return
            training: list[str] = []
        else:
            training = [path for path, mod, _, _ in st.entries if mod.training]
            if not training:
                return
        self._count(st, training)
        if st.norms and st.in_pass == 1 and st.pass_snapshot is None and \
                not st.facts["passes"] and not lazy(st.norms):
            st.pass_snapshot = norm_buffers(st.norms, clone=True)
        if not st.measured and st.pending is None:
            st.pending = prepare(module, args, kwargs, self.monitor.discover)
            if st.norms and not lazy(st.norms):
                # BN statistics as this forward finds them: the ones eval mode would use.
                st.forward_snapshot = st.pass_snapshot if st.in_pass == 1 and \
                    st.pass_snapshot is not None else norm_buffers(st.norms, clone=True)

    def on_root_forward(self, module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any], output: Any) -> None:
        if torch.is_grad_enabled():
            return
        st = self._states.get(id(module))
        if st is None or st.pending is None:
            return
        pending, st.pending = st.pending, None
        if output is None:  # the forward raised: measure the next one
            st.forward_snapshot = None
            return
        st.measured = True
        m = self.monitor
        measured: dict[str, Any] = {"step": m.step, "rerun": "ok"}
        if st.norms and st.forward_snapshot is not None:
            st.facts["batchnorm"] = {
                "momentum": st.norms[0].momentum,
                "first_forward_change": relative_change(st.forward_snapshot, st.norms),
            }
        if pending.opaque is not None:
            measured["rerun"] = "skipped"
            measured["reason"] = (f"the inputs hold a {pending.opaque}, which the forward may "
                                  f"change in place (a cache?); the model was not run again")
        else:
            try:
                out_eval = rerun_in_eval(module, st.norms, st.forward_snapshot, pending,
                                         self.monitor)
            except Exception as exc:  # the user's model failed on the re-run: record it
                measured["rerun"] = "failed"
                measured["reason"] = f"{type(exc).__name__}: {exc}"[:300]
            else:
                measured.update(compare_outputs(output, out_eval))
        st.facts["measured"] = measured
        st.forward_snapshot = None
        if st.generic:
            rel = measured.get("output_rel_diff")
            differs = isinstance(rel, float) and (
                not math.isfinite(rel) or rel > m.thresholds.eval_mode_output_change)
            if not differs:
                # No training-mode behaviour shows: nothing more to watch in this model.
                # The state stays, so that the model is never checked again.
                st.generic_done = True
                self._open.discard(st.key)
                per_root = m.history.facts.get("eval_mode", {})
                per_root.pop(str(st.index), None)
                if not per_root:
                    m.history.facts.pop("eval_mode", None)

    def on_root_gone(self, root: int) -> None:
        """Close the model's pass if it is open (the run ended during an evaluation) and
        drop what was kept about it."""
        for key, st in list(self._states.items()):
            if st.index != root:
                continue
            if key in self._open:
                self._end_pass(st)
            st._entries, st.pending = [], None
            st.pass_snapshot = st.forward_snapshot = None
            del self._states[key]

    def finish(self) -> None:
        self._states, self._open = {}, set()

    # ------------------------------------------------------------------ bookkeeping
    def _count(self, st: _RootState, training: list[str]) -> None:
        m = self.monitor
        f = st.facts
        if not f["forwards"]:
            m.history.facts.setdefault("eval_mode", {})[str(st.index)] = f
            f["first_step"] = m.step
        f["forwards"] += 1
        if torch.is_inference_mode_enabled():
            f["inference_mode_forwards"] += 1
        f["last_step"] = m.step
        if m.step != st.last_step:
            st.last_step = m.step
            f["steps_with_forwards"] += 1
        new = [p for p in training if p not in st.seen]
        if new:
            st.seen.update(new)
            st.layer_facts()
        st.in_pass += 1
        self._open.add(st.key)

    def _end_pass(self, st: _RootState) -> None:
        """A pass of no-grad forwards ended: its length; after the first, the BN change."""
        self._open.discard(st.key)
        f = st.facts
        f["passes"] += 1
        f["longest_pass"] = max(f["longest_pass"], st.in_pass)
        if st.pass_snapshot is not None and st.norms:
            bn = f["batchnorm"] or {"momentum": st.norms[0].momentum}
            bn["first_pass_forwards"] = st.in_pass
            bn["first_pass_change"] = relative_change(st.pass_snapshot, st.norms)
            before = st.pass_snapshot[2] if len(st.pass_snapshot) > 2 else None
            tracked = st.norms[0].num_batches_tracked
            if before is not None and tracked is not None and before.numel() == 1:
                # One host read, once per run.
                bn["num_batches_tracked_before"] = int(before)
                bn["num_batches_tracked_after"] = int(tracked)
            f["batchnorm"] = bn
            st.pass_snapshot = None
        st.in_pass = 0


