"""A two-layer net on bare tensors updated by hand: no torch.nn module, no torch.optim."""

import json

import torch

torch.manual_seed(0)
x = torch.randn(64, 3)
y = (x**2).sum(dim=1, keepdim=True)
w_hidden = (torch.randn(3, 16) * 0.5).requires_grad_()
b_hidden = torch.zeros(16, requires_grad=True)
w_out = (torch.randn(16, 1) * 0.25).requires_grad_()
b_out = torch.zeros(1, requires_grad=True)
STEPS = 30
losses = []
for _ in range(STEPS):
    hidden = torch.tanh(x @ w_hidden + b_hidden)
    loss = ((hidden @ w_out + b_out - y) ** 2).mean()
    loss.backward()
    losses.append(loss.item())
    with torch.no_grad():
        for p in (w_hidden, b_hidden, w_out, b_out):
            p -= 0.05 * p.grad
            p.grad.zero_()
print("SCRIPT_LOSSES=" + json.dumps(losses))
