"""Self-attention over padded sequences; at step 9 one sequence of the batch is all padding,
so its attention row is masked entirely and the forward turns NaN (Dropout on: the run
draws random numbers). ``python train_nan_attention.py [STATE_PATH]`` saves the final
weights, optimizer state and RNG state to STATE_PATH."""

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, key_padding_mask=pad)
        return self.head(self.drop(a + h)).mean(dim=1)


torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
model = Net()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
losses = []
for step in range(20):
    x = torch.randn(8, 5, 6, generator=g)
    y = x.sum(dim=(1, 2)).unsqueeze(1) / 10
    pad = torch.zeros(8, 5, dtype=torch.bool)
    pad[:, 4] = True  # the last position is padding
    if step == 9:
        pad[2, :] = True  # a sequence that is padding only
    optimizer.zero_grad()
    loss = F.mse_loss(model(x, pad), y)
    loss.backward()
    losses.append(loss.item())
    optimizer.step()
print("SCRIPT_LOSSES=" + json.dumps(losses))
if len(sys.argv) > 1:
    torch.save({"state": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state()}, sys.argv[1])
