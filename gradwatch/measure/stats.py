"""Sync-free tensor reductions for the hot path: the one place that touches ``torch._foreach_*``.

Every function returns tensors on the device of its inputs and never synchronises an
accelerator: the caller decides when to copy to the host (once every ``sync_every`` steps).

Norms must not overflow: a float32 L2 norm is ``inf`` as soon as the sum of squares passes
3.4e38 (elements around 1e19 suffice), which would make finite gradients look non-finite.
In float64 a norm is non-finite only if an element is. How we get there depends on the
device:

* accelerators: one fused kernel accumulating in float64 (memory-bound, so no slower);
* CPU: PyTorch's float64-accumulating norm is not vectorised and runs ~25x slower than the
  float32 one (73 ms vs 3 ms for 8M elements, measured with torch 2.13). Reading a CPU
  tensor is no device synchronisation, so we compute in the tensors' own precision and
  recompute in float64 only the few tensors whose norm came out non-finite. (A float32
  norm can also underflow to 0 for elements below ~1e-19; such a gradient reads as 0.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .distributed import local

__all__ = ["copy", "norms", "output_spread", "rms", "subtract_"]

_NORM_DTYPE = torch.float64


def _foreach_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor (all on one device) as a 1-D float64 tensor on that device."""
    if tensors[0].device.type == "cpu":
        out = torch.stack(torch._foreach_norm(tensors)).to(_NORM_DTYPE)
        if not math.isfinite(out.sum().item()):  # reading a CPU value: no sync cost
            for i in torch.nonzero(~torch.isfinite(out)).flatten().tolist():
                out[i] = torch.linalg.vector_norm(tensors[i], dtype=_NORM_DTYPE)
        return out
    try:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=_NORM_DTYPE))
    except (RuntimeError, TypeError, NotImplementedError):
        # Fallback for backends without fused kernels or float64 (e.g. MPS): one
        # kernel per tensor, still on device and still without a host sync.
        dtype = _NORM_DTYPE if tensors[0].device.type != "mps" else torch.float32
        return torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors])


def norms(tensors: Sequence[torch.Tensor], out_device: torch.device) -> torch.Tensor:
    """Return a 1-D float64 tensor on ``out_device`` holding the L2 norm of each tensor.

    Dense tensors are grouped by device and reduced with one fused kernel per group;
    sparse tensors (``nn.Embedding(sparse=True)`` gradients) use their stored values.
    """
    tensors = [local(t) for t in tensors]  # a DTensor shard's norm: no communication
    if not tensors:
        return torch.zeros(0, dtype=_NORM_DTYPE, device=out_device)
    device = tensors[0].device
    if device == out_device and all(t.device == device and not t.is_sparse for t in tensors):
        # Fast path (one device, dense): one fused kernel and one stack.
        return _foreach_norm(tensors)
    results: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.is_sparse:
            values = t.coalesce().values()
            results[i] = torch.linalg.vector_norm(values, dtype=_NORM_DTYPE)
        else:
            groups.setdefault(t.device, []).append(i)
    for idx in groups.values():
        for i, n in zip(idx, _foreach_norm([tensors[i] for i in idx]).unbind(), strict=True):
            results[i] = n
    out = [r.to(out_device, non_blocking=True) for r in results]  # type: ignore[union-attr]
    return torch.stack(out)


def rms(t: torch.Tensor) -> torch.Tensor:
    """Root mean square of a tensor as a 0-d float64 tensor (activation scale).

    On CPU the norm is taken in float32 (a conv output of millions of elements converted to
    float64 cost ~1% of a CNN's step) and redone in float64 only when it overflowed (reading
    a CPU value costs no sync); on accelerators in float64, without a host read.
    """
    if t.numel() == 0:
        return torch.zeros((), dtype=_NORM_DTYPE, device=t.device)
    t = t.detach()
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        norm = torch.linalg.vector_norm(t, dtype=torch.float32)
        if math.isfinite(norm.item()):
            return norm.to(_NORM_DTYPE) / (t.numel() ** 0.5)
    return torch.linalg.vector_norm(t, dtype=_NORM_DTYPE) / (t.numel() ** 0.5)


def output_spread(t: torch.Tensor) -> torch.Tensor:
    """Between-sample standard deviation of a batch, relative to its RMS (0 = collapsed).

    A model whose output is the same for every input has spread 0: it has learnt at best
    the mean target, which is what a stalled deep net typically does.
    """
    t = t.detach()
    if t.dim() == 0 or t.shape[0] < 2:
        return torch.full((), float("nan"), dtype=_NORM_DTYPE, device=t.device)
    flat = t.reshape(t.shape[0], -1).to(_NORM_DTYPE)
    spread = flat.std(dim=0).mean()
    return spread / (flat.pow(2).mean().sqrt() + 1e-30)


def copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A fused copy of the tensors (the weights before an update)."""
    return list(torch._foreach_mul([local(t) for t in tensors], 1.0))


def subtract_(into: list[torch.Tensor], other: list[torch.Tensor]) -> list[torch.Tensor]:
    """``into[i] -= other[i]`` in place, fused: an update without a second weight copy."""
    torch._foreach_sub_(into, [local(t) for t in other])
    return into
