"""A vanilla nn.RNN (tanh) reads 100-step sequences of sensor noise and must classify each
sequence by the event in its FIRST timestep (a +1/-1 marker on channel 0), read from the last
hidden state. The plain RNN multiplies the gradient by its recurrent Jacobian at every step, so
nothing from timestep 0 reaches the loss: the net stays at chance. PyTorch's default
uniform(+-1/sqrt(hidden)) recurrent init contracts the state by ~0.6x per step.

benchmark: kind=vanishing_gradient arch=rnn cause=vanilla-rnn-long-dependency
fix: orthogonal_(rnn.weight_hh_l0) init; broken final loss 0.702, fixed final loss 0.0017 (measured)
"""
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(3)

seq_len, channels, n = 100, 4, 2048


def make_batch(n):
    x = 0.5 * torch.randn(n, seq_len, channels)
    label = torch.randint(0, 2, (n,))
    x[:, :, 0] = 0.0
    x[:, 0, 0] = label.float() * 2 - 1        # the marker: +1 or -1 at t = 0, channel 0
    return x, label


x_train, y_train = make_batch(n)
x_val, y_val = make_batch(512)


class SeqClassifier(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.rnn = nn.RNN(channels, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


model = SeqClassifier()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
criterion = nn.CrossEntropyLoss()

step = 0
for epoch in range(10):
    perm = torch.randperm(n)
    for i in range(0, n, 64):
        idx = perm[i:i + 64]
        logits = model(x_train[idx])
        loss = criterion(logits, y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    with torch.no_grad():
        val_logits = model(x_val)
        val_loss = criterion(val_logits, y_val).item()
        acc = (val_logits.argmax(1) == y_val).float().mean().item()
    print(f"epoch {epoch} step {step}: loss {loss.item():.4f} "
          f"val loss {val_loss:.4f} acc {acc:.3f}")

print(f"final loss {val_loss:.4f}")
