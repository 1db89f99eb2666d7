"""Regression MLP trained with SGD and a StepLR meant per epoch but stepped every batch:
the rate halves every 10 batches and is below 1/1000 of its start after 100, so the loss
stalls far above what the model reaches at a constant rate."""
import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=8)
args = parser.parse_args()

torch.manual_seed(0)
x = torch.randn(1024, 16)
y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.1 * torch.randn(1024, 1)
loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
for epoch in range(args.epochs):
    total = 0.0
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        optimizer.step()
        scheduler.step()  # meant once per epoch, after the batch loop
        total += loss.item() * len(xb)
    print(f"epoch {epoch}: loss {total / len(x):.4f} lr {scheduler.get_last_lr()[0]:.2e}")
