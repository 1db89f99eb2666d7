"""What is measured at each event of a step, written into its row of the device buffers.

Gradient norms (raw after backward, applied before the optimizer's step), weight norms and
a fused copy of the weights before the update, the update's norm after it, the step's loss,
the model's input and output statistics, and each layer's output RMS. Nothing here reads a
value on the host: every number stays on the tensors' device until the monitor's flush.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import stats
from .buffers import StepBuffers
from .layers import Watched

__all__ = ["GradientMark", "StepMeasures", "first_tensor"]


class StepMeasures:
    """Writes one step's statistics into ``buffers``; keeps the weight snapshot between
    the start of an update and its end."""

    def __init__(self, buffers: StepBuffers, watched: Watched) -> None:
        self.buffers, self.watched = buffers, watched
        self._snapshot: stats.Sampled | None = None
        self._snapshot_idx: list[int] = []
        self.scale: torch.Tensor | None = None
        """The loss scaler's factor in the last backward (None without one)."""
        self._scalers: dict[int, bool] = {}  # data_ptr -> is a GradScaler's factor

    def read_scale(self, loss: torch.Tensor) -> None:
        """Note the loss scaler's factor in ``loss``'s graph, before backward() frees it.

        Under mixed precision ``GradScaler.scale(loss).backward()`` multiplies the loss,
        and so every gradient backward() makes, by the scaler's factor (2**16 at first,
        halved on each overflow, doubled every 2000 clean steps): the user's loss and raw
        gradient norms are the scaled ones divided by it. The factor is the scaler's
        one-element float32 tensor in the last product of the graph, a power of two >= 2
        (its value read once per scaler); it is divided out on the device, without a sync.
        """
        self.scale = None
        fn = getattr(loss, "grad_fn", None)
        if fn is None or type(fn).__name__ != "MulBackward0":
            return
        factor = getattr(fn, "_saved_other", None)
        if not isinstance(factor, torch.Tensor) or factor.dim() > 1 or \
                factor.numel() != 1 or factor.dtype != torch.float32 or factor.requires_grad:
            return
        known = self._scalers.get(factor.data_ptr())
        if known is None:  # one read per scaler, at its first backward
            value = float(factor.item())
            known = value >= 2 and math.isfinite(value) and \
                value == 2.0 ** round(math.log2(value))
            self._scalers[factor.data_ptr()] = known
        self.scale = factor if known else None

    def unscaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as the model computed it (see :meth:`read_scale`), detached: holding
        the loss until the step ends must not hold its autograd graph (all of it, saved
        activations included, after ``backward(retain_graph=True)``)."""
        return loss.detach() if self.scale is None else loss.detach() / self.scale

    def gradients(self, row: int, key: str) -> None:
        """The norm of every tracked gradient into ``row`` of ``key`` ("grad" as backward
        left them, "grad_applied" as the optimizer will apply them)."""
        buf = self.buffers.buf[key]
        grads = [None if p is None else p.grad for p in self.watched.params()]
        # As backward left them they carry the loss scaler's factor; applied ones do not
        # (the scaler unscales them before the optimizer's step).
        scale = self.scale if key == "grad" else None
        idx = [i for i, g in enumerate(grads) if g is None]
        if not idx:  # the common case: every parameter has a gradient
            values = stats.norms(grads, buf.device)
            buf[row].copy_(values if scale is None else values / scale.to(buf.device))
            return
        idx = [i for i, g in enumerate(grads) if g is not None]
        if idx:
            values = stats.norms([grads[i] for i in idx], buf.device)
            if scale is not None:
                values = values / scale.to(values.device)
            buf[row].index_copy_(0, torch.tensor(idx, device=values.device), values)

    def snapshot(self, row: int) -> None:
        """Weight norms before the update, and a copy of the weights to diff against."""
        live = [(i, p) for i, p in enumerate(self.watched.params()) if p is not None]
        if not live:
            return
        buf = self.buffers.buf["weight"]
        params = [p.detach() for _, p in live]
        # Weights as they were for this step's forward/backward: the pair to its gradients.
        norms = stats.norms(params, buf.device)
        if len(live) == self.watched.slots:
            buf[row].copy_(norms)
        else:
            buf[row].index_copy_(0, torch.tensor([i for i, _ in live], device=norms.device),
                                 norms)
        chosen = [k for k, (_, p) in enumerate(live) if p.grad is not None] or \
            list(range(len(live)))
        self._snapshot_idx = [live[k][0] for k in chosen]
        # A fused copy of the weights about to be updated, of a fixed sample of each large
        # one (detail steps only): the update's norm within ~0.5-2% (``stats.SAMPLE``),
        # without a copy of the model.
        self._snapshot = stats.Sampled([params[k] for k in chosen])

    def updates(self, row: int) -> None:
        """The norm of each update, against the snapshot taken before the step."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return
        buf = self.buffers.buf["update"]
        params = self.watched.params()
        current = [params[i] for i in self._snapshot_idx]
        if any(p is None for p in current):  # a model died within the step
            return
        values = snapshot.moved([p.detach() for p in current], buf.device)
        if values is None:  # a parameter was replaced by one of another shape or layout
            return
        if len(self._snapshot_idx) == len(params):
            buf[row].copy_(values)
        else:
            buf[row].index_copy_(0, torch.tensor(self._snapshot_idx, device=buf.device),
                                 values)

    def drop_snapshot(self) -> None:
        self._snapshot = None

    def loss(self, row: int, losses: list[torch.Tensor]) -> None:
        """The step's loss: the mean of its backward calls' losses (accumulation)."""
        if not losses:
            return
        vals = [loss.detach().reshape(()) if loss.numel() == 1 else
                loss.detach().float().mean() for loss in losses]
        value = vals[0] if len(vals) == 1 else torch.stack(
            [v.to(torch.float64) for v in vals]).mean()
        # copy_ converts dtype and device in one kernel, without a host sync.
        self.buffers.buf["loss"][row].copy_(value, non_blocking=True)
        self.buffers.loss_seen[row] = True

    def weight_norms(self, device: torch.device) -> torch.Tensor | None:
        """Every live weight's norm (the probe that tells hand-made updates)."""
        params = [p.detach() for p in self.watched.params() if p is not None]
        return stats.norms(params, device) if params else None

    def inputs(self, row: int, args: tuple[Any, ...]) -> None:
        """RMS, mean and std of the model's first floating-point input (of a fixed
        sample of its elements when it has more than ``stats.SAMPLE``)."""
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or not x.is_floating_point() or x.numel() == 0:
            return
        xd = stats.sample(x.detach()).to(torch.float64)  # a fixed sample of a large batch
        io = self.buffers.buf["io"]
        io[row, 1] = xd.pow(2).mean().sqrt().to(io.device)
        io[row, 2] = xd.mean().to(io.device)
        io[row, 3] = (xd.std() if xd.numel() > 1 else torch.zeros((), dtype=xd.dtype)
                      ).to(io.device)

    def outputs(self, row: int, output: Any) -> None:
        """Between-sample spread and RMS of the model's first floating-point output."""
        out = first_tensor(output)
        if out is None or not out.is_floating_point():
            return
        io = self.buffers.buf["io"]
        io[row, 0] = stats.output_spread(out).to(io.device)
        io[row, 4] = stats.rms(out).to(io.device)

    def activation(self, row: int, layer: int, output: Any) -> bool:
        """One layer's output RMS; False when the output has no floating-point tensor."""
        out = first_tensor(output)
        if out is None or not out.is_floating_point():
            return False
        act = self.buffers.buf["act"]
        act[row, layer] = stats.rms(out).to(act.device)
        return True


class GradientMark:
    """One gradient as it stood after the last backward (host attributes only: which
    tensor, its version counter), to tell whether it was wiped (``zero_grad``) since."""

    def __init__(self, watched: Watched) -> None:
        self.watched = watched
        self._mark: tuple[int, int, int] | None = None  # (slot, id of .grad, its version)

    def set(self) -> bool:
        """Mark the first watched gradient; False when no watched parameter has one."""
        self._mark = None
        for slot in range(self.watched.slots):
            p = self.watched.param(slot)
            if p is not None and p.grad is not None:
                self._mark = (slot, id(p.grad), p.grad._version)
                return True
        return False

    def clear(self) -> None:
        self._mark = None

    def reset_since(self) -> bool:
        """Whether the marked gradient was set to None, replaced or changed in place."""
        if self._mark is None:
            return False
        slot, grad_id, version = self._mark
        p = self.watched.param(slot)
        grad = p.grad if p is not None else None
        return grad is None or id(grad) != grad_id or grad._version != version


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in an output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            t = first_tensor(o)
            if t is not None:
                return t
    if isinstance(output, dict):
        for o in output.values():
            t = first_tensor(o)
            if t is not None:
                return t
    return None
