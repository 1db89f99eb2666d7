"""A seeded BatchNorm + Dropout MLP, trained with momentum SGD; saves everything it ends with.

Usage: train_bn_dropout.py OUT.pt [--compile BACKEND | --compile-inplace BACKEND] [--steps N]
"""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--compile", default=None)
parser.add_argument("--compile-inplace", default=None)
parser.add_argument("--steps", type=int, default=40)
args = parser.parse_args()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                      nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
forward = model
if args.compile:
    forward = torch.compile(model, backend=args.compile)
if args.compile_inplace:
    model.compile(backend=args.compile_inplace)
x, y = torch.randn(64, 8), torch.randn(64, 1)
for step in range(args.steps):
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(forward(x), y)
    loss.backward()
    optimizer.step()
    if step % 10 == 9:
        with torch.no_grad():  # a validation forward in train mode: gradwatch re-runs it
            forward(x)
torch.save({"state": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(), "loss": loss.detach()}, args.out)
