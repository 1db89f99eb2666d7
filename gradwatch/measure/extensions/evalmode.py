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
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.parameter import is_lazy

from ..extension import Extension

__all__ = ["EvalModeCheck", "mode_dependent"]

_DROP_NAMES = ("droppath", "stochasticdepth", "dropblock")
_MAX_NAMES = 256  # layer names kept per model in the facts
_MAX_INPUT_ITEMS = 4096  # larger input containers are not copied for a re-run
_MAX_BUFFER_BYTES = 1 << 28  # buffers beyond BatchNorm's are cloned for the re-run up to this


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


class _Opaque(Exception):
    """An input the forward may change in place (a cache object): no re-run on it."""


def _copy_inputs(obj: Any, budget: list[int]) -> Any:
    """A copy of plain-data inputs (tensors cloned); raises :class:`_Opaque` on anything else."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _Opaque("very large input container")
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype,
                                       torch.device, slice, range, type(Ellipsis))):
        return obj
    if isinstance(obj, torch.Size):
        return obj
    if type(obj) is tuple or type(obj) is list:
        return type(obj)(_copy_inputs(o, budget) for o in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_copy_inputs(o, budget) for o in obj))
    if type(obj) is dict or type(obj) is OrderedDict:
        return type(obj)((k, _copy_inputs(v, budget)) for k, v in obj.items())
    raise _Opaque(type(obj).__name__)


def _float_tensors(obj: Any, out: list[torch.Tensor], depth: int = 0) -> list[torch.Tensor]:
    """Floating-point tensors of a forward's output, in a fixed order."""
    if depth > 8:
        return out
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _float_tensors(o, out, depth + 1)
    elif isinstance(obj, dict):
        for o in obj.values():
            _float_tensors(o, out, depth + 1)
    return out


def _rng_devices(tensors: list[torch.Tensor]) -> list[torch.device]:
    return sorted({t.device for t in tensors if t.device.type not in ("cpu", "meta")},
                  key=str)


def _get_rng(devices: list[torch.device]) -> list[tuple[torch.device | None, torch.Tensor]]:
    """The CPU generator's state and that of each accelerator the model's tensors use."""
    states: list[tuple[torch.device | None, torch.Tensor]] = [(None, torch.get_rng_state())]
    for d in devices:
        mod = torch.get_device_module(d.type)
        states.append((d, mod.get_rng_state(d.index if d.index is not None else 0)))
    return states


def _set_rng(states: list[tuple[torch.device | None, torch.Tensor]]) -> None:
    for d, state in states:
        if d is None:
            torch.set_rng_state(state)
        else:
            torch.get_device_module(d.type).set_rng_state(
                state, d.index if d.index is not None else 0)


