"""Healthy runs get no finding of severity warning or error: five well-built models that
really learn (the loss falls), each watched from its first step to its last."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import gradwatch
from tests.conftest import kaiming_relu_mlp, residual_layernorm_mlp

Batch = tuple[torch.Tensor, torch.Tensor]



def fit(model: nn.Module, opt: torch.optim.Optimizer, batch: Callable[[int], Batch],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steps: int,
        clip: float | None = None) -> tuple[gradwatch.Report, list[float]]:
    """A plain mini-batch loop under ``gradwatch.watch``."""
    losses = []
    with gradwatch.watch(model, opt) as gw:
        for step in range(steps):
            x, y = batch(step)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            losses.append(loss.item())
    return gw.report(), losses


def minibatches(x: torch.Tensor, y: torch.Tensor, size: int) -> Callable[[int], Batch]:
    def batch(step: int) -> Batch:
        i = (step * size) % len(x)
        return x[i: i + size], y[i: i + size]
    return batch


def assert_healthy(report: gradwatch.Report, losses: list[float], drop: float) -> None:
    """The loss fell by ``drop``x (mean of the last 10 steps) and nothing was a problem."""
    assert sum(losses[-10:]) / 10 < losses[0] / drop, (losses[0], losses[-10:])
    assert report.run["internal_errors"] == []  # a crashed detector would hide findings
    assert report.run["steps"] == len(losses)
    problems = [(f.kind, f.severity, f.summary) for f in report.problems]
    assert problems == []


def generator(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def test_kaiming_relu_mlp_with_adam() -> None:
    g = generator(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.1 * x[:, :1] ** 2
    model = kaiming_relu_mlp()
    report, losses = fit(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                         minibatches(x, y, 64), nn.functional.mse_loss, 300)
    assert_healthy(report, losses, drop=5)
    assert [layer["name"] for layer in report.layers] == ["0", "2", "4", "6"]


def test_deep_residual_mlp_with_layernorm() -> None:
    """Thirteen linear layers deep, but skips and LayerNorm keep every layer's gradient."""
    g = generator(1)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()  # XOR-like: needs the depth
    model = residual_layernorm_mlp()
    report, losses = fit(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                         minibatches(x, y, 64), nn.functional.cross_entropy, 300)
    assert_healthy(report, losses, drop=20)


def patterns(n: int, g: torch.Generator) -> Batch:
    """8x8 single-channel images: noise plus one of four class-dependent strokes."""
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=g)
    x[y == 0, 0, 2, :] += 1.5  # a row
    x[y == 1, 0, :, 5] += 1.5  # a column
    x[y == 2, 0] += 1.5 * torch.eye(8)  # the diagonal
    x[y == 3, 0, 2:6, 2:6] += 0.8  # a square
    return x, y


def test_small_cnn_with_batchnorm_on_synthetic_images() -> None:
    g = generator(2)
    x, y = patterns(512, g)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 4))
    report, losses = fit(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                         minibatches(x, y, 64), nn.functional.cross_entropy, 150)
    assert_healthy(report, losses, drop=100)
    model.eval()
    x_test, y_test = patterns(256, g)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean()
    assert accuracy > 0.95


def test_logistic_regression_full_batch_sgd() -> None:
    g = generator(3)
    x = torch.randn(400, 5, generator=g)
    y = ((x @ torch.randn(5, generator=g) + 0.3 * torch.randn(400, generator=g)) > 0).float()
    model = nn.Linear(5, 1)
    report, losses = fit(model, torch.optim.SGD(model.parameters(), lr=0.5), lambda s: (x, y),
                         lambda out, t: nn.functional.binary_cross_entropy_with_logits(
                             out.squeeze(1), t), 200)
    assert_healthy(report, losses, drop=4)


class LastStepLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_lstm_with_gradient_clipping() -> None:
    """Sum of the last three of 15 inputs; gradients clipped at norm 1 (raw norms are seen)."""
    g = generator(4)
    x = torch.randn(512, 15, 1, generator=g)
    y = x[:, -3:, 0].sum(1, keepdim=True)
    model = LastStepLSTM()
    report, losses = fit(model, torch.optim.Adam(model.parameters(), lr=1e-2),
                         minibatches(x, y, 64), nn.functional.mse_loss, 200, clip=1.0)
    assert_healthy(report, losses, drop=100)
    assert [layer["name"] for layer in report.layers] == ["lstm", "head"]


