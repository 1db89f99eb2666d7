"""A DDP script that watches on rank 0 only: gradwatch must not wait for a rank that runs no
gradwatch (no group of its own, no end summary). Rank 0 saves its report to argv[1]."""

import contextlib
import sys

import torch
import torch.distributed as dist
from torch import nn

import gradwatch

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
model = nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
watching = gradwatch.watch(model, opt, sync_every=5) if rank == 0 else contextlib.nullcontext()
with watching as gw:
    gen = torch.Generator().manual_seed(rank)
    for _ in range(20):
        x = torch.randn(8, 4, generator=gen)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
if rank == 0:
    gw.report().save(sys.argv[1])
dist.destroy_process_group()
