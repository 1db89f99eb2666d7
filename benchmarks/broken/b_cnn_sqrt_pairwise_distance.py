"""A small CNN learns a 16-D embedding of generated 16x16 images (bars, diagonals, blobs)
with a contrastive loss over all pairs of a batch: same-class pairs are pulled together,
other pairs pushed beyond a margin. The user computes the distance matrix by hand,
``torch.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))``, and masks out the diagonal by
multiplying it with zero. The diagonal distances are exactly 0 and the derivative of sqrt
at 0 is infinite: 0 * inf gives NaN gradients on the very first backward pass, although the
loss itself is finite.

benchmark: kind=nonfinite arch=cnn cause=sqrt_at_zero_in_backward
fix: sqrt(d2.clamp_min(1e-12)); broken final loss nan, fixed final loss 0.08483 (measured)
"""

import argparse

import torch
from torch import nn


def make_images(n, generator):
    """Four classes of 1x16x16 pictures with a little noise."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.randn(n, 1, 16, 16, generator=generator) * 0.3
    pos = torch.randint(3, 13, (n,), generator=generator)
    idx = torch.arange(16)
    for i in range(n):
        c, p = int(labels[i]), int(pos[i])
        if c == 0:
            images[i, 0, p, :] += 1.0
        elif c == 1:
            images[i, 0, :, p] += 1.0
        elif c == 2:
            images[i, 0, idx, idx] += 1.0
        else:
            images[i, 0, p - 3:p + 3, p - 3:p + 3] += 1.0
    return images, labels


class EmbeddingCNN(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, dim),
        )

    def forward(self, x):
        return self.net(x)


def contrastive_loss(emb, labels, margin=2.0):
    dist = torch.sqrt(((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1))
    same = (labels[:, None] == labels[None, :]).float()
    off_diagonal = 1.0 - torch.eye(len(labels))
    pull = same * dist ** 2
    push = (1 - same) * torch.relu(margin - dist) ** 2
    return ((pull + push) * off_diagonal).sum() / off_diagonal.sum()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_images(1600, g)
    model = EmbeddingCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x))
        total, batches = 0.0, 0
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            optimizer.zero_grad()
            loss = contrastive_loss(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
        print(f"epoch {epoch + 1}: contrastive loss {total / batches:.4g}")
    print(f"final loss {loss.item():.4g}")


if __name__ == "__main__":
    main()
