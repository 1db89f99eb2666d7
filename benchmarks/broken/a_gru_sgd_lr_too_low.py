"""A GRU forecasts the next value of a noisy multi-frequency sine signal. The user first
trained it with Adam(lr=1e-4), then switched to plain SGD (no momentum) "to compare" and
kept lr=1e-4, about a thousand times too small for SGD on this model: after 570 steps the
loss has barely left its starting value and changes by under 1% over the second half of the
run.

benchmark: kind=loss_plateau arch=gru cause=sgd-lr-far-too-low
fix: SGD lr=0.1; broken final loss 0.594, fixed final loss 0.0293 (measured)
"""
import math

import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)

window, n = 30, 1200


def make_windows(n):
    t = torch.arange(window + 1).float()
    f1 = torch.empty(n, 1).uniform_(0.15, 0.35)
    f2 = torch.empty(n, 1).uniform_(0.5, 0.8)
    phase = torch.empty(n, 2).uniform_(0, 2 * math.pi)
    s = torch.sin(f1 * t + phase[:, :1]) + 0.5 * torch.sin(f2 * t + phase[:, 1:])
    s = s + 0.05 * torch.randn(n, window + 1)
    return s[:, :-1, None], s[:, -1:]


x_train, y_train = make_windows(n)
x_val, y_val = make_windows(300)


class Forecaster(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out[:, -1])


model = Forecaster()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
loss_fn = nn.MSELoss()

for epoch in range(15):
    perm = torch.randperm(n)
    total = 0.0
    for i in range(0, n, 32):
        idx = perm[i:i + 32]
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    with torch.no_grad():
        val = loss_fn(model(x_val), y_val).item()
    if epoch % 3 == 2:
        print(f"epoch {epoch + 1}: train mse {total / n:.4f}  val mse {val:.4f}")

print(f"final loss {total / n:.4f}")
