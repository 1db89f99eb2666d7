"""A small Transformer encoder (2 layers, d_model 32) reads sequences of 20 tokens and says
whether token A occurs more often than token B. The user trains it with SGD + momentum 0.9
at lr 0.8, a rate carried over from an earlier model: every update is far too large for the
attention and feed-forward weights, the cross-entropy climbs by orders of magnitude within
the first epoch instead of falling, and the run ends in NaN.

benchmark: kind=loss_divergence arch=transformer cause=sgd_momentum_lr_too_high
fix: SGD lr 0.01; broken final loss nan, fixed final loss 0.01637 (measured)
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, LENGTH = 16, 20


def make_sequences(n, generator):
    """Random tokens 2..15 with a few A (0) and B (1) tokens sprinkled in; label: more A."""
    x = torch.randint(2, VOCAB, (n, LENGTH), generator=generator)
    n_a = torch.randint(0, 7, (n,), generator=generator)
    n_b = torch.randint(0, 7, (n,), generator=generator)
    for i in range(n):
        pos = torch.randperm(LENGTH, generator=generator)[: int(n_a[i] + n_b[i])]
        x[i, pos[: int(n_a[i])]] = 0
        x[i, pos[int(n_a[i]):]] = 1
    return x, (n_a > n_b).long()


class CountingTransformer(nn.Module):
    def __init__(self, d_model=32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(1, LENGTH, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(h.mean(dim=1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.8)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_sequences(2000, g)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = CountingTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        total, correct = 0.0, 0
        for tokens, labels in loader:
            optimizer.zero_grad()
            logits = model(tokens)
            loss = loss_fn(logits, labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
        print(f"epoch {epoch + 1}: loss {total / len(x):.4g} acc {correct / len(x):.3f}")
    print(f"final loss {loss.item():.4g}")


if __name__ == "__main__":
    main()
