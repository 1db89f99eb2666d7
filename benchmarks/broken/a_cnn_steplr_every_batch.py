"""A small CNN classifies 16x16 images of three shapes (filled square, ring, plus sign) at
random positions and sizes. The user wants the usual schedule, "divide the learning rate by 10
every 5 epochs", with StepLR(step_size=5, gamma=0.1), but calls scheduler.step() inside the
batch loop instead of once per epoch: the learning rate is divided by 10 every 5 BATCHES, so
after 40 batches it is 1e-8 of its start and the weights stop moving long before the net has
learned the shapes.

benchmark: kind=loss_plateau arch=cnn cause=steplr-stepped-per-batch
fix: scheduler.step() once per epoch; broken final loss 1.095, fixed final loss 0.0166 (measured)
"""
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)


def make_shapes(n, size=16):
    coords = torch.arange(size).float()
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    labels = torch.randint(0, 3, (n,))
    cx = 4 + 8 * torch.rand(n, 1, 1)
    cy = 4 + 8 * torch.rand(n, 1, 1)
    r = 2.5 + 1.5 * torch.rand(n, 1, 1)
    dx, dy = (xx - cx).abs(), (yy - cy).abs()
    square = ((dx <= r) & (dy <= r)).float()
    dist = (dx ** 2 + dy ** 2).sqrt()
    ring = ((dist - r).abs() < 0.8).float()
    plus = (((dx < 0.8) & (dy <= r)) | ((dy < 0.8) & (dx <= r))).float()
    img = torch.where(labels[:, None, None] == 0, square,
                      torch.where(labels[:, None, None] == 1, ring, plus))
    img = img + 0.2 * torch.randn(n, size, size)
    return img.unsqueeze(1), labels


x_train, y_train = make_shapes(1200)
x_val, y_val = make_shapes(300)

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
    nn.Linear(64, 3),
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.1)
criterion = nn.CrossEntropyLoss()

for epoch in range(12):
    model.train()
    perm = torch.randperm(len(x_train))
    total = 0.0
    for i in range(0, len(x_train), 32):
        idx = perm[i:i + 32]
        optimizer.zero_grad()
        loss = criterion(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(idx)
    model.eval()
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    print(f"epoch {epoch:2d}  lr {scheduler.get_last_lr()[0]:.2e}  "
          f"loss {total / len(x_train):.4f}  val acc {acc:.3f}")

print(f"final loss {total / len(x_train):.4f}")
