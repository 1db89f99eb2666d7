"""A small fully-connected VAE learns 12x12 grey-scale images of rings (random centre, radius
and thickness). The user standardised the pixels the way the MNIST tutorials do,
(x - mean) / std, and reconstructs that standardised tensor, but kept the decoder's final
nn.Sigmoid from a [0, 1]-pixel example: the background pixels' targets are now about -0.5
and the ring's up to ~3, out of the sigmoid's reach, so training pushes most decoder outputs
onto the sigmoid's flat ends (below 0.01 or above 0.99), where they stay, and the
reconstruction error stays high. The saturation sets in gradually: 50% of the outputs by step
~200, 70% at the end (step 640).

benchmark: kind=saturated_activation arch=vae cause=sigmoid-decoder-standardised-targets missed=yes
fix: drop the decoder's last nn.Sigmoid; broken final loss 84.1, fixed final loss 37.1 (measured)
"""
import torch
from torch import nn
from torch.nn import functional as F

torch.set_num_threads(1)
torch.manual_seed(0)

size, latent = 12, 4


def make_rings(n):
    coords = torch.arange(size).float()
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centre = 3.5 + 4 * torch.rand(n, 2)
    radius = 1.5 + 2.5 * torch.rand(n, 1, 1)
    width = 0.6 + 0.6 * torch.rand(n, 1, 1)
    dist = ((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2).sqrt()
    img = torch.exp(-((dist - radius) / width) ** 2)
    return img.reshape(n, -1)


images = make_rings(2000)
mean, std = images.mean(), images.std()
data = (images - mean) / std


class VAE(nn.Module):
    def __init__(self, d=size * size, hidden=128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(),
            nn.Linear(hidden, d), nn.Sigmoid(),
        )

    def forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decoder(z), mu, logvar


model = VAE()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

for epoch in range(20):
    perm = torch.randperm(len(data))
    total = 0.0
    for i in range(0, len(data), 64):
        x = data[perm[i:i + 64]]
        recon, mu, logvar = model(x)
        rec_loss = F.mse_loss(recon, x, reduction="sum") / len(x)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
        loss = rec_loss + kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
    if epoch % 4 == 3:
        print(f"epoch {epoch + 1}: loss {total / len(data):.2f} "
              f"(last batch rec {rec_loss.item():.2f}, kl {kl.item():.2f})")

print(f"final loss {total / len(data):.3f}")
