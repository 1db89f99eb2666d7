"""A small MLP trained with SGD; its behaviour is set by its own command-line arguments.

The test suite runs it with ``gradwatch run``; it prints what it received so the tests
can check that gradwatch passed the script's arguments through untouched.
"""

import argparse
import json
import sys

import torch
from torch import nn

print("SCRIPT_NAME=" + __name__)
print("SCRIPT_ARGV=" + json.dumps(sys.argv[1:]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--exit-code", type=int, default=None)
    parser.add_argument("--raise-at", type=int, default=None)
    args, _unknown = parser.parse_known_args()
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x.sum(dim=1, keepdim=True)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(args.epochs):
        for step in range(4):
            if args.raise_at is not None and epoch * 4 + step == args.raise_at:
                raise RuntimeError("deliberate failure in the training script")
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
    print("SCRIPT_DONE")
    return args.exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
