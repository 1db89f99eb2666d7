"""A deep ReLU MLP (8 hidden layers of 128) classifies points of a generated 20-feature,
5-class problem. The user writes their own init, ``nn.init.normal_(w, std=0.25)`` on every
Linear, thinking a small constant std is safe: at width 128 that is about 2x the Kaiming
std, so the signal doubles at every layer, the first logits are in the hundreds and the
gradients are huge against the weights; SGD then blows the weights up.

benchmark: kind=exploding_gradient arch=mlp cause=init_std_too_large
fix: Kaiming normal init; broken final loss nan, fixed final loss 0.1511 (measured)
"""

import argparse

import torch
from torch import nn


def make_data(n, generator):
    centers = torch.randn(5, 20, generator=generator) * 0.5
    labels = torch.randint(0, 5, (n,), generator=generator)
    x = centers[labels] + torch.randn(n, 20, generator=generator)
    return x, labels


def build_mlp(depth=8, width=128):
    layers, fan_in = [], 20
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(width, 5))
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.25)
            nn.init.zeros_(m.bias)
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.005)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_data(2048, g)
    model = build_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}: loss {total / len(x):.4g}")
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"final loss {final:.4g} accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
