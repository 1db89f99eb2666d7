"""A small CNN classifies generated 16x16 images (horizontal bars, vertical bars, diagonals,
blobs) with SGD + momentum. The user adds a linear learning-rate warm-up with ``LambdaLR``
but writes the factor as ``step / warmup`` instead of ``min(1, step / warmup)``: the rate
never stops growing (0.05 at step 50, 0.4 at step 400): the loss first falls to almost
zero, then, once the rate is too high, climbs back to chance level (hundreds of times its
best) while most ReLU units die.

benchmark: kind=loss_divergence arch=cnn cause=warmup_schedule_not_capped
fix: min(1, (step + 1) / warmup); broken final loss 1.413, fixed final loss 8.565e-06 (measured)
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


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


class SmallCNN(nn.Module):
    def __init__(self, n_classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
                                  nn.Linear(32, n_classes))

    def forward(self, x):
        return self.head(self.features(x))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_images(1800, g)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda step: (step + 1) / args.warmup)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        total, correct, seen = 0.0, 0, 0
        for xb, yb in loader:
            optimizer.zero_grad()
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            optimizer.step()
            scheduler.step()  # warm-up, stepped per batch
            total += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
        lr = scheduler.get_last_lr()[0]
        print(f"epoch {epoch + 1}: loss {total / seen:.4g} acc {correct / seen:.3f} lr {lr:.3f}")
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    print(f"final loss {final:.4g}")


if __name__ == "__main__":
    main()
