"""A GRU reads noisy sine waves (40 timesteps) and regresses their frequency. The user
trains it with SGD + momentum 0.9 at lr 0.3 and no gradient clipping. The first 60 steps
look fine (the loss hovers around 1), then the recurrent weights reach a region where the
gradient through the 40 timesteps is enormous: within twenty steps the gradient norm grows
by more than ten orders of magnitude, the momentum carries each jump on and the run ends in
NaN.

benchmark: kind=exploding_gradient arch=gru cause=no_clipping_high_lr
fix: clip_grad_norm_ at 1.0; broken final loss nan, fixed final loss 0.003546 (measured)
"""

import argparse

import torch
from torch import nn


def make_waves(n, steps, generator):
    freq = torch.rand(n, 1, generator=generator) * 0.4 + 0.1
    phase = torch.rand(n, 1, generator=generator) * 6.28
    t = torch.arange(steps).float()
    x = torch.sin(2 * freq * t + phase) + 0.1 * torch.randn(n, steps, generator=generator)
    y = (freq - 0.3) / 0.115  # standardised frequency
    return x.unsqueeze(-1), y


class FreqGRU(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.out(h[:, -1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.3)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_waves(1024, 40, g)
    model = FreqGRU()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    running = 0.0
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (32,))
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        running += loss.item()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {running / 50:.4g}")
            running = 0.0
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    print(f"final loss {final:.4g}")


if __name__ == "__main__":
    main()
