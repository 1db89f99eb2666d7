"""A classifier with a cosine-similarity head (scale 100) whose loss is written as
nll_loss(torch.log(torch.softmax(logits))): once the model is confident, the smallest
probabilities underflow to exactly 0, log gives -inf and backward turns it into NaN."""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

torch.manual_seed(0)
centers = torch.randn(4, 8) * 3.0
labels = torch.randint(0, 4, (1024,))
x = centers[labels] + torch.randn(1024, 8)


class Cosine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
        self.classes = nn.Parameter(torch.randn(4, 8))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(self.body(inputs), dim=1)
        return 100.0 * emb @ F.normalize(self.classes, dim=1).t()


model = Cosine()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(args.steps):
    idx = torch.randint(0, len(x), (64,))
    optimizer.zero_grad()
    log_probs = torch.log(torch.softmax(model(x[idx]), dim=1))
    loss = F.nll_loss(log_probs, labels[idx])
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step}: loss {loss.item():.4g}")
