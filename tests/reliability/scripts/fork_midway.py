"""Forks after 10 steps: the child sleeps 2 s and exits 0 (after the parent has written its
report), the parent trains 40 more steps."""

import os
import sys
import time

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(50):
    if step == 10 and os.fork() == 0:
        time.sleep(2)
        sys.exit(0)
    optimizer.zero_grad()
    model(torch.randn(16, 4)).square().mean().backward()
    optimizer.step()