def test_gelu_mlp_with_adamw() -> None:
    g = generator(5)
    x = torch.randn(512, 16, generator=g)
    y = torch.tanh(x[:, :4].sum(1, keepdim=True)) + 0.1 * x[:, 4:5]
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    report, losses = fit(model, torch.optim.AdamW(model.parameters(), lr=3e-3),
                         minibatches(x, y, 64), nn.functional.mse_loss, 200)
    assert_healthy(report, losses, drop=5)
    assert report.series["dead_fraction"] == {}  # GELU has no dead units to report


class TinyEncoder(nn.Module):
    """Token classification with a Transformer encoder (dropout inside, F.relu FFN)."""

    def __init__(self, vocab: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(12, dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos))


def test_transformer_encoder_with_dropout_and_eval_validation() -> None:
    g = generator(6)
    model = TinyEncoder()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []

    def batch() -> Batch:
        tokens = torch.randint(0, 16, (32, 12), generator=g)
        return tokens, (3 * tokens + 1) % 16  # a per-token mapping

    with gradwatch.watch(model, opt) as gw:
        for step in range(150):
            x, y = batch()
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % 50 == 49:
                model.eval()
                with torch.no_grad():
                    xv, yv = batch()
                    nn.functional.cross_entropy(model(xv).flatten(0, 1), yv.flatten())
                model.train()
    report = gw.report()
    assert_healthy(report, losses, drop=3)
    # The feed-forward ReLU runs as a functional call inside each encoder layer.
    assert {"encoder.layers.0.relu@1", "encoder.layers.1.relu@1"} <= \
        set(report.series["dead_fraction"])


def test_fine_tuning_a_head_on_a_frozen_backbone_in_eval_mode() -> None:
    # The backbone gets no gradient by design (requires_grad False, eval mode for its
    # BatchNorm): no vanishing gradient, no dead or frozen layers, no eval-mode finding.
    g = generator(5)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                             nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    backbone.requires_grad_(False)
    backbone.eval()
    model = nn.Sequential(backbone, nn.Linear(32, 4))
    y = torch.randint(0, 4, (512,), generator=g)
    x = torch.randn(512, 3, 16, 16, generator=g) + y.view(-1, 1, 1, 1).float()
    opt = torch.optim.Adam(model[1].parameters(), lr=1e-2)
    report, losses = fit(model, opt, minibatches(x, y, 64), nn.functional.cross_entropy, 160)
    assert_healthy(report, losses, drop=1.5)
    assert all(not p.requires_grad for p in backbone.parameters())


class GaussianVAE(nn.Module):
    """The layout of pytorch/examples' VAE (encoder, mean and log-variance heads, the
    reparameterisation, decoder) with a Gaussian likelihood."""

    def __init__(self, n: int = 256, hidden: int = 200, latent: int = 20) -> None:
        super().__init__()
        self.fc1, self.fc3 = nn.Linear(n, hidden), nn.Linear(latent, hidden)
        self.fc21, self.fc22 = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.fc4 = nn.Linear(hidden, n)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.fc4(torch.relu(self.fc3(z))), mu, logvar


def test_vae_whose_kl_term_rises_while_the_reconstruction_falls() -> None:
    # The KL term grows from ~0.6 to ~24 while the reconstruction error falls 5x: the loss
    # is a sum of two terms pulling against each other, not a plateau, spike or divergence.
    g = generator(6)
    proj = torch.randn(16, 256, generator=g) / 2
    model = GaussianVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, kls = [], []
    with gradwatch.watch(model, opt) as gw:
        for _ in range(300):
            x = torch.tanh(torch.randn(128, 16, generator=g) @ proj)
            recon, mu, logvar = model(x)
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / 128
            loss = nn.functional.mse_loss(recon, x, reduction="sum") / 128 + kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            kls.append(kl.item())
    assert kls[-1] > 10 * kls[0]
    assert_healthy(gw.report(), losses, drop=2)
