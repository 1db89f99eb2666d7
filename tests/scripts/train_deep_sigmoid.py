"""Classify points of a synthetic 3-class problem with a deep MLP (``--depth`` sigmoid
hidden layers, default 10) in PyTorch's default init and plain SGD.

The sigmoid's slope is at most 0.25 and the default init keeps each layer's weights small:
the gradient shrinks at every layer on its way back, the first layers get a tiny fraction of
what the last one gets and the loss stays near chance. A LeakyReLU alone does not help under
the same small init (the signal then shrinks forward instead); with the init made for it
(Kaiming) it trains. ``gradwatch run --verify`` must find that pair.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight features; the class is which of three random directions scores highest."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(dim=1)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = make_data(2048)
    layers: list[nn.Module] = [nn.Linear(8, 64), nn.Sigmoid()]
    for _ in range(args.depth - 1):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
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
