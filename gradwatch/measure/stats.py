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

import functools
import math
from collections.abc import Sequence

import torch

from .distributed import local

__all__ = ["SAMPLE", "Sampled", "norms", "output_spread", "rms", "sample"]

_NORM_DTYPE = torch.float64

SAMPLE = 1 << 14
"""Elements a statistic reads of a tensor larger than this (a weight snapshot, the model's
input and output): 16,384 give a norm to ~0.5% (~2% for heavy-tailed values) and a spread
as well, and the cost no longer grows with the model (a 167M-parameter model's weight copy
was 0.67 GB per detail step; a language model's logits, 0.4G elements, were converted to
float64 whole). Detectors compare these numbers with limits orders of magnitude apart."""


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

    Read in float32, never converted to float64 first (a float64 copy of a layer's output
    costs more than the norm: ~1% of a CNN's step on CPU, 18 bytes per element moved for a
    bf16 activation on a GPU instead of 4). A float32 sum of squares overflows once
    elements pass ~1e19: on CPU it is then redone in float64 (reading a CPU value costs no
    sync); on accelerators, without a host read, such a tensor's RMS is given as its
    largest element over sqrt(elements), a finite lower bound, so that an exploding but
    finite activation never reads as non-finite.
    """
    if t.numel() == 0:
        return torch.zeros((), dtype=_NORM_DTYPE, device=t.device)
    t = t.detach()
    root = t.numel() ** 0.5
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(t, dtype=_NORM_DTYPE) / root
    norm = torch.linalg.vector_norm(t, dtype=torch.float32)
    if t.device.type == "cpu":
        if math.isfinite(norm.item()):
            return norm.to(_NORM_DTYPE) / root
        return torch.linalg.vector_norm(t, dtype=_NORM_DTYPE) / root
    if t.dtype == torch.float16:  # 65504^2 times any feasible size stays below 3.4e38
        return norm.to(_NORM_DTYPE) / root
    return _bounded(norm, torch.linalg.vector_norm(t, ord=math.inf)) / root


def _bounded(norm: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """``norm`` in float64, or ``largest`` where the float32 norm overflowed although no
    element is infinite or NaN (``largest`` is then finite)."""
    overflowed = torch.isinf(norm) & torch.isfinite(largest)
    return torch.where(overflowed, largest, norm).to(_NORM_DTYPE)


def output_spread(t: torch.Tensor, k: int = SAMPLE) -> torch.Tensor:
    """Between-sample standard deviation of a batch, relative to its RMS (0 = collapsed).

    A model whose output is the same for every input has spread 0: it has learnt at best
    the mean target, which is what a stalled deep net typically does. Read on at most
    1024 samples and ``k`` elements, evenly strided over the features (a language
    model's logits are batch x tokens x vocabulary).
    """
    t = t.detach()
    if t.dim() == 0 or t.shape[0] < 2:
        return torch.full((), float("nan"), dtype=_NORM_DTYPE, device=t.device)
    flat = t[:1024].reshape(min(t.shape[0], 1024), -1)
    rows, cols = flat.shape
    if rows * cols > k:
        flat = flat[:, ::_stride(cols, max(k // rows, 1), t.shape[-1])]
    flat = flat.to(_NORM_DTYPE)
    # The std over samples, written out: std(dim=0) is ~10x slower on CPU (a reduction
    # across rows), and the value is the same.
    centred = flat - flat.mean(dim=0)
    spread = (centred.pow(2).sum(dim=0) / (flat.shape[0] - 1)).sqrt().mean()
    return spread / (flat.pow(2).mean().sqrt() + 1e-30)


def sample(t: torch.Tensor, k: int = SAMPLE) -> torch.Tensor:
    """A flat view of at most ``k`` evenly strided elements of ``t`` (no copy).

    The stride is coprime with the last dimension, so that the sample visits every
    column of a matrix (and every row of one with fewer than ``k`` rows): an update
    confined to some rows or columns is seen in proportion. A tensor of ``k`` elements
    or fewer, or one whose memory is not one contiguous block, is returned whole.
    """
    n = t.numel()
    if n <= k or not t.is_contiguous():
        return t.reshape(-1) if t.is_contiguous() else t
    return t.view(-1)[::_stride(n, k, t.shape[-1] if t.dim() else 1)]


def _stride(n: int, k: int, last: int) -> int:
    """The smallest stride that keeps at most ``k`` of ``n`` elements and is coprime with
    ``last`` (a row's length), so that the kept elements visit every column."""
    step = -(-n // k)
    while math.gcd(step, last) != 1:
        step += 1
    return step


class Sampled:
    """Copies of (samples of) tensors taken now, to measure how far they moved later.

    A tensor of more than ``k`` elements is followed through :func:`sample`, and its
    difference's norm scaled by sqrt(elements / sampled): the norm of the whole
    difference, estimated. The weights before an update cost ``k`` elements per tensor
    instead of a copy of the model.
    """

    def __init__(self, tensors: list[torch.Tensor], k: int = SAMPLE) -> None:
        self.k = k
        self.shapes = [t.shape for t in tensors]
        self.views = [sample(local(t), k) for t in tensors]
        self.copies = list(torch._foreach_mul(self.views, 1.0))  # one fused copy
        self.scale = [math.sqrt(local(t).numel() / max(v.numel(), 1))
                      for t, v in zip(tensors, self.views, strict=True)]
        self.exact = all(s == 1.0 for s in self.scale)

    def moved(self, now: list[torch.Tensor], out_device: torch.device) -> torch.Tensor | None:
        """The norm of (then - now) for each tensor, on ``out_device`` (float64); None
        when a tensor's shape or memory layout changed since (a parameter replaced), so
        that the same elements can no longer be compared."""
        if [t.shape for t in now] != self.shapes:
            return None
        views = [sample(local(t), self.k) for t in now]
        if any(v.shape != c.shape or v.stride() != w.stride()
               for v, c, w in zip(views, self.copies, self.views, strict=True)):
            return None
        torch._foreach_sub_(self.copies, views)  # in place: no second copy
        values = norms(self.copies, out_device)
        if self.exact:
            return values
        return values * _constant(tuple(self.scale), values.device)


@functools.lru_cache(maxsize=16)
def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A float64 tensor of ``values`` on ``device``, made once: a host-to-device copy on
    each detail step would wait for the device's queue."""
    return torch.tensor(values, dtype=_NORM_DTYPE, device=device)