class _Pending:
    """What the first measured forward needs from before it ran."""

    def __init__(self, args: Any, kwargs: Any, opaque: str | None,
                 rng: list[tuple[torch.device | None, torch.Tensor]] | None) -> None:
        self.args, self.kwargs, self.opaque, self.rng = args, kwargs, opaque, rng


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
        self.pending: _Pending | None = None
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
                not st.facts["passes"] and not _lazy(st.norms):
            st.pass_snapshot = _norm_buffers(st.norms, clone=True)
        if not st.measured and st.pending is None:
            st.pending = self._prepare(module, args, kwargs)
            if st.norms and not _lazy(st.norms):
                # BN statistics as this forward finds them: the ones eval mode would use.
                st.forward_snapshot = st.pass_snapshot if st.in_pass == 1 and \
                    st.pass_snapshot is not None else _norm_buffers(st.norms, clone=True)

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
                "first_forward_change": _relative_change(st.forward_snapshot, st.norms),
            }
        if pending.opaque is not None:
            measured["rerun"] = "skipped"
            measured["reason"] = (f"the inputs hold a {pending.opaque}, which the forward may "
                                  f"change in place (a cache?); the model was not run again")
        else:
            try:
                out_eval = self._rerun(module, st, pending)
            except Exception as exc:  # the user's model failed on the re-run: record it
                measured["rerun"] = "failed"
                measured["reason"] = f"{type(exc).__name__}: {exc}"[:300]
            else:
                measured.update(_compare(output, out_eval))
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
            bn["first_pass_change"] = _relative_change(st.pass_snapshot, st.norms)
            before = st.pass_snapshot[2] if len(st.pass_snapshot) > 2 else None
            tracked = st.norms[0].num_batches_tracked
            if before is not None and tracked is not None and before.numel() == 1:
                # One host read, once per run.
                bn["num_batches_tracked_before"] = int(before)
                bn["num_batches_tracked_after"] = int(tracked)
            f["batchnorm"] = bn
            st.pass_snapshot = None
        st.in_pass = 0

    # ------------------------------------------------------------------ measuring
    def _prepare(self, module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> _Pending:
        """Before the first measured forward: copies of its inputs and the RNG state."""
        try:
            budget = [_MAX_INPUT_ITEMS]
            args_copy = _copy_inputs(tuple(args), budget)
            kwargs_copy = _copy_inputs(dict(kwargs), budget)
        except _Opaque as exc:
            return _Pending(None, None, str(exc), None)
        if self.monitor.discover and not args_copy:
            return _Pending(None, None, "keyword-only call (gradwatch run cannot see "
                                        "keyword arguments)", None)
        tensors = _float_tensors(args_copy, [])
        tensors += [p for p in module.parameters(recurse=True)][:1]
        devices = _rng_devices(tensors)
        try:
            rng = _get_rng(devices)
        except Exception:  # an accelerator without a readable generator state
            return _Pending(None, None, f"generator state of {devices} that cannot be saved",
                            None)
        return _Pending(args_copy, kwargs_copy, None, rng)

    def _rerun(self, module: nn.Module, st: _RootState, pending: _Pending) -> Any:
        """The same forward in eval mode, on copies; the user's model is left untouched."""
        m = self.monitor
        modules = list(module.modules())
        flags = [mod.training for mod in modules]
        pre_bn: dict[int, torch.Tensor] = {}
        if st.forward_snapshot is not None:
            for tensor, original in zip(st.forward_snapshot,
                                        _norm_buffers(st.norms, clone=False), strict=True):
                pre_bn[id(original)] = tensor
        swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
        budget = _MAX_BUFFER_BYTES
        rng_now = _get_rng([d for d, _ in (pending.rng or []) if d is not None])
        try:
            for mod in modules:
                for key, buf in mod._buffers.items():
                    if buf is None:
                        continue
                    replacement = pre_bn.get(id(buf))
                    if replacement is None:
                        size = buf.numel() * buf.element_size()
                        if size > budget:
                            continue
                        budget -= size
                        replacement = buf.detach().clone()
                    swapped.append((mod, key, buf))
                    mod._buffers[key] = replacement
            for mod in modules:
                mod.training = False
            if pending.rng is not None:
                _set_rng(pending.rng)  # replay: random ops see the same numbers
            m.suspended += 1
            try:
                with torch.no_grad():
                    return module(*pending.args, **pending.kwargs)
            finally:
                m.suspended -= 1
        finally:
            _set_rng(rng_now)
            for mod, flag in zip(modules, flags, strict=True):
                mod.training = flag
            for mod, key, buf in swapped:
                mod._buffers[key] = buf


def _lazy(norms: list[nn.Module]) -> bool:
    """Lazy norm layers not yet initialised (their first forward sizes the buffers)."""
    return any(is_lazy(b) for mod in norms for b in mod._buffers.values() if b is not None)


def _norm_buffers(norms: list[nn.Module], clone: bool) -> list[torch.Tensor]:
    """running_mean, running_var, num_batches_tracked of every norm layer, in order."""
    out: list[torch.Tensor] = []
    for mod in norms:
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            buf = mod._buffers.get(key)
            if buf is not None:
                out.append(buf.detach().clone() if clone else buf)
    return out


def _relative_change(before: list[torch.Tensor], norms: list[nn.Module]) -> float:
    """||running stats now - before|| / ||before|| over every norm layer's mean and var."""
    now = _norm_buffers(norms, clone=False)
    diff = []
    ref = []
    for b, n in zip(before, now, strict=False):
        if not b.is_floating_point() or b.shape != n.shape:
            continue
        diff.append(torch.linalg.vector_norm((n.detach() - b).double()).to("cpu"))
        ref.append(torch.linalg.vector_norm(b.double()).to("cpu"))
    if not diff:
        return math.nan
    d, r = float(torch.stack(diff).norm()), float(torch.stack(ref).norm())
    return d / r if r > 0 else (0.0 if d == 0 else math.inf)


def _compare(train_out: Any, eval_out: Any) -> dict[str, Any]:
    """Relative L2 and max abs difference of the outputs; argmax agreement for logits."""
    a, b = _float_tensors(train_out, []), _float_tensors(eval_out, [])
    if not a:
        return {"rerun": "incomparable",
                "reason": "the output holds no floating-point tensor (in a tuple, list or dict)"}
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return {"rerun": "incomparable",
                "reason": "the output in eval mode has another structure or shape"}
    device = a[0].device
    diff, ref, peak = [], [], []
    for x, y in zip(a, b, strict=True):
        # float32 (float64 stays float64): a relative difference needs no more, and a
        # float64 copy of a language model's logits would be a large allocation.
        wide = torch.promote_types(x.dtype, torch.float32)
        d = (x.detach().to(wide) - y.detach().to(wide)).abs()
        diff.append(torch.linalg.vector_norm(d).double().to(device))
        ref.append(torch.linalg.vector_norm(y.detach().to(wide)).double().to(device))
        peak.append(d.max().double().to(device) if d.numel() else
                    torch.zeros((), dtype=torch.float64, device=device))
    parts = [torch.stack(diff).square().sum(), torch.stack(ref).square().sum(),
             torch.stack(peak).max()]
    first_a, first_b = a[0], b[0]
    logits = first_a.dim() == 2 and first_a.shape[1] > 1 and not first_a.is_complex()
    if logits:
        parts.append((first_a.argmax(1) == first_b.argmax(1)).double().mean().to(device))
    # One host read, once per model and run.
    values = torch.stack(parts).cpu().tolist()
    d2, r2, peak_v = values[0], values[1], values[2]
    out: dict[str, Any] = {
        "output_rel_diff": math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf),
        "output_max_abs_diff": peak_v,
        "output_norm_eval": math.sqrt(r2),
    }
    if logits:
        out["argmax_agreement"] = values[3]
    return out
