"""A GRU classifies generated sensor traces (sine, square and sawtooth waves with random
frequency, amplitude and offset, 30 timesteps) into their three shapes. The model
standardises every batch in its forward pass with the batch's own mean and ``std(dim=0)``,
and the DataLoader keeps the incomplete last batch (``drop_last=False``). The 1025 traces
leave one trace in the last batch of each epoch; the standard deviation of a single sample
is NaN, so the first epoch ends with a NaN loss and NaN gradients that poison every weight.

benchmark: kind=nonfinite arch=gru cause=batch_std_of_single_sample
fix: drop_last=True; broken final loss nan, fixed final loss 0.01039 (measured)
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_traces(n, steps, generator):
    kind = torch.randint(0, 3, (n,), generator=generator)
    freq = 0.08 + 0.04 * torch.rand(n, 1, generator=generator)
    amp = 1.0 + 0.5 * torch.rand(n, 1, generator=generator)
    offset = 2.0 + 0.5 * torch.randn(n, 1, generator=generator)
    phase = torch.rand(n, 1, generator=generator)
    t = freq * torch.arange(steps).float() + phase
    frac = t - torch.floor(t)
    waves = torch.stack([torch.sin(6.283 * t), torch.sign(torch.sin(6.283 * t)), 2 * frac - 1])
    x = offset + amp * waves[kind, torch.arange(n)]
    x = x + 0.1 * torch.randn(n, steps, generator=generator)
    return x.unsqueeze(-1), kind


class ShapeGRU(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        # standardise with the batch statistics, per timestep
        x = (x - x.mean(dim=0, keepdim=True)) / x.std(dim=0, keepdim=True)
        _, h = self.gru(x)
        return self.head(h[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_traces(1025, 30, g)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = ShapeGRU()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        total, correct = 0.0, 0
        for xb, yb in loader:
            optimizer.zero_grad()
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
        print(f"epoch {epoch + 1}: loss {total / len(x):.4g} acc {correct / len(x):.3f}")
    print(f"final loss {loss.item():.4g}")


if __name__ == "__main__":
    main()
