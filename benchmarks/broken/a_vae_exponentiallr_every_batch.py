"""A convolutional VAE learns 16x16 images of soft blobs (random position, size and
brightness). The user adds ExponentialLR(gamma=0.9) meaning "decay the learning rate by 10%
per epoch", but calls scheduler.step() after every optimizer.step(): the rate is multiplied
by 0.9 every BATCH, is ~1e-7 of its start after 150 batches, and the weights freeze
while the reconstructions are still blurry averages that encode almost nothing (KL ~0.4 nats).

benchmark: kind=loss_plateau arch=vae cause=exponentiallr-stepped-per-batch
fix: scheduler.step() once per epoch; broken final loss 25.1, fixed final loss 8.06 (measured)
"""
import torch
from torch import nn
from torch.nn import functional as F

torch.set_num_threads(1)
torch.manual_seed(0)

size, latent = 16, 4


def make_blobs(n):
    coords = torch.arange(size).float()
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cy, cx = (3 + 10 * torch.rand(2, n, 1, 1)).unbind(0)
    width = 1.5 + 2.0 * torch.rand(n, 1, 1)
    bright = 0.5 + 1.5 * torch.rand(n, 1, 1)
    img = bright * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
    return img.unsqueeze(1)


data = make_blobs(1280)


class ConvVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),     # 8x8
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),    # 4x4
            nn.Flatten(), nn.Linear(32 * 4 * 4, 2 * latent),
        )
        self.dec_fc = nn.Linear(latent, 32 * 4 * 4)
        self.dec = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),   # 8x8
            nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),               # 16x16
        )

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(self.dec_fc(z).view(-1, 32, 4, 4)), mu, logvar


model = ConvVAE()
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)

for epoch in range(10):
    perm = torch.randperm(len(data))
    total = 0.0
    for i in range(0, len(data), 32):
        x = data[perm[i:i + 32]]
        recon, mu, logvar = model(x)
        rec = F.mse_loss(recon, x, reduction="sum") / len(x)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
        loss = rec + kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(x)
    print(f"epoch {epoch + 1:2d}  lr {scheduler.get_last_lr()[0]:.1e}  "
          f"loss {total / len(data):.3f}")

print(f"final loss {total / len(data):.3f}")
