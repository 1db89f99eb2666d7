"""An encoder and a decoder, each with its own optimizer, both stepped every iteration."""

import json

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(64, 8)
encoder = nn.Sequential(nn.Linear(8, 4), nn.Tanh())
decoder = nn.Sequential(nn.Linear(4, 8))
opt_encoder = torch.optim.SGD(encoder.parameters(), lr=0.1)
opt_decoder = torch.optim.Adam(decoder.parameters(), lr=1e-2)
ITERATIONS = 10
losses = []
for _ in range(ITERATIONS):
    opt_encoder.zero_grad()
    opt_decoder.zero_grad()
    loss = nn.functional.mse_loss(decoder(encoder(x)), x)
    loss.backward()
    losses.append(loss.item())
    opt_encoder.step()
    opt_decoder.step()
print("SCRIPT_LOSSES=" + json.dumps(losses))
