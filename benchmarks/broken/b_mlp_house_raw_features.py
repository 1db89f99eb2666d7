"""An MLP regresses house prices (in $1000s) from five raw features: living area in square
feet, bedrooms, year built, lot size in square feet and distance to the city centre in km.
The user feeds the columns as they come, without standardising them: areas in the
thousands and years near 2000 make the first gradients 1e5 to 1e7 times the size of the
weights. Even at lr 1e-7, where the user ended up to stop the NaNs, SGD's first steps
throw the weights far away, the ReLUs behind them go silent and the model ends up
predicting one price for every house.

benchmark: kind=dying_relu arch=mlp cause=unscaled_features_sgd
fix: standardise x and y, lr 1e-3; broken final loss 175778, fixed final loss 676.9 (measured)
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
    parser.add_argument("--lr", type=float, default=1e-7)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_houses(2000, g)
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
