"""A 2-layer nn.TransformerEncoder classifies 20-token sequences into 3 classes: which of the
tokens "A", "B", "C" occurs most often. The user copied the classic ImageNet schedule,
MultiStepLR(milestones=[30, 60, 90], gamma=0.1), meant in epochs, but steps the scheduler
after every batch: by batch 90 the learning rate is 1e-3 of its start (Adam lr 1e-6), long
before the model has found the counting solution, and the loss barely moves afterwards
(0.63 -> 0.62 over the last 230 steps; the fixed schedule reaches 0.002).

benchmark: kind=loss_plateau arch=transformer cause=multisteplr-stepped-per-batch missed=yes
fix: scheduler.step() once per epoch; broken final loss 0.624, fixed final loss 0.0024 (measured)
"""
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)

vocab, seq_len, n = 16, 20, 1280
MARKERS = 3                      # tokens 0, 1, 2 are "A", "B", "C"


def make_data(n):
    tokens = torch.randint(MARKERS, vocab, (n, seq_len))
    label = torch.randint(0, MARKERS, (n,))
    for k in range(n):
        counts = torch.randint(1, 4, (MARKERS,))
        counts[label[k]] = counts.max() + 1          # the label's token is the most frequent
        pos = torch.randperm(seq_len)[: counts.sum()].split(counts.tolist())
        for token, where in enumerate(pos):
            tokens[k, where] = token
    return tokens, label


x_train, y_train = make_data(n)
x_val, y_val = make_data(400)


class Classifier(nn.Module):
    def __init__(self, d_model=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64,
                                           dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(d_model, MARKERS)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(h.mean(dim=1))


model = Classifier()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[30, 60, 90], gamma=0.1)
criterion = nn.CrossEntropyLoss()

for epoch in range(8):
    model.train()
    perm = torch.randperm(n)
    total = 0.0
    for i in range(0, n, 32):
        idx = perm[i:i + 32]
        loss = criterion(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(idx)
    model.eval()
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    print(f"epoch {epoch + 1:2d}  loss {total / n:.4f}  val acc {acc:.3f}")

print(f"final loss {total / n:.4f}")
