"""A deep sigmoid MLP as lists of bare tensors, updated by hand in a loop: it stalls."""

import itertools

import torch

torch.manual_seed(0)
x = torch.randn(256, 8)
y = (x[:, :1] * 2 - x[:, 1:2]) + 0.1 * torch.randn(256, 1)
sizes = [8] + [32] * 8 + [1]
Ws = [(torch.randn(a, b) * (1.0 / a) ** 0.5).requires_grad_()
      for a, b in itertools.pairwise(sizes)]
bs = [torch.zeros(b, requires_grad=True) for b in sizes[1:]]
for _ in range(150):
    h = x
    for k, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        h = h @ W + b
        if k < len(Ws) - 1:
            h = torch.sigmoid(h)
    loss = ((h - y) ** 2).mean()
    for p in Ws + bs:
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in Ws + bs:
            p.add_(p.grad, alpha=-0.1)
