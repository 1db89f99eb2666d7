"""A 12-layer MLP classifies 20-feature vectors into 4 classes; every hidden layer uses
nn.Sigmoid (the user copied an old textbook network and made it deeper), so the backward signal
shrinks by a factor of at least 4 at every layer and the input-side layers never learn.

benchmark: kind=vanishing_gradient arch=mlp cause=deep-sigmoid-stack
fix: ReLU for Sigmoid, Kaiming init; broken final loss 1.315, fixed final loss 0.114 (measured)
"""
import argparse

import torch
from torch import nn

torch.set_num_threads(1)  # tiny model: one thread is faster than two

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--lr", type=float, default=0.05)
args = parser.parse_args()

torch.manual_seed(0)

# synthetic data: 4 classes, the label is the nearest of 4 random prototypes
n, d, classes = 1200, 20, 4
x = torch.randn(n, d)
prototypes = torch.randn(classes, d)
y = torch.cdist(x, prototypes).argmin(dim=1)
x_train, y_train = x[:1000], y[:1000]
x_val, y_val = x[1000:], y[1000:]

layers = []
width = 64
for i in range(12):
    layers += [nn.Linear(d if i == 0 else width, width), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(width, classes))

optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
loss_fn = nn.CrossEntropyLoss()
batch = 50

for epoch in range(args.epochs):
    perm = torch.randperm(len(x_train))
    total = 0.0
    for i in range(0, len(x_train), batch):
        idx = perm[i:i + batch]
        optimizer.zero_grad()
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    model.eval()
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    model.train()
    if epoch % 5 == 0 or epoch == args.epochs - 1:
        print(f"epoch {epoch:3d}  train loss {total / len(x_train):.4f}  val acc {acc:.3f}")

print(f"final loss {total / len(x_train):.4f}")
