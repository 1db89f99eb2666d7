"""gradwatch.watch on a DistributedDataParallel model, with init_process_group called after
the watch started. Rank 0 saves its report's JSON to the path in argv[1]."""

import sys

import torch
import torch.distributed as dist
from torch import nn

import gradwatch

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(net.parameters(), lr=0.05)
with gradwatch.watch(net, opt, sync_every=5) as gw:
    dist.init_process_group("gloo")  # after gradwatch started
    rank = dist.get_rank()
    model = nn.parallel.DistributedDataParallel(net)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(20):
        x = torch.randn(8, 4, generator=gen)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
if rank == 0:
    gw.report().save(sys.argv[1])
with gradwatch.watch(model, opt) as gw2:  # a DDP model given to watch: its module is watched
    loss = nn.functional.mse_loss(model(torch.randn(8, 4)), torch.zeros(8, 1))
    loss.backward()
    opt.step()
if rank == 0:
    gw2.report().save(sys.argv[1].replace(".json", ".ddp.json"))
dist.destroy_process_group()
