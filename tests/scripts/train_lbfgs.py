"""An nn.Sequential trained by LBFGS: the model runs only inside the optimizer's closure."""

import json

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(200, 3)
y = x @ torch.tensor([[1.0], [2.0], [-1.0]])
model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
STEPS = 12
losses = []
for _ in range(STEPS):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses.append(float(opt.step(closure)))
print("SCRIPT_LOSSES=" + json.dumps(losses))
