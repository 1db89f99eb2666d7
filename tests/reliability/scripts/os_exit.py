"""Leaves with os._exit(3) in the middle of training (no unwinding, no atexit)."""

import os

import torch
from torch import nn

model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(30):
    optimizer.zero_grad()
    model(torch.randn(16, 4)).square().mean().backward()
    optimizer.step()
    if step == 9:
        os._exit(3)
