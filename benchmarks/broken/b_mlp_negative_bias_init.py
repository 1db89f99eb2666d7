"""An MLP (two hidden ReLU layers of 128) classifies generated tabular data (20 standardised
features, 4 classes). Wanting sparse hidden activations, the user initialises every hidden
bias to -1 (``nn.init.constant_(m.bias, -1.0)``). With PyTorch's default weights the
pre-activations have a standard deviation of about 0.6 in the first layer and much less in
the second, so every unit of the second layer is below zero for every input from the
first step on: those units output 0, get no gradient and never come back, and the
classifier cannot get past a constant guess.

benchmark: kind=dying_relu arch=mlp cause=negative_bias_init
fix: zero bias init; broken final loss 1.386, fixed final loss 0.003004 (measured)
"""

import argparse

import torch
from torch import nn


def make_data(n, generator):
    centers = torch.randn(4, 20, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    x = centers[labels] + torch.randn(n, 20, generator=generator)
    return (x - x.mean(0)) / x.std(0), labels


class SparseMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 128)
        self.fc2 = nn.Linear(128, 128)
        self.out = nn.Linear(128, 4)
        for layer in (self.fc1, self.fc2):
            nn.init.constant_(layer.bias, -1.0)  # start with sparse activations

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.out(x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_data(2000, g)
    model = SparseMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
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
