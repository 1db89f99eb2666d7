"""A small Transformer encoder (2 layers, d_model 32, dropout 0.3) reads sequences of 20
tokens and says whether token A occurs more often than token B. The user tracks a held-out
set after every epoch, under ``torch.no_grad()``, but forgets ``model.eval()``: the
attention and feed-forward dropout stay on during validation, so the validation loss is
measured on a randomly thinned network, is worse than the model really is and differs
between two evaluations of the same weights (measured: validation loss 0.01918, then 0.02085
for the same weights; 0.002286 both times when fixed).

benchmark: kind=eval_mode arch=transformer cause=validation_without_model_eval
fix: model.eval() in evaluate(); broken final loss 0.01918, fixed final loss 0.002286 (measured)
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
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64, dropout=0.3,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(h.mean(dim=1))


def evaluate(model, loader, loss_fn):
    total, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for tokens, labels in loader:
            logits = model(tokens)
            total += loss_fn(logits, labels).item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return total / seen, correct / seen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_sequences(1600, g)
    xv, yv = make_sequences(400, g)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(xv, yv), batch_size=100)
    model = CountingTransformer()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for tokens, labels in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(tokens), labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
        val_loss, val_acc = evaluate(model, val_loader, loss_fn)
        print(f"epoch {epoch + 1}: train loss {total / len(x):.4g} "
              f"val loss {val_loss:.4g} val acc {val_acc:.3f}")
    first = evaluate(model, val_loader, loss_fn)
    second = evaluate(model, val_loader, loss_fn)
    print(f"final val loss {first[0]:.4g} (acc {first[1]:.3f}); "
          f"evaluated again: {second[0]:.4g} (acc {second[1]:.3f})")


if __name__ == "__main__":
    main()
