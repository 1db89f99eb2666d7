"""An 8-layer all-convolutional tanh network classifies 16x16 images of a noisy line segment
by its orientation (4 classes). The user reused the DCGAN weights_init() helper,
nn.init.normal_(w, 0.0, 0.02), on every conv layer; with 16 channels that is a quarter of
the Xavier std, tanh passes the shrinking signal on unchanged, and the gradient reaching the first
conv layer is ~1e-5 of the last layer's, so the feature extractor never learns.

benchmark: kind=vanishing_gradient arch=cnn cause=dcgan-small-init-tanh
fix: xavier_uniform_(w, gain=5/3) init; broken final loss 1.388, fixed final loss 0.0018 (measured)
"""
import math

import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)


def make_images(n, size=16):
    """Noisy images of a line segment through a random point; label = its orientation."""
    labels = torch.randint(0, 4, (n,))
    angles = labels.float() * math.pi / 4
    centre = torch.rand(n, 2) * 6 + 5
    coords = torch.arange(size).float()
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx = xx[None] - centre[:, 0, None, None]
    dy = yy[None] - centre[:, 1, None, None]
    # distance of each pixel from the line through the centre
    dist = (dx * torch.sin(angles)[:, None, None] - dy * torch.cos(angles)[:, None, None]).abs()
    along = (dx * torch.cos(angles)[:, None, None] + dy * torch.sin(angles)[:, None, None]).abs()
    img = ((dist < 1.0) & (along < 5)).float()
    img = img + 0.3 * torch.randn_like(img)
    return img.unsqueeze(1), labels


x_train, y_train = make_images(1024)
x_test, y_test = make_images(256)


class ConvNet(nn.Module):
    def __init__(self, channels=16, depth=8, classes=4):
        super().__init__()
        layers = []
        c_in = 1
        for i in range(depth):
            stride = 2 if i in (2, 5) else 1
            layers += [nn.Conv2d(c_in, channels, 3, stride=stride, padding=1), nn.Tanh()]
            c_in = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.features(x)
        return self.head(h.mean(dim=(2, 3)))


def weights_init(m):
    # from the DCGAN tutorial
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight.data, 0.0, 0.02)
        nn.init.zeros_(m.bias)


model = ConvNet()
model.apply(weights_init)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
criterion = nn.CrossEntropyLoss()

for epoch in range(10):
    perm = torch.randperm(len(x_train))
    epoch_loss = 0.0
    for i in range(0, len(x_train), 32):
        idx = perm[i:i + 32]
        optimizer.zero_grad()
        loss = criterion(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        epoch_loss += loss.item() * len(idx)
    epoch_loss /= len(x_train)
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"epoch {epoch:2d}  loss {epoch_loss:.4f}  test acc {acc:.3f}")

print(f"final loss {epoch_loss:.4f}")
