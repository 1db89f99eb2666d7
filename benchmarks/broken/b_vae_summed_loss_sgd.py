"""A small VAE (4-dimensional latent) learns 32-feature data that lie near a 2-D manifold.
The user copies the loss of the PyTorch VAE example, summed over the batch and the features
(``reduction="sum"`` plus a summed KL term), but trains with plain SGD at lr 1e-3 instead of
the example's Adam: the summed loss makes every gradient 64x (the batch size) larger than
a per-sample loss would, the encoder's log-variance overshoots and ``logvar.exp()`` in the
KL term blows up within a few steps.

benchmark: kind=loss_divergence arch=vae cause=summed_loss_with_sgd_kl_blowup
fix: Adam lr 1e-3; broken final loss nan, fixed final loss 6.823 (measured)
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def make_data(n, generator, dim=32):
    """Points of a curved 2-D manifold embedded in 32 dimensions, standardised."""
    z = torch.randn(n, 2, generator=generator)
    w1 = torch.randn(2, 64, generator=generator)
    w2 = torch.randn(64, dim, generator=generator) / 8
    x = torch.tanh(z @ w1) @ w2 + 0.05 * torch.randn(n, dim, generator=generator)
    return (x - x.mean(0)) / x.std(0)


class VAE(nn.Module):
    def __init__(self, dim=32, hidden=128, latent=4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU())
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


def vae_loss(recon, x, mu, logvar):
    rec = F.mse_loss(recon, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return rec + kld, kld


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = make_data(2048, g)
    model = VAE()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x))
        total, total_kl = 0.0, 0.0
        for i in range(0, len(x), 64):
            xb = x[perm[i:i + 64]]
            optimizer.zero_grad()
            recon, mu, logvar = model(xb)
            loss, kld = vae_loss(recon, xb, mu, logvar)
            loss.backward()
            optimizer.step()
            total += loss.item()
            total_kl += kld.item()
        print(f"epoch {epoch + 1}: loss/sample {total / len(x):.4g} "
              f"kl/sample {total_kl / len(x):.4g}")
    print(f"final loss {loss.item() / len(xb):.4g}")


if __name__ == "__main__":
    main()
