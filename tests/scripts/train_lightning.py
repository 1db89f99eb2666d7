"""A LightningModule trained by ``lightning.pytorch.Trainer.fit`` on CPU with Adam at a rate
copied from an SGD recipe (``--lr``, default 3): the loss diverges and ReLU units die.

``training_step`` calls the module's ``self.net`` directly, as most LightningModules do, so
the LightningModule's own forward never runs; the rate lives in ``configure_optimizers``.
"""

import argparse
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class LitModel(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="lightning")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 10, generator=g)
    z = x @ torch.randn(10, 2, generator=g)
    y = (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1,
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.fit(LitModel(args.lr), loader)


if __name__ == "__main__":
    main()
