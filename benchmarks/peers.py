"""Other tools that watch training, run as ``overhead.py``'s peers of ``gradwatch.watch``.

Each peer wraps one copy of the model (its own copy: ``wandb.watch`` hooks the model it is
given) and replaces the benchmark's training step by the same step with the peer's
monitoring added, as its documentation recommends:

- ``lightning-grad-norm``: ``lightning.pytorch.utilities.grad_norm(model, norm_type=2)``
  every step, between ``backward()`` and ``optimizer.step()`` (what Lightning's
  ``on_before_optimizer_step`` recipe calls).
- ``tb-histograms``: ``SummaryWriter.add_histogram`` of every parameter and its gradient
  every 100 steps (a local event file).
- ``wandb-all-1`` / ``wandb-all-100``: ``wandb.watch(model, log="all", log_freq=1 | 100)``
  in an offline run, with ``wandb.log({"loss": ...})`` every step (wandb writes what its
  hooks gathered on ``log``; a run watched with wandb logs its loss anyway).
- ``anomaly``: ``torch.autograd.set_detect_anomaly(True)`` around this copy's steps only.
- ``cockpit-economy``: Cockpit's "economy" configuration (BackPACK extensions of the model
  and the loss), where ``cockpit-for-pytorch`` installs and BackPACK supports the layers.

A peer that cannot run says why (:func:`unavailable`), and the benchmark reports that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
Step = Callable[[Batch, int], None]  # one training step of the peer's copy: (batch, k)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (the ``--gpu`` mode), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the model's output (classes last; token targets are flattened)."""
    x, y = batch
    with autocast(x.device):
        out = model(x)
        return F.cross_entropy(out.flatten(0, -2).float(), y.flatten())


def finish(opt: torch.optim.Optimizer) -> None:
    opt.step()
    opt.zero_grad(set_to_none=True)


@dataclasses.dataclass(frozen=True)
class Peer:
    """A monitoring tool: ``start`` returns its training step and a ``close``."""

    name: str
    period: int  # steps after which its cost pattern repeats
    needs: tuple[str, ...]  # importable modules it needs
    start: Callable[[nn.Module, torch.optim.Optimizer, str],
                    tuple[Step, Callable[[], None]]]
    note: str = ""


def _lightning(model: nn.Module, opt: torch.optim.Optimizer, tmp: str
               ) -> tuple[Step, Callable[[], None]]:
    from lightning.pytorch.utilities import grad_norm

    def step(batch: Batch, k: int) -> None:
        loss_of(model, batch).backward()
        grad_norm(model, norm_type=2)
        finish(opt)
    return step, lambda: None


def _tensorboard(model: nn.Module, opt: torch.optim.Optimizer, tmp: str
                 ) -> tuple[Step, Callable[[], None]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=os.path.join(tmp, "tb"))
    named = list(model.named_parameters())

    def step(batch: Batch, k: int) -> None:
        loss_of(model, batch).backward()
        if k % 100 == 0:
            for name, p in named:
                writer.add_histogram(name, p, k)
                if p.grad is not None:
                    writer.add_histogram(f"{name}.grad", p.grad, k)
        finish(opt)
    return step, writer.close


def _wandb(log_freq: int) -> Callable[..., tuple[Step, Callable[[], None]]]:
    def start(model: nn.Module, opt: torch.optim.Optimizer, tmp: str
              ) -> tuple[Step, Callable[[], None]]:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project="gradwatch-overhead", mode="offline", dir=tmp,
                         settings=wandb.Settings(console="off", _disable_stats=True))
        wandb.watch(model, log="all", log_freq=log_freq)

        def step(batch: Batch, k: int) -> None:
            loss = loss_of(model, batch)
            loss.backward()
            finish(opt)
            run.log({"loss": loss.item()})

        def close() -> None:
            wandb.unwatch(model)
            run.finish()
        return step, close
    return start


def _anomaly(model: nn.Module, opt: torch.optim.Optimizer, tmp: str
             ) -> tuple[Step, Callable[[], None]]:
    def step(batch: Batch, k: int) -> None:
        with torch.autograd.set_detect_anomaly(True):
            loss_of(model, batch).backward()
        finish(opt)
    return step, lambda: None


def _cockpit(model: nn.Module, opt: torch.optim.Optimizer, tmp: str
             ) -> tuple[Step, Callable[[], None]]:
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils.configuration import configuration

    extend(model)
    lossfunc = extend(nn.CrossEntropyLoss())
    individual = nn.CrossEntropyLoss(reduction="none")
    cockpit = Cockpit(model.parameters(), quantities=configuration("economy"))

    def step(batch: Batch, k: int) -> None:
        x, y = batch
        out = model(x)
        loss, losses = lossfunc(out, y), individual(out, y)
        info = {"batch_size": len(x), "individual_losses": losses, "loss": loss,
                "optimizer": opt}
        with cockpit(k, info=info):
            loss.backward(create_graph=cockpit.create_graph(k))
        finish(opt)
    return step, lambda: None


# Measured with torch 2.13.0+cpu: `pip install -c constraints.txt cockpit-for-pytorch` pulls
# torchvision 0.28.0 (built for another torch: `import lightning` then fails, "operator
# torchvision::nms does not exist"), and cockpit 1.0.2 imports pkg_resources, which
# setuptools >= 81 no longer has; so it was uninstalled again.
COCKPIT_NOTE = ("not installable with torch 2.13: cockpit-for-pytorch 1.0.2 pulls a "
                "torchvision built for another torch and imports pkg_resources (gone from "
                "setuptools >= 81)")

PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("lightning-grad-norm", 1, ("lightning",), _lightning),
    Peer("tb-histograms", 100, ("tensorboard",), _tensorboard),
    Peer("wandb-all-1", 1, ("wandb",), _wandb(1)),
    Peer("wandb-all-100", 100, ("wandb",), _wandb(100)),
    Peer("anomaly", 1, (), _anomaly),
    Peer("cockpit-economy", 1, ("cockpit", "backpack"), _cockpit,
         note=COCKPIT_NOTE),
)}

# Layers BackPACK's first-order extensions support (Cockpit's economy quantities need them).
_BACKPACK_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d,
                    nn.BatchNorm2d, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Flatten,
                    nn.AdaptiveAvgPool2d, nn.Sequential, nn.Dropout)


def unavailable(peer: Peer, model: nn.Module | None = None,
                device: str = "cpu") -> str | None:
    """Why ``peer`` cannot run (on ``model``), or None when it can."""
    for module in peer.needs:
        if importlib.util.find_spec(module) is None:
            return f"not installed: no module {module!r}" + (f"; {peer.note}" if peer.note else "")
        try:
            importlib.import_module(module)
        except Exception as e:  # installed but broken (a missing dependency)
            return f"installed but does not import: {type(e).__name__}: {e}"
    if peer.name.startswith("cockpit") and model is not None:
        odd = sorted({type(m).__name__ for m in model.modules()
                      if not isinstance(m, _BACKPACK_LAYERS)})
        if odd:
            return f"BackPACK does not support {', '.join(odd)}"
    return None


@contextlib.contextmanager
def scratch() -> Iterator[str]:
    """A temporary folder for the peers' files (event files, offline wandb runs)."""
    with tempfile.TemporaryDirectory(prefix="gradwatch-peers-") as tmp:
        yield tmp


def describe() -> list[dict[str, Any]]:
    """Every peer with its period and whether it can run here (for ``--list``)."""
    return [{"name": p.name, "period": p.period, "unavailable": unavailable(p),
             "note": p.note} for p in PEERS.values()]
