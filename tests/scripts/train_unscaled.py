"""Predict house prices from raw tabular features with a small MLP and minibatch SGD.

The features go in as they come (floor area in square metres, rooms, age in years,
distance to the centre in km: scales from 1 to 250) with a learning rate that suits
standardised inputs. On these raw scales the first update overshoots, the loss blows up
and the ReLU units die; with ``--act tanh`` the first layer's units sit at +-1 instead.
``gradwatch run --verify`` must find it and show what fixes it.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_houses(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic houses: (area m2, rooms, age years, distance km) and the price in 100k."""
    area = 40 + 210 * torch.rand(n, 1)
    rooms = torch.clamp(torch.round(area / 35 + torch.randn(n, 1)), 1, 9)
    age = 80 * torch.rand(n, 1)
    distance = 1 + 39 * torch.rand(n, 1)
    price = 1.5 + 0.02 * area + 0.1 * rooms - 0.01 * age - 0.04 * distance
    price = price + 0.2 * torch.randn(n, 1)
    return torch.cat([area, rooms, age, distance], dim=1), price


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--act", choices=["relu", "tanh"], default="relu")
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = make_houses(1024)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU() if args.act == "relu" else nn.Tanh(),
                          nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        total = 0.0
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        print(f"epoch {epoch + 1}: mse {total / len(x):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
