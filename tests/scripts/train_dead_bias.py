"""Fit a small ReLU MLP to a synthetic regression task with minibatch SGD.

The second hidden layer's bias (or, with ``--sparse-layers 0,2``, both hidden layers')
starts at -3 ("start sparse"): the layer's pre-activations
are then below zero for every sample, its units output 0 and get no gradient, and the
network predicts a constant. ``gradwatch run --verify`` must find the dead units and show
what revives them.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight features and a smooth nonlinear target with a little noise."""
    x = torch.randn(n, 8)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(n, 1)
    return x, y


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--sparse-layers", default="2",
                        help="indices of the Linear layers whose bias starts at -3")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = make_data(512)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 1),
    )
    # Sparse activations in the second hidden layer: a negative bias keeps units off.
    for index in args.sparse_layers.split(","):
        nn.init.constant_(model[int(index)].bias, -3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(args.epochs):
        total = 0.0
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        print(f"epoch {epoch + 1}: loss {total / len(x):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
