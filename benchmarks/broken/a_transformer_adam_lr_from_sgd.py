"""A 2-layer nn.TransformerEncoder classifies 20-token sequences: does token "A" occur more
often than token "B"? The user first trained it with SGD(lr=0.1), then switched to Adam and
kept lr=0.1, a hundred times Adam's usual rate: every Adam step moves every weight by ~0.1
whatever its gradient, the first steps wreck the attention and feed-forward weights, and the
encoder collapses to an output that no longer depends on the tokens. The classifier then
predicts the majority class for every sequence and the loss sits at the prior's entropy.

benchmark: kind=loss_plateau arch=transformer cause=adam-with-sgd-learning-rate missed=yes
fix: Adam lr=1e-3; broken final loss 0.672, fixed final loss 0.0010 (measured)
"""
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)

vocab, seq_len, n = 16, 20, 1280
TOKEN_A, TOKEN_B = 1, 2


def make_data(n):
    tokens = torch.randint(3, vocab, (n, seq_len))
    counts = torch.randint(0, 5, (n, 2))
    for k in range(n):
        pos = torch.randperm(seq_len)[: counts[k].sum()]
        tokens[k, pos[: counts[k, 0]]] = TOKEN_A
        tokens[k, pos[counts[k, 0]:]] = TOKEN_B
    label = (counts[:, 0] > counts[:, 1]).long()
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
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(h.mean(dim=1))


model = Classifier()
optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
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
        total += loss.item() * len(idx)
    model.eval()
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    print(f"epoch {epoch + 1:2d}  loss {total / n:.4f}  val acc {acc:.3f}")

print(f"final loss {total / n:.4f}")
