"""A 12-layer ReLU MLP regresses a smooth function of 10 sensor readings. The user wrote an
init_weights() helper that draws every Linear weight from N(0, 0.01^2), a habit from shallow
nets; with 64-wide layers each layer multiplies the signal by about 0.01 * sqrt(64/2) = 0.06,
so both the forward signal and the gradient reaching the first layers are ~1e-12 of normal and
the net only ever learns the output bias.

benchmark: kind=vanishing_gradient arch=mlp cause=tiny-normal-init
fix: kaiming_normal_ for std 0.01; broken final loss 0.729, fixed final loss 0.0118 (measured)
"""
import argparse

import torch
from torch import nn

torch.set_num_threads(1)  # tiny model: one thread is faster than two

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=25)
parser.add_argument("--lr", type=float, default=0.01)
args = parser.parse_args()

torch.manual_seed(1)

n, d = 1500, 10
x = torch.randn(n, d)
w = torch.randn(d)
y = (torch.sin(x @ w / 2) + 0.5 * x[:, 0] * x[:, 1] + 0.05 * torch.randn(n)).unsqueeze(1)
x_train, y_train, x_val, y_val = x[:1200], y[:1200], x[1200:], y[1200:]


def make_mlp(depth=12, width=64):
    layers = [nn.Linear(d, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, mean=0.0, std=0.01)
        nn.init.zeros_(m.bias)


model = make_mlp()
model.apply(init_weights)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
loss_fn = nn.MSELoss()

for epoch in range(args.epochs):
    perm = torch.randperm(len(x_train))
    running = 0.0
    for i in range(0, len(x_train), 32):
        idx = perm[i:i + 32]
        pred = model(x_train[idx])
        loss = loss_fn(pred, y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item() * len(idx)
    with torch.no_grad():
        val = loss_fn(model(x_val), y_val).item()
    if epoch % 5 == 0 or epoch == args.epochs - 1:
        print(f"epoch {epoch}: train mse {running / len(x_train):.4f}, val mse {val:.4f}")

print(f"final loss {running / len(x_train):.4f}")
