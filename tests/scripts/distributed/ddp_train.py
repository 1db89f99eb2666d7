"""A DDP (or FSDP2) training script on gloo/CPU for gradwatch's distributed tests.

Environment knobs (all optional): STEPS (default 60), NAN_RANK/NAN_STEP (put a NaN into
that rank's batch at that step), EXPLODE=1 (unscaled inputs ~1e3 on one Linear, with LR
past the stability limit it explodes on every rank, as in test_exploding.py), LR and SCALE
(learning rate, input scale), RAISE_RANK/RAISE_STEP (that rank raises at that step),
WRAP=ddp|fsdp, ROOT_PARAM=1 (the root owns a parameter too: under FSDP2 its unsharded copy
sits in the autograd graph), SAVE (where rank 0 saves the final weights), LATE_INIT=1
(init_process_group after the model is built).
"""

import os

import torch
import torch.distributed as dist
from torch import nn

env = os.environ.get
steps = int(env("STEPS", "60"))
nan_rank, nan_step = int(env("NAN_RANK", "-1")), int(env("NAN_STEP", "-1"))
raise_rank, raise_step = int(env("RAISE_RANK", "-1")), int(env("RAISE_STEP", "-1"))
wrap = env("WRAP", "ddp")

if env("LATE_INIT") != "1":
    dist.init_process_group("gloo")
torch.manual_seed(0)
explode = env("EXPLODE") == "1"
net = nn.Linear(8, 1) if explode else \
    nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


class Scaled(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.gain = body, nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.gain


if env("ROOT_PARAM") == "1":
    net = Scaled(net)
if env("LATE_INIT") == "1":
    dist.init_process_group("gloo")
rank = dist.get_rank()
if wrap == "fsdp":
    from torch.distributed.fsdp import fully_shard

    for layer in net.modules():
        if isinstance(layer, nn.Linear) and layer is not net:
            fully_shard(layer)
    model = fully_shard(net)
else:
    model = nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(model.parameters(), lr=float(env("LR", "1e-7" if explode else "0.05")))
gen = torch.Generator().manual_seed(1 + rank)
w_true = torch.randn(8, 1, generator=torch.Generator().manual_seed(7))
for step in range(steps):
    x = torch.randn(16, 8, generator=gen) * float(env("SCALE", "1"))
    if explode:
        x = 1000 + 300 * torch.randn(64, 8, generator=torch.Generator().manual_seed(rank))
    y = x @ w_true
    if rank == nan_rank and step == nan_step:
        x[0, 0] = float("nan")
    if rank == raise_rank and step == raise_step:
        raise RuntimeError(f"rank {rank} fails at step {step}")
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
if env("SAVE") and rank == 0:
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
             for k, v in net.state_dict().items()}
    torch.save(state, env("SAVE"))
dist.barrier()
dist.destroy_process_group()
