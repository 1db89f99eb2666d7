"""gradwatch keeps no model alive, grows linearly with the model, and ends a watch cleanly:
sweeps under ``gradwatch run``, re-entering a closed watch, ``sys.exit`` inside the block."""

from __future__ import annotations

import gc
import re
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.history import History, LayerInfo, Series
from gradwatch.runner import run_script

SCRIPTS = Path(__file__).parent / "scripts"


def printed(text: str, key: str) -> str:
    m = re.search(rf"^{key}=(.*)$", text, re.M)
    assert m, f"the script printed no {key}:\n{text}"
    return m.group(1)


def test_a_sweep_under_run_frees_every_model(capfd: pytest.CaptureFixture[str]) -> None:
    result = run_script(SCRIPTS / "sweep.py", ["30"])
    out = capfd.readouterr().out
    assert result.exit_code == 0 and result.report is not None
    assert printed(out, "ALIVE") == "0", "gradwatch kept a model or optimizer alive"
    # Each model holds 8 MB (weights and gradients): 25 leaked models would be 200 MiB.
    assert float(printed(out, "RSS_GROWTH_MIB")) < 48
    report = result.report
    assert report.run["steps"] == 150
    assert len(report.layers) == 60  # every model's layers stay in the report
    summary = report.summary()
    assert "SGD (lr 0.001) x30" in summary, summary.splitlines()[1]


def test_models_of_a_sweep_die_while_a_run_goes_on() -> None:
    """Dying models are forgotten at once: a new model at a dead one's address is new."""
    from gradwatch.measure.monitor import Monitor
    from gradwatch.measure.probes import INTERCEPTOR, GlobalProbes, Handles
    from gradwatch.watch import default_extensions

    monitor, handles = Monitor(discover=True, extensions=default_extensions()), Handles()
    GlobalProbes(monitor, handles, lambda obj: None)
    handles.add(INTERCEPTOR.register(monitor))
    refs = []
    try:
        for i in range(12):
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(16, 4)).square().mean().backward()
                opt.step()
            refs.append(weakref.ref(model))
            del model, opt
            gc.collect()
            assert all(r() is None for r in refs), f"model {i} is still alive"
    finally:
        handles.remove()
        monitor.close()
    assert len(monitor.history.roots) == 12
    assert len(monitor.history.layers) == 24
    assert monitor.step == 36


def test_series_storage_grows_geometrically_with_layers() -> None:
    """Attaching is linear in the layers: adding one costs amortised constant time."""
    history = History()
    history.roots.append("model")
    blocks: set[int] = set()
    for i in range(4096):
        history.add_layer(LayerInfo(name=str(i), type="Linear", params=20, root=0))
        blocks.add(id(history.steps._blocks["grad_norm"]))
    assert len(blocks) <= 14, f"{len(blocks)} reallocations for 4096 layers"
    assert history.steps.block("grad_norm").shape == (0, 4096)
    series = Series({"v": 1}, capacity=1024)
    series.append(np.arange(10), {"v": np.ones((10, 1))})
    assert series.nbytes() < 1024 * 8, "a short run must not allocate the whole capacity"


def test_a_closed_watch_cannot_be_entered_again() -> None:
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.watch(model, opt)
    with gw:
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    with pytest.raises(RuntimeError, match="this watch is closed"), gw:
        pass
    assert gw.report().run["steps"] == 1


@pytest.mark.parametrize("code, status", [(None, "completed"), (0, "completed"),
                                          (3, "failed"), ("bye", "failed")])
def test_sys_exit_inside_a_watch(code: object, status: str) -> None:
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SystemExit), gradwatch.watch(model, opt) as gw:
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
        sys.exit(code)
    report = gw.report()
    assert report.run["status"] == status
    assert report.run["steps"] == 5
    assert (report.run["error"] is None) == (status == "completed")
    assert gw.hooks == 0
