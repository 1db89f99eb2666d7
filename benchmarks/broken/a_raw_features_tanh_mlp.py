"""A tanh MLP predicts a building's daily energy use from its raw tabular features: floor area
in square metres (50-400), year built (1900-2020), number of occupants and the outdoor
temperature in degrees C. The user standardised the target but fed the features in their raw
units, so the first layer's pre-activations are in the hundreds: every tanh unit of the first
layer sits at +-1 for every building, passes no gradient, and the net predicts about the mean.

benchmark: kind=saturated_activation arch=mlp cause=unscaled-inputs-tanh
fix: standardise the features; broken final loss 0.425, fixed final loss 0.0067 (measured)
"""
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)

n = 2000
area = torch.empty(n).uniform_(50, 400)
year = torch.randint(1900, 2021, (n,)).float()
occupants = torch.randint(1, 7, (n,)).float()
temp = torch.empty(n).uniform_(-10, 35)
features = torch.stack([area, year, occupants, temp], dim=1)

# energy use: grows with area and occupants, older houses leak more, heating/cooling
energy = (0.08 * area * (1 + (2020 - year) / 150) + 3 * occupants
          + 0.02 * area * (temp - 18).abs() / 10 + torch.randn(n))
target = ((energy - energy.mean()) / energy.std()).unsqueeze(1)

x_train, y_train = features[:1600], target[:1600]
x_test, y_test = features[1600:], target[1600:]

model = nn.Sequential(
    nn.Linear(4, 64), nn.Tanh(),
    nn.Linear(64, 64), nn.Tanh(),
    nn.Linear(64, 1),
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.MSELoss()

for epoch in range(30):
    perm = torch.randperm(len(x_train))
    for i in range(0, len(x_train), 64):
        idx = perm[i:i + 64]
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        train_loss = loss_fn(model(x_train), y_train).item()
        test_loss = loss_fn(model(x_test), y_test).item()
    if epoch % 5 == 4:
        print(f"epoch {epoch + 1}: train mse {train_loss:.4f}  test mse {test_loss:.4f}")

print(f"final loss {train_loss:.4f}")
