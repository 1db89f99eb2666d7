"""Detail steps whose cost does not grow with the model: sampled weight snapshots, sampled
model input/output statistics, activation sites measured in turns (issue 16)."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.history import SITE_STATS
from gradwatch.measure import stats
from gradwatch.measure.extensions.activations import SITES_PER_STEP


def test_sample_is_a_strided_view_visiting_every_column() -> None:
    w = torch.randn(300, 1024)
    s = stats.sample(w, k=4096)
    assert s.numel() <= 4096 and s.data_ptr() == w.data_ptr()  # a view, no copy
    step = s.stride(0)
    assert math.gcd(step, 1024) == 1
    columns = (torch.arange(s.numel()) * step) % 1024
    assert columns.unique().numel() == 1024
    small = torch.randn(10, 10)
    assert stats.sample(small, k=4096).numel() == 100
    t = torch.randn(64, 128).t()  # not contiguous: read whole
    assert stats.sample(t, k=16).shape == t.shape


@pytest.mark.parametrize("make", ["adam", "sgd"])
def test_sampled_update_norms_match_the_exact_ones(make: str) -> None:
    """A real optimizer step on large weights: the estimate is within 2% of the exact
    norm of the update; small tensors are measured exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(2000, 256), nn.Flatten(), nn.Linear(256 * 4, 512),
                          nn.ReLU(), nn.Linear(512, 10))
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if make == "adam" else
           torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    params = [p for p in model.parameters()]
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        snap = stats.Sampled([p.detach() for p in params], k=8192)
        idx = torch.randint(0, 2000, (64, 4))
        F.cross_entropy(model(idx), torch.randint(0, 10, (64,))).backward()
        opt.step()
        opt.zero_grad()
        got = snap.moved([p.detach() for p in params], torch.device("cpu"))
        exact = torch.stack([(b - p.detach()).double().norm()
                             for b, p in zip(before, params, strict=True)])
        assert got is not None and not snap.exact
        for g, e, p in zip(got.tolist(), exact.tolist(), params, strict=True):
            if p.numel() <= 8192:
                assert g == pytest.approx(e, rel=1e-5)
            elif e > 0:
                assert g == pytest.approx(e, rel=0.02), p.shape
            else:
                assert g == 0.0


def test_a_replaced_parameter_gives_no_update_and_no_error() -> None:
    w = torch.randn(100, 100)
    snap = stats.Sampled([w], k=64)
    assert snap.moved([torch.randn(50, 100)], torch.device("cpu")) is None
    transposed = torch.randn(100, 100).t()  # same shape, another layout: read whole
    assert stats.Sampled([w], k=64).moved([transposed], torch.device("cpu")) is None
    assert stats.Sampled([w], k=64).moved([w + 1], torch.device("cpu")) is not None


def test_sampled_output_spread_tracks_the_full_one_and_sees_a_collapse() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 128, 4096) * torch.linspace(0.1, 3, 4096)
    full = logits.reshape(8, -1).double()
    exact = float(full.std(dim=0).mean() / full.pow(2).mean().sqrt())
    assert float(stats.output_spread(logits)) == pytest.approx(exact, rel=0.03)
    collapsed = torch.randn(1, 128, 4096).expand(8, 128, 4096).contiguous()
    assert float(stats.output_spread(collapsed)) < 1e-6


def test_activation_rms_on_an_accelerator_never_reads_an_overflow_as_nonfinite() -> None:
    """The accelerator path, without a host read: a float32 norm that overflowed on finite
    elements falls back to the largest element; a real Inf or NaN stays non-finite."""
    inf, nan = torch.tensor(math.inf), torch.tensor(math.nan)
    assert float(stats._bounded(torch.tensor(3.0), torch.tensor(2.0))) == 3.0
    assert float(stats._bounded(inf, torch.tensor(1e30))) == pytest.approx(1e30)
    assert math.isinf(float(stats._bounded(inf, inf)))
    assert math.isnan(float(stats._bounded(nan, nan)))


def _deep_relu_net(depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(8, 32), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(32, 1))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def _train(depth: int, steps: int, kill_at: int | None = None, **options: object):
    torch.manual_seed(0)
    net = _deep_relu_net(depth)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(128, 8)
    y = x[:, :1] * 0.5
    with gradwatch.watch(net, opt, **options) as gw:
        for step in range(steps):
            if step == kill_at:  # every unit of one layer dies here
                with torch.no_grad():
                    net[2 * (depth // 2)].bias.fill_(-100.0)
            F.mse_loss(net(x), y).backward()
            opt.step()
            opt.zero_grad()
    return gw


def _measured(gw, site: int) -> np.ndarray:
    series = gw.monitor.history.extra["sites"]
    return series.steps[~np.isnan(series.block(SITE_STATS[0])[:, site])]


def test_many_activation_sites_are_measured_in_turns_and_a_death_is_still_found() -> None:
    depth = SITES_PER_STEP + 8  # 41 ReLU sites: two turns
    gw = _train(depth, 260, kill_at=150)
    sites = gw.monitor.history.sites
    assert len(sites) == depth + 1
    a, b = _measured(gw, 0), _measured(gw, 1)
    assert set(range(8)) <= set(a) and set(range(8)) <= set(b)  # steps 0-7: every site
    later_a, later_b = set(a[a >= 8]), set(b[b >= 8])
    assert later_a and later_b and not later_a & later_b  # each on its own detail steps
    assert len(later_a | later_b) == len(set(range(16, 260, 16)))
    report = gw.report()
    dead = [f for f in report.findings if f.kind == "dying_relu"
            and f.evidence.get("dead_fraction") == 1.0]
    assert dead and 150 <= dead[0].evidence["dead_since_step"] <= 150 + 2 * 16
    assert report.run["cadence"]["site_turns"] == 2  # the report says so, and the summary
    assert "each activation site on every 2nd of them" in " ".join(report.summary().split())


def test_few_sites_or_a_fixed_cadence_measure_every_site_on_every_detail_step() -> None:
    few = _train(SITES_PER_STEP - 1, 100)
    detail = set(range(8)) | set(range(16, 100, 16))
    assert set(_measured(few, 0)) == detail == set(_measured(few, SITES_PER_STEP - 1))
    fixed = _train(SITES_PER_STEP + 8, 100, overhead=None)
    assert set(_measured(fixed, 0)) == detail == set(_measured(fixed, 1))
    assert fixed.report().run["cadence"]["site_turns"] == 1


def test_the_step_loss_kept_until_the_step_ends_does_not_hold_its_graph() -> None:
    """gradwatch keeps each backward's loss until ``optimizer.step()`` returns; after
    ``backward(retain_graph=True)`` the graph holds every saved activation, which must be
    freed when the script drops its own references, not at the end of the step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradwatch.watch(net, opt):
        for _ in range(3):
            hidden = net[0](torch.randn(16, 4))
            loss = net[1](hidden * hidden).mean()  # the product saves `hidden`
            loss.backward(retain_graph=True)
            saved = weakref.ref(hidden)
            del hidden, loss
            gc.collect()
            assert saved() is None
            opt.step()
            opt.zero_grad()
