"""An activation call that runs once per timestep of an unrolled recurrent cell is one site
with many calls: one finding listing the calls, not one per timestep; distinct sites keep
their own findings."""

from __future__ import annotations

import torch
from conftest import only
from torch import nn

import gradwatch

STEPS = 12


class Cell(nn.Module):
    """``h = tanh(W x + U h)``, its weights 8x too large: saturated at every timestep."""

    def __init__(self, n_in: int = 8, n_h: int = 32) -> None:
        super().__init__()
        self.wx, self.wh = nn.Linear(n_in, n_h), nn.Linear(n_h, n_h)
        with torch.no_grad():
            self.wx.weight.mul_(8)
            self.wh.weight.mul_(8)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.wx(x) + self.wh(h))


class Unrolled(nn.Module):
    def __init__(self, inline: bool) -> None:
        super().__init__()
        self.inline = inline
        self.cell, self.head = Cell(), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 32)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell.wx(x[:, t]) + self.cell.wh(h)) if self.inline \
                else self.cell(x[:, t], h)
        return self.head(h)


def _train(model: nn.Module, steps: int = 40) -> gradwatch.Report:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, STEPS, 8, generator=g)
    y = x.sum((1, 2)).unsqueeze(1) / 10
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return gw.report()


def test_an_unrolled_cell_is_one_saturated_finding_listing_its_timesteps() -> None:
    for inline, base in ((False, "cell.tanh"), (True, "Unrolled.tanh")):
        torch.manual_seed(0)
        report = _train(Unrolled(inline))
        f = only(report, "saturated_activation")  # one, not one per timestep
        assert f.evidence["calls"] == list(range(1, STEPS + 1))
        assert f.evidence["sites"] == [f"{base}@{k}" for k in range(1, STEPS + 1)]
        assert set(f.evidence["per_call"]) == set(f.evidence["sites"])
        assert f.evidence["saturated_fraction"] == max(f.evidence["per_call"].values())
        assert f.summary.startswith(f"{base} runs {STEPS} times in each forward (calls "
                                    f"@1-@{STEPS}")
        assert "cell.wh" in f.layers and f"{base}@{STEPS}" in f.layers


class TwoSites(nn.Module):
    """Two different saturated tanh layers: two findings."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 1)
        with torch.no_grad():
            self.a.weight.mul_(10)
            self.b.weight.mul_(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x.flatten(1)[:, :8])))))


def test_distinct_sites_keep_their_own_findings() -> None:
    torch.manual_seed(0)
    found = [f for f in _train(TwoSites()).findings if f.kind == "saturated_activation"]
    assert len(found) == 2
    assert all("calls" not in f.evidence for f in found)
