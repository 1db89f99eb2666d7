"""An MLP regresses house prices from five features (living area, bedrooms, year built, lot
size, distance to the centre). The user standardises the features but leaves the target in
$1000s (mean 386, std 165): the squared errors are around 1e5 and their gradients so large
that every step of SGD at lr=1e-3 overshoots further than the last; the gradient norm grows
by orders of magnitude and the run ends in NaN.

benchmark: kind=exploding_gradient arch=mlp cause=unscaled_regression_target
fix: standardise the target; broken final loss nan, fixed final loss 676.9 (measured)
"""

import argparse

import torch
from torch import nn


def make_houses(n, generator):
    sqft = 500 + 3500 * torch.rand(n, generator=generator)
    beds = torch.randint(1, 7, (n,), generator=generator).float()
    year = 1900 + 120 * torch.rand(n, generator=generator)
    lot = 1000 + 19000 * torch.rand(n, generator=generator)
    dist = 50 * torch.rand(n, generator=generator)
    price = (150 * sqft + 10000 * beds + 800 * (year - 1900) + 4 * lot - 3000 * dist
             + 20000 * torch.randn(n, generator=generator)) / 1000
    return torch.stack([sqft, beds, year, lot, dist], 1), price.unsqueeze(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_houses(2000, g)
    x = (x - x.mean(0)) / x.std(0)  # standardised features; the price stays in $1000s
    model = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}: mse {total / len(x):.1f}")
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    print(f"final loss {final:.1f} (price std {y.std().item():.1f}k)")


if __name__ == "__main__":
    main()
