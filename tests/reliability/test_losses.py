"""Each step's loss is the one its optimizer stepped on: GAN loops with two watches, two
threads with a watch each, a model that fits exactly, and a run whose measuring stopped."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.measure.measures import StepMeasures


def recorded(report: gradwatch.Report) -> np.ndarray:
    return np.array(report.series["loss"], dtype=float)


@pytest.mark.parametrize("freeze_d", [False, True], ids=["plain", "D frozen for G's step"])
def test_gan_watches_record_the_loss_their_optimizer_steps_on(freeze_d: bool) -> None:
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_g = torch.optim.Adam(G.parameters(), 1e-3)
    opt_d = torch.optim.Adam(D.parameters(), 1e-3)
    bce = nn.BCEWithLogitsLoss()
    loss_d, loss_g = [], []
    with gradwatch.watch(D, opt_d) as watch_d, gradwatch.watch(G, opt_g) as watch_g:
        for _ in range(80):  # past one host copy
            real, fake = torch.randn(32, 2) + 2, G(torch.randn(32, 4))
            opt_d.zero_grad()
            ld = bce(D(real), torch.ones(32, 1)) + bce(D(fake.detach()), torch.zeros(32, 1))
            ld.backward()
            opt_d.step()
            D.requires_grad_(not freeze_d)
            opt_g.zero_grad()
            lg = bce(D(fake), torch.ones(32, 1))  # flows back through D's output
            lg.backward()
            opt_g.step()
            D.requires_grad_(True)
            loss_d.append(ld.item())
            loss_g.append(lg.item())
    np.testing.assert_array_equal(recorded(watch_d.report()), loss_d)
    np.testing.assert_array_equal(recorded(watch_g.report()), loss_g)


def test_gradient_accumulation_still_averages_its_micro_batches() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with gradwatch.watch(model, opt) as gw:
        for _ in range(10):
            opt.zero_grad()
            parts = []
            for _ in range(4):
                loss = model(torch.randn(8, 3)).square().mean()
                loss.backward()
                parts.append(loss.item())
            opt.step()
            expected.append(np.mean(np.array(parts, dtype=np.float64)))
    np.testing.assert_allclose(recorded(gw.report()), expected, rtol=1e-7)


def test_two_threads_with_a_watch_each_keep_their_own_rows() -> None:
    results: dict[int, tuple[list[float], gradwatch.Report]] = {}
    errors: list[BaseException] = []

    def train(k: int) -> None:
        try:
            g = torch.Generator().manual_seed(k)
            model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.01 * (k + 1))
            x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g) * (k + 1)
            losses = []
            with gradwatch.watch(model, opt) as gw:
                for _ in range(150):
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(model(x), y)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
            results[k] = (losses, gw.report())
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=train, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for losses, report in results.values():
        assert report.run["steps"] == 150 and not report.run["internal_errors"]
        np.testing.assert_array_equal(recorded(report), losses)


def test_a_watch_follows_its_loop_into_another_thread() -> None:
    """Made in this thread, trained in another, its own forward never seen (only its
    submodules are called): every step is still its."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses: list[float] = []

    def loop() -> None:
        for _ in range(30):
            opt.zero_grad()
            loss = model[2](model[1](model[0](torch.randn(16, 4)))).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())

    with gradwatch.watch(model, opt) as gw:
        worker = threading.Thread(target=loop)
        worker.start()
        worker.join()
    np.testing.assert_array_equal(recorded(gw.report()), losses)


def test_a_model_that_fits_exactly_is_converged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 4)
    y = model(x).detach()  # the targets are its own output: loss 0 from the start
    with gradwatch.watch(model, opt) as gw:
        for _ in range(100):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    report = gw.report()
    assert not report.problems, [(f.kind, f.summary) for f in report.problems]
    plateau = [f for f in report.findings if f.kind == "loss_plateau"]
    assert plateau and "converged" in plateau[0].summary


def test_after_an_internal_error_the_steps_are_still_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: StepMeasures, row: int, key: str) -> None:
        raise RuntimeError("injected failure inside gradwatch")

    monkeypatch.setattr(StepMeasures, "gradients", broken)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(150):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
    report = gw.report()
    assert report.run["status"] == "completed"
    assert report.run["steps"] == 150
    assert report.run["measured_steps"] == 0
    assert "stopped measuring at step 0" in report.summary()
    assert "injected failure" in report.summary()
