"""A hand-written LSTM cell (one nn.Linear computing all four gates) forecasts the next value
of noisy sine waves of random frequency. The user's reset_parameters() calls
nn.init.normal_(p) on every parameter, which draws from N(0, 1) (std 1 is the default), not the
small scale PyTorch's own nn.LSTM uses: with 1 + 64 inputs per gate the pre-activations have
an RMS of ~4, so most cell-input tanh units sit at +-1 (and many gates at 0/1), pass no
gradient, and the forecast stays far off.

benchmark: kind=saturated_activation arch=lstm cause=lstm-gates-normal-std1-init
fix: nn.LSTM's U(+-1/sqrt(h)) init; broken final loss 0.191, fixed final loss 0.0145 (measured)
"""
import math

import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)


class LSTMCell(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.gates = nn.Linear(input_size + hidden_size, 4 * hidden_size)
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            nn.init.normal_(p)

    def forward(self, x, state):
        h, c = state
        i, f, g, o = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
        c = f * c + i * torch.tanh(g)
        h = o * torch.tanh(c)
        return h, c


class Forecaster(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.cell = LSTMCell(1, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, seq):                 # seq: (batch, time, 1)
        batch = seq.shape[0]
        h = seq.new_zeros(batch, self.cell.hidden_size)
        c = seq.new_zeros(batch, self.cell.hidden_size)
        outputs = []
        for t in range(seq.shape[1]):
            h, c = self.cell(seq[:, t], (h, c))
            outputs.append(self.head(h))
        return torch.stack(outputs, dim=1)


def make_waves(n, length=25):
    freq = torch.empty(n, 1).uniform_(0.1, 0.5)
    phase = torch.empty(n, 1).uniform_(0, 2 * math.pi)
    t = torch.arange(length + 1).float()
    wave = torch.sin(freq * t + phase) + 0.05 * torch.randn(n, length + 1)
    return wave[:, :-1, None], wave[:, 1:, None]   # input, next value


x_train, y_train = make_waves(1024)
model = Forecaster()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

for epoch in range(10):
    perm = torch.randperm(len(x_train))
    total = 0.0
    for i in range(0, len(x_train), 32):
        idx = perm[i:i + 32]
        pred = model(x_train[idx])
        loss = nn.functional.mse_loss(pred, y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    print(f"epoch {epoch}: mse {total / len(x_train):.4f}")

print(f"final loss {total / len(x_train):.4f}")
