"""Trains until a real SIGINT (sent to itself after 20 steps) stops it, like Ctrl-C."""

import os
import signal

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
step = 0
while True:
    optimizer.zero_grad()
    model(torch.randn(16, 4)).square().mean().backward()
    optimizer.step()
    step += 1
    if step == 20:
        os.kill(os.getpid(), signal.SIGINT)
