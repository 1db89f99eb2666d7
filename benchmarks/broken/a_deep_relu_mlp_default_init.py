"""A 20-layer ReLU MLP (64 wide, no normalisation, no skip connections) classifies 16-feature
vectors into 5 classes. The user made the net deep "for capacity" and trusted PyTorch's
default nn.Linear init, kaiming_uniform_(a=sqrt(5)), whose std 1/sqrt(3 * fan_in) is 0.41x the
He/Kaiming std a ReLU stack needs: signal and gradient shrink ~2x per layer, the first layer
gets ~1e-6 of the last one's gradient norm, and even Adam trains the net far worse than it
should.

benchmark: kind=vanishing_gradient arch=mlp cause=default-init-deep-relu-stack
fix: kaiming_normal_ init, zero bias; broken final loss 0.668, fixed final loss 0.175 (measured)
"""
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)

n, d, classes = 1500, 16, 5
x = torch.randn(n, d)
prototypes = torch.randn(classes, d)
y = torch.cdist(x, prototypes).argmin(dim=1)      # label: the nearest prototype
x_train, y_train, x_val, y_val = x[:1200], y[:1200], x[1200:], y[1200:]

depth, width = 20, 64
layers = [nn.Linear(d, width), nn.ReLU()]
for _ in range(depth - 2):
    layers += [nn.Linear(width, width), nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(width, classes))

optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.CrossEntropyLoss()

for epoch in range(15):
    perm = torch.randperm(len(x_train))
    total = 0.0
    for i in range(0, len(x_train), 50):
        idx = perm[i:i + 50]
        loss = criterion(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    if epoch % 3 == 2:
        print(f"epoch {epoch + 1:2d}  loss {total / len(x_train):.4f}  val acc {acc:.3f}")

print(f"final loss {total / len(x_train):.4f}")
