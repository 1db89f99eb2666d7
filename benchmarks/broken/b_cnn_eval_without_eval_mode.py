"""A CNN with BatchNorm and Dropout classifies generated 16x16 images (bars, diagonals,
blobs). After each epoch the user computes the validation loss and accuracy inside
``torch.no_grad()`` but never calls ``model.eval()``: Dropout still drops half of the
features and BatchNorm normalises each validation batch with its own statistics (and mixes
them into its running averages), so the reported validation numbers are noisy, too
pessimistic and change from one evaluation of the same weights to the next (measured:
validation loss 0.07525, then 0.0645 for the same weights; 0.0002267 both times when fixed).

benchmark: kind=eval_mode arch=cnn cause=validation_without_model_eval
fix: model.eval() in evaluate(); broken final loss 0.07525, fixed final loss 0.0002267 (measured)
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


class BNDropoutCNN(nn.Module):
    def __init__(self, n_classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16 * 4 * 4, 32),
                                  nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, n_classes))

    def forward(self, x):
        return self.head(self.features(x))


def evaluate(model, loader, loss_fn):
    total, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for xb, yb in loader:
            logits = model(xb)
            total += loss_fn(logits, yb).item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
    return total / seen, correct / seen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_images(1600, g)
    xv, yv = make_images(400, g)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(xv, yv), batch_size=50)
    model = BNDropoutCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for xb, yb in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
        val_loss, val_acc = evaluate(model, val_loader, loss_fn)
        print(f"epoch {epoch + 1}: train loss {total / len(x):.4g} "
              f"val loss {val_loss:.4g} val acc {val_acc:.3f}")
    first = evaluate(model, val_loader, loss_fn)
    second = evaluate(model, val_loader, loss_fn)
    print(f"final val loss {first[0]:.4g} (acc {first[1]:.3f}); "
          f"evaluated again: {second[0]:.4g} (acc {second[1]:.3f})")


if __name__ == "__main__":
    main()
