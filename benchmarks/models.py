"""The benchmarks' models: the CPU cases of ``overhead.py`` and the GPT-style models of its
``--gpu`` mode (8192 tokens a step: 8 sequences of 1024 tokens, run under bf16 autocast)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to benchmark: how to build it and what its batches look like."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    classes: int = 10
    tokens: bool = False  # inputs are token ids < classes, targets one per token


def mlp(in_features: int, width: int, hidden_layers: int, classes: int = 10) -> nn.Sequential:
    """A plain ReLU MLP with Kaiming-uniform (PyTorch default) init."""
    layers: list[nn.Module] = [nn.Linear(in_features, width), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def small_cnn(classes: int = 10) -> nn.Sequential:
    """Three conv + BatchNorm + ReLU blocks and a linear head, for 3x32x32 inputs."""
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


class SequenceClassifier(nn.Module):
    """A 2-layer LSTM read at its last step: exercises the per-timestep gradient probe."""

    def __init__(self, features: int = 32, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class TokenEncoder(nn.Module):
    """A 2-layer Transformer encoder (functional ReLU and dropout inside), mean-pooled."""

    def __init__(self, features: int = 32, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.proj = nn.Linear(features, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=128, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x)).mean(1))


CASES = {
    "mlp-1m": Case("mlp-1m", lambda: mlp(256, 512, 4), (256,), 256),
    "mlp-10m": Case("mlp-10m", lambda: mlp(1024, 1664, 4), (1024,), 256),
    "cnn": Case("cnn", small_cnn, (3, 32, 32), 128),
    "lstm": Case("lstm", SequenceClassifier, (50, 32), 64),
    "transformer": Case("transformer", TokenEncoder, (32, 32), 64),
    # A small GPT-style language model (below): its logits are batch x tokens x vocabulary.
    "gpt-small": Case("gpt-small", lambda: GPT(4, 256, 4, vocab=4096, context=64), (64,), 4,
                      classes=4096, tokens=True),
}


class Block(nn.Module):
    """A pre-norm GPT block: causal self-attention (scaled_dot_product_attention), GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-2-style language model (learned positions, tied embedding and head)."""

    def __init__(self, layers: int = 12, dim: int = 768, heads: int = 12,
                 vocab: int = 50304, context: int = 1024) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# --gpu: 8 x 1024 = 8192 tokens a step; inputs are token ids, targets the next tokens.
GPU_CASES = {
    "gpt-124m": Case("gpt-124m", GPT, (1024,), 8, classes=50304, tokens=True),
    "gpt-350m": Case("gpt-350m", lambda: GPT(24, 1024, 16), (1024,), 8, classes=50304,
                     tokens=True),
}
