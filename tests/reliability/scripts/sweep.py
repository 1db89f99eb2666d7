"""A hyper-parameter sweep: build, train and drop one model after another.

Prints ALIVE=<models still alive at the end> and RSS_GROWTH_MIB=<growth after the warm-up>.
"""

import gc
import sys
import weakref

import torch
from torch import nn

MODELS = int(sys.argv[1]) if len(sys.argv) > 1 else 30


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


torch.manual_seed(0)
x, y = torch.randn(32, 1000), torch.randn(32, 1)
refs = []
start = 0.0
for i in range(MODELS):
    model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    refs.append((weakref.ref(model), weakref.ref(optimizer)))
    del model, optimizer, loss
    gc.collect()
    if i == 4:
        start = rss_mib()
print(f"ALIVE={sum(m() is not None or o() is not None for m, o in refs)}")
print(f"RSS_GROWTH_MIB={rss_mib() - start:.1f}")
