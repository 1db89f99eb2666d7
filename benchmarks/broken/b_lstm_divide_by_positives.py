"""An LSTM flags rare events in generated two-channel sensor sequences (40 timesteps; about
12% of the sequences contain a short burst). Against the class imbalance the user writes a
balanced loss: the positives' binary cross-entropy summed and divided by the number of
positives in the batch, plus the same for the negatives. Most batches of 32 hold a few
positives, but now and then one holds none: its positive term is 0 / 0 = NaN, and that one
NaN loss puts NaN into every weight.

benchmark: kind=nonfinite arch=lstm cause=division_by_zero_batch_count
fix: counts .clamp(min=1); broken final loss nan, fixed final loss 0.01095 (measured)
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def make_sequences(n, steps, generator, rate=0.12):
    x = torch.randn(n, steps, 2, generator=generator) * 0.5
    y = (torch.rand(n, generator=generator) < rate).float()
    start = torch.randint(0, steps - 4, (n,), generator=generator)
    for i in torch.nonzero(y).flatten().tolist():
        s = int(start[i])
        x[i, s:s + 4, 0] += 2.0
        x[i, s:s + 4, 1] -= 1.0
    return x, y


class EventLSTM(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out.max(dim=1).values).squeeze(1)


def balanced_bce(logits, targets):
    per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pos, neg = targets, 1 - targets
    return (per_sample * pos).sum() / pos.sum() + (per_sample * neg).sum() / neg.sum()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_sequences(2000, 40, g)
    model = EventLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    running = 0.0
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (32,))
        optimizer.zero_grad()
        loss = balanced_bce(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        running += loss.item()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: balanced loss {running / 50:.4g}")
            running = 0.0
    with torch.no_grad():
        final = balanced_bce(model(x), y).item()
    print(f"final loss {final:.4g}")


if __name__ == "__main__":
    main()
