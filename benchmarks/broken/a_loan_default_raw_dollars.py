"""A loan-default classifier: an MLP with an nn.Sigmoid output trained with nn.BCELoss on
five applicant features taken straight from the database: annual income and loan amount in
dollars, credit score (300-850), age and months employed. Nobody scaled them, so the logits
come out in the thousands, the output sigmoid returns exactly 0.0 or 1.0 for every applicant,
and BCELoss's gradient through a sigmoid whose slope is exactly 0 is 0: the weights never
move and the loss is the clamped log(0) of every wrongly classified applicant.

benchmark: kind=saturated_activation arch=mlp cause=raw-dollar-features-sigmoid-output
fix: standardise the features; broken final loss 74.4, fixed final loss 0.178 (measured)
"""
import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)

n = 3000
income = torch.empty(n).uniform_(18_000, 180_000)
loan = torch.empty(n).uniform_(2_000, 60_000)
score = torch.empty(n).uniform_(300, 850)
age = torch.empty(n).uniform_(19, 75)
employed = torch.empty(n).uniform_(0, 360)
X = torch.stack([income, loan, score, age, employed], dim=1)

# the true risk: a high loan-to-income ratio and a low credit score raise it
risk = 9 * loan / income - 0.012 * (score - 575) - 0.004 * (employed - 180) - 1.0
y = torch.bernoulli(torch.sigmoid(2 * risk))
print(f"default rate {y.mean():.3f}")

X_train, y_train, X_val, y_val = X[:2400], y[:2400], X[2400:], y[2400:]

model = nn.Sequential(
    nn.Linear(5, 32), nn.ReLU(),
    nn.Linear(32, 32), nn.ReLU(),
    nn.Linear(32, 1), nn.Sigmoid(),
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.BCELoss()

for epoch in range(15):
    perm = torch.randperm(len(X_train))
    running = 0.0
    for i in range(0, len(X_train), 64):
        idx = perm[i:i + 64]
        p = model(X_train[idx]).squeeze(1)
        loss = criterion(p, y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item() * len(idx)
    with torch.no_grad():
        p_val = model(X_val).squeeze(1)
        val_loss = criterion(p_val, y_val).item()
        acc = ((p_val > 0.5).float() == y_val).float().mean().item()
    print(f"epoch {epoch + 1:2d}  train bce {running / len(X_train):.4f}  "
          f"val bce {val_loss:.4f}  val acc {acc:.3f}")

print(f"final loss {running / len(X_train):.4f}")
