"""An MLP embeds 10-feature points of 6 classes into 8 dimensions and classifies them with a
normalised-softmax head (cosine similarity to learned class vectors, scale 64, as in
NormFace/CosFace). The user writes the loss as ``nll_loss(torch.log(torch.softmax(logits)))``
instead of ``log_softmax``/``cross_entropy``: with scale 64 the logits of one sample span
up to 128, the smallest softmax probabilities underflow to exactly 0, ``torch.log`` returns
-inf there and the backward pass turns that into NaN gradients that wipe out the weights.

benchmark: kind=nonfinite arch=mlp cause=log_of_softmax_underflow
fix: F.log_softmax(logits); broken final loss nan, fixed final loss 0.001589 (measured)
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def make_data(n, generator):
    centers = torch.randn(6, 10, generator=generator) * 2.0
    labels = torch.randint(0, 6, (n,), generator=generator)
    return centers[labels] + torch.randn(n, 10, generator=generator), labels


class CosineClassifier(nn.Module):
    def __init__(self, n_classes=6, embed_dim=8, scale=64.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, embed_dim))
        self.class_vectors = nn.Parameter(torch.randn(n_classes, embed_dim))
        self.scale = scale

    def forward(self, x):
        emb = F.normalize(self.body(x), dim=1)
        return self.scale * emb @ F.normalize(self.class_vectors, dim=1).t()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_data(2000, g)
    model = CosineClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        logits = model(x[idx])
        log_probs = torch.log(torch.softmax(logits, dim=1))
        loss = F.nll_loss(log_probs, y[idx])
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            acc = (logits.argmax(1) == y[idx]).float().mean().item()
            print(f"step {step + 1}: loss {loss.item():.4g} acc {acc:.2f}")
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    print(f"final loss {final:.4g}")


if __name__ == "__main__":
    main()
