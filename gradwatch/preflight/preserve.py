"""What preflight must give back exactly as it found it: modes, buffers, grads, flags, RNGs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


class Preserved:
    """A model's training flags, ``requires_grad`` flags, ``.grad`` references and buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        self.params = [(name, p, p.requires_grad, p.grad, p._version)
                       for name, p in model.named_parameters()]
        self.grad_versions = [None if p.grad is None else p.grad._version
                              for _, p, *_ in self.params]
        # Buffers are small next to parameters: BatchNorm statistics, step counters. They
        # are copied back whatever their version counter says: BatchNorm's kernel updates
        # its running statistics in place without bumping it.
        self.buffers = [(m, name, b, b.detach().clone())
                        for m in model.modules() for name, b in m._buffers.items()
                        if b is not None]

    def restore(self) -> None:
        """Put every flag, ``.grad`` reference and buffer back."""
        for m, flag in self.modes:
            m.training = flag
        for _, p, requires_grad, grad, _ in self.params:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
        with torch.no_grad():
            for m, name, b, copy in self.buffers:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                b.copy_(copy)

    def changed_in_place(self) -> list[str]:
        """Parameters (or their grads) the user's forward or loss modified in place."""
        return [name for (name, p, _, grad, version), gv in zip(self.params, self.grad_versions,
                                                                strict=True)
                if p._version != version or (grad is not None and grad._version != gv)]


@contextmanager
def random_state(devices: list[int], seed: int) -> Iterator[None]:
    """Seed torch for a reproducible forward (Dropout masks), then restore every RNG."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            for d in devices:
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
