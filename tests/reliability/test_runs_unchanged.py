"""gradwatch never changes the numbers of the run it watches: bit-identical weights, buffers,
optimizer state and RNG state, eager and under ``torch.compile``, with ``watch`` and ``run``.

The compiled cases use the ``aot_eager`` backend in this process (Dynamo's graph capture and
AOTAutograd, without Inductor's code generation, which takes half a minute per model on a
small CPU); the Inductor case runs as two subprocesses in ``test_processes.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_plain
from torch import nn

import gradwatch
from gradwatch.runner import run_script

SCRIPTS = Path(__file__).parent / "scripts"
BN_DROPOUT = SCRIPTS / "train_bn_dropout.py"


def assert_same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Weights, buffers, optimizer state and RNG state equal bit for bit."""
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    for (k, sa), (_, sb) in zip(sorted(a["optimizer"]["state"].items()),
                                sorted(b["optimizer"]["state"].items()), strict=True):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (k, name)
    assert torch.equal(a["rng"], b["rng"]), "the RNG state differs"
    assert torch.equal(a["loss"], b["loss"])


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def test_watch_leaves_an_eager_run_bit_identical(tmp_path: Path) -> None:
    def train(watched: bool) -> dict[str, Any]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                              nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        gw = gradwatch.watch(model, opt) if watched else None
        for step in range(70):  # past one host copy (64 steps)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            if step % 10 == 9:
                with torch.no_grad():
                    model(x)  # forgotten eval(): gradwatch re-runs it in eval mode
        if gw is not None:
            gw.close()
            assert "eval_mode" in gw.report().kinds()
        return {"state": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(), "loss": loss.detach()}

    assert_same_run(train(False), train(True))


@pytest.mark.parametrize("compiled", [[], ["--compile", "aot_eager"],
                                      ["--compile-inplace", "aot_eager"]],
                         ids=["eager", "torch.compile(model)", "model.compile()"])
def test_run_leaves_the_script_bit_identical(tmp_path: Path, compiled: list[str]) -> None:
    torch._dynamo.reset()
    run_plain(BN_DROPOUT, str(tmp_path / "plain.pt"), *compiled)
    breaks = graph_breaks()
    torch._dynamo.reset()
    result = run_script(BN_DROPOUT, [str(tmp_path / "run.pt"), *compiled])
    assert graph_breaks() == breaks, "gradwatch caused a graph break"
    assert result.exit_code == 0 and result.report is not None
    assert_same_run(torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "run.pt"))
    report = result.report
    assert report.run["steps"] == 40
    if compiled:
        # Measured: the loss and every layer's gradients; said: the forward is not.
        assert report.layers and all(len(v) == 40 for v in report.series["grad_norm"].values())
        assert report.to_dict()["facts"]["compiled_roots"] == ["model"]
        assert "ran through torch.compile" in report.summary()
    else:
        assert "not measured" not in report.summary()


def test_watch_of_a_compiled_model_is_bit_identical_and_says_what_it_misses() -> None:
    def train(watched: bool) -> tuple[dict[str, Any], gradwatch.Watch | None]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        forward = torch.compile(model, backend="aot_eager")
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        gw = gradwatch.watch(model, opt) if watched else None
        for _ in range(20):
            opt.zero_grad()
            loss = nn.functional.mse_loss(forward(x), y)
            loss.backward()
            opt.step()
        if gw is not None:
            gw.close()
        return {"state": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(), "loss": loss.detach()}, gw

    torch._dynamo.reset()
    bare, _ = train(False)
    torch._dynamo.reset()
    breaks = graph_breaks()
    watched, gw = train(True)
    assert graph_breaks() == breaks
    assert_same_run(bare, watched)
    assert gw is not None
    report = gw.report()
    assert report.run["steps"] == 20
    assert "was never seen outside compiled code" in report.summary()
