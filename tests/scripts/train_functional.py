"""A module whose activations are functional calls (F.relu), not nn.ReLU modules."""

import json

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


torch.manual_seed(0)
x = torch.randn(128, 4)
y = x[:, :1] - 2 * x[:, 1:2]
net = Net()
optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
losses = []
for _ in range(25):
    optimizer.zero_grad()
    loss = F.mse_loss(net(x), y)
    loss.backward()
    losses.append(loss.item())
    optimizer.step()
print("SCRIPT_LOSSES=" + json.dumps(losses))
