"""SEEDS.md section 6's network: 10 blocks of Linear(., 10) + activation, full-batch SGD.

Used by the ``--verify`` tests. Its behaviour is set by its own arguments: the activation,
the init (PyTorch's default or every weight N(0, 10)), the learning rate, the number of
epochs, and ``--no-seed`` for a run that differs every time.
"""

import argparse

import numpy as np
import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--act", choices=["relu", "sigmoid"], default="relu")
parser.add_argument("--init", choices=["default", "normal10"], default="default")
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--epochs", type=int, default=500)
parser.add_argument("--no-seed", action="store_true")
args = parser.parse_args()

if not args.no_seed:
    np.random.seed(0)
    torch.manual_seed(0)
X = torch.tensor(np.random.randn(100, 1), dtype=torch.float32)
y = 3 * X + 2 + 0.5 * torch.tensor(np.random.randn(100, 1), dtype=torch.float32)

blocks: list[nn.Module] = []
width = 1
for _ in range(10):
    blocks += [nn.Linear(width, 10), nn.ReLU() if args.act == "relu" else nn.Sigmoid()]
    width = 10
model = nn.Sequential(*blocks, nn.Linear(10, 1))
if args.init == "normal10":
    for p in model.parameters():
        nn.init.normal_(p, 0.0, 10.0)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loss_fn = nn.MSELoss()
for _epoch in range(args.epochs):
    optimizer.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    optimizer.step()
print(f"final loss {loss.item():.4g}")
