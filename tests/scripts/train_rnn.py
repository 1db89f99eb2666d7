"""A vanilla tanh RNN asked for the sign of the first of 100 inputs, read at its last step.

The test suite runs it with ``gradwatch run``: the gradient reaching the first timestep
vanishes (about 0.6x per step), which only the per-timestep view of gradwatch shows.
"""

import json
import sys

import torch
from torch import nn


class LastStepRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def main() -> int:
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    model = LastStepRNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(24):
        x = torch.randn(128, 100, 1, generator=data)
        y = (x[:, 0, 0] > 0).float()
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("SCRIPT_LOSSES=" + json.dumps(losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
