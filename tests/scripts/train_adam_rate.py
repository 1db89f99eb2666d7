"""Classify points of a synthetic 4-class problem with a ReLU MLP and Adam, at a learning
rate copied from an SGD recipe for a normalised net (``--lr``, default 3: thousands of
times Adam's usual rate).

Every Adam step moves every weight by about the learning rate whatever its gradient: the
first steps push the hidden units below zero for every input and the classifier falls back
to a constant guess. Cutting the rate by one decade (0.3) is not enough; ``gradwatch run
--verify`` must walk down the learning-rate ladder to a rate that trains.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten features; the class is the quadrant of two random projections."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10, generator=g)
    w = torch.randn(10, 2, generator=g)
    z = x @ w
    y = (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = make_data(2048)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        i = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i]), y[i])
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4g}")


if __name__ == "__main__":
    main()
