"""An MLP with BatchNorm and Dropout whose validation loop forgets ``model.eval()``.

``gradwatch run`` must find it (finding ``eval_mode``); ``--with-eval`` is the fixed loop.
"""

import argparse
import sys

import torch
from torch import nn


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--with-eval", action="store_true")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(128, 6, generator=g), torch.randn(48, 6, generator=g)
    y, yv = x[:, :1] - x[:, 1:2], xv[:, :1] - xv[:, 1:2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.epochs):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[i: i + 32]), y[i: i + 32]).backward()
            opt.step()
        if args.with_eval:
            model.eval()
        with torch.no_grad():
            val = sum(nn.functional.mse_loss(model(xv[j: j + 16]), yv[j: j + 16]).item()
                      for j in range(0, len(xv), 16))
        model.train()
        print(f"validation loss {val / 3:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
