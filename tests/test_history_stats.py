"""Fused norms against a float64 reference, and the bounded, evenly downsampled history."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.history import History, LayerInfo, Series
from gradwatch.measure import stats


def reference_norm(t: torch.Tensor) -> float:
    """The slow, obviously right L2 norm: float64 on the host, one tensor at a time."""
    return float(torch.linalg.vector_norm(t.detach().to(torch.float64)))


# --------------------------------------------------------------------------- stats.norms
def test_norms_match_float64_reference_for_mixed_tensors() -> None:
    torch.manual_seed(0)
    tensors = [
        torch.randn(7, 5),
        torch.randn(3, 4, 2) * 1e-6,
        torch.randn(11, dtype=torch.float64),
        torch.randn(6, 6).to(torch.float16),
        torch.randn(9).to(torch.bfloat16),
        torch.tensor(2.5),  # 0-d (a scalar parameter)
        torch.zeros(4, 4),
        torch.randn(10, 10)[::2, 1:],  # non-contiguous view
    ]
    out = stats.norms(tensors, torch.device("cpu"))
    assert out.dtype == torch.float64
    assert out.shape == (len(tensors),)
    # As precise as each tensor's own dtype allows (on CPU the norm is computed in it and
    # redone in float64 only where it overflowed): float64 exact, float32 to 1e-6, halves
    # to their ~3 significant digits.
    rel = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-2,
           torch.bfloat16: 1e-2}
    for value, t in zip(out.tolist(), tensors, strict=True):
        assert value == pytest.approx(reference_norm(t), rel=rel[t.dtype], abs=0.0), t.dtype


def test_norms_do_not_overflow_where_float64_does_not() -> None:
    big = torch.full((4, 3), 1e20, dtype=torch.float32)
    assert math.isinf(float(torch.linalg.vector_norm(big)))  # the float32 norm overflows
    tiny = torch.full((5,), 1e-30, dtype=torch.float32)
    out = stats.norms([big, tiny, torch.tensor([3.0, 4.0])], torch.device("cpu")).tolist()
    assert out[0] == pytest.approx(1e20 * math.sqrt(12), rel=1e-6)
    assert out[1] == pytest.approx(1e-30 * math.sqrt(5), rel=1e-6)  # no underflow to 0
    assert out[2] == 5.0


def test_norms_of_nonfinite_tensors_are_nonfinite() -> None:
    with_nan = torch.tensor([1.0, float("nan"), 2.0])
    with_inf = torch.tensor([[1.0, float("inf")], [0.0, 1.0]])
    with_neg_inf = torch.tensor([-float("inf"), 1.0])
    finite = torch.ones(3)
    out = stats.norms([with_nan, with_inf, with_neg_inf, finite], torch.device("cpu")).tolist()
    assert math.isnan(out[0])
    assert out[1] == math.inf and out[2] == math.inf
    assert out[3] == pytest.approx(math.sqrt(3))  # one bad tensor does not spoil the others


def test_norms_of_sparse_gradients() -> None:
    emb = nn.Embedding(50, 4, sparse=True)
    emb(torch.tensor([[1, 7, 7, 30]])).pow(2).sum().backward()
    grad = emb.weight.grad
    assert grad is not None and grad.is_sparse
    out = stats.norms([grad, emb.weight], torch.device("cpu")).tolist()
    assert out[0] == pytest.approx(reference_norm(grad.to_dense()), rel=1e-6)
    assert out[1] == pytest.approx(reference_norm(emb.weight), rel=1e-6)


# --------------------------------------------------------------------------- Series
def _fill(series: Series, start: int, stop: int) -> None:
    steps = np.arange(start, stop)
    series.append(steps, {"value": steps.astype(float).reshape(-1, 1)})


def _check_spans(series: Series, total: int) -> None:
    """Kept steps start at 0, end at the run's last step, and stay aligned with their rows."""
    steps = series.steps
    assert steps[0] == 0
    assert steps[-1] == total - 1
    assert (np.diff(steps) > 0).all()
    np.testing.assert_array_equal(series.block("value")[:, 0], steps.astype(float))


def _check_evenly_spaced(series: Series, total: int) -> None:
    """Kept steps sit at one even spacing (the stride), up to the run's latest row."""
    steps = series.steps
    # The run's latest row is always shown; it may fall between two regular rows.
    kept = steps[:-1] if len(steps) > 1 and steps[-1] - steps[-2] != series.stride else steps
    gaps = np.diff(kept)
    assert (gaps == series.stride).all(), \
        f"after {total} steps: uneven spacing {sorted(set(gaps.tolist()))}, kept {kept.tolist()}"
    assert total - 1 - kept[-1] < series.stride  # no hole at the end of the run


def test_series_is_bounded_and_spans_100k_steps() -> None:
    capacity = 64
    series = Series({"value": 1}, capacity)
    size = series.nbytes()
    total, chunk = 100_000, 4096
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        _fill(series, start, stop)
        # At most `capacity` kept rows plus the run's latest row.
        assert len(series) <= capacity + 1
        assert series.nbytes() == size
        _check_spans(series, stop)
    assert len(series) >= capacity // 2


def test_series_kept_steps_are_evenly_spaced_over_100k_steps() -> None:
    series = Series({"value": 1}, 64)
    for start in range(0, 100_000, 4096):
        stop = min(start + 4096, 100_000)
        _fill(series, start, stop)
        _check_evenly_spaced(series, stop)


def test_series_smallest_case_is_evenly_spaced() -> None:
    series = Series({"value": 1}, 4)
    _fill(series, 0, 6)
    _check_spans(series, 6)
    assert series.steps.tolist() == [0, 2, 4, 5]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_series_spans_the_run_after_every_append(chunk: int) -> None:
    capacity = 16
    series = Series({"value": 1}, capacity)
    for start in range(0, 1500, chunk):
        _fill(series, start, start + chunk)
        assert len(series) <= capacity + 1
        _check_spans(series, start + chunk)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_series_is_evenly_spaced_after_every_append(chunk: int) -> None:
    series = Series({"value": 1}, 16)
    for start in range(0, 1500, chunk):
        _fill(series, start, start + chunk)
        _check_evenly_spaced(series, start + chunk)


def test_series_result_does_not_depend_on_chunking() -> None:
    def fill(chunk: int) -> np.ndarray:
        series = Series({"value": 1}, 32)
        for start in range(0, 5000, chunk):
            _fill(series, start, min(start + chunk, 5000))
        return series.steps

    np.testing.assert_array_equal(fill(1), fill(64))
    np.testing.assert_array_equal(fill(7), fill(5000))


# --------------------------------------------------------------------------- History
def _history_after(total: int, capacity: int = 64, n_layers: int = 5,
                   detail: Callable[[np.ndarray], np.ndarray] = lambda s: s % 16 == 0
                   ) -> History:
    history = History(capacity)
    for i in range(n_layers):
        history.add_layer(LayerInfo(name=f"layers.{i}", type="Linear", params=10, root=0))
    rng = np.random.default_rng(0)
    chunk = 64
    for start in range(0, total, chunk):
        steps = np.arange(start, min(start + chunk, total))
        n = len(steps)
        history.record_steps(steps, rng.random(n) + 1.0, np.ones(n), rng.random((n, n_layers)),
                             np.zeros((n, n_layers)), np.zeros(n))
        kept = steps[detail(steps)]
        m = len(kept)
        history.record_detail(kept, {
            "weight_norm": rng.random((m, n_layers)), "update_norm": rng.random((m, n_layers)),
            "grad_norm_applied": rng.random((m, n_layers)), "act_rms": rng.random((m, n_layers)),
            "model_io": rng.random((m, len(History.MODEL_IO)))})
    return history


def test_history_memory_does_not_grow_with_run_length() -> None:
    short, long = _history_after(1_000), _history_after(50_000)
    assert long.nbytes() == short.nbytes()
    assert long.total_steps == 50_000
    assert long.steps.steps[0] == 0 and long.steps.steps[-1] == 49_999
    assert len(long.steps) <= 64 + 1 and len(long.detail) <= 64 + 1
    assert long.detail.steps[0] == 0 and long.detail.steps[-1] == 49_984
    assert long.events.finite_loss_steps == 50_000  # exact counts survive downsampling


def test_memory_is_flat_when_the_budget_spreads_the_detail_steps_out() -> None:
    """Under the overhead budget a long run has ~32 detail steps per doubling of its length
    (``measure/cadence.py``): the detail series hold few rows for a long time. They are
    allocated whole, so that memory does not double between 10k and 100k steps."""
    def stretched(steps: np.ndarray) -> np.ndarray:  # 16, doubled as far as step / 32
        interval = 2 ** np.floor(np.log2(np.maximum(steps, 512) / 32)).astype(np.int64)
        return steps % interval == 0

    sizes = [_history_after(n, capacity=2048, detail=stretched).nbytes()
             for n in (10_000, 100_000)]
    assert sizes[0] == sizes[1]
    assert len(_history_after(100_000, capacity=2048, detail=stretched).detail) < 512


def _watched_run(steps: int) -> tuple[gradwatch.Report, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    x = torch.randn(16, 3)
    y = x.sum(dim=1, keepdim=True)
    with gradwatch.watch(model, opt, capacity=16, sync_every=32) as gw:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return gw.report(), gw.monitor.history.nbytes()


def test_watched_run_memory_and_series_are_bounded() -> None:
    short, short_bytes = _watched_run(100)
    long, long_bytes = _watched_run(600)
    assert long_bytes == short_bytes
    for report, total in ((short, 100), (long, 600)):
        assert report.run["steps"] == total
        steps = report.series["step"]
        assert len(steps) <= 16 + 1
        assert steps[0] == 0 and steps[-1] == total - 1  # the series covers the whole run
        assert len(report.series["loss"]) == len(steps)
        for column in report.series["grad_norm"].values():
            assert len(column) == len(steps)
        assert len(report.series["detail_step"]) <= 16 + 1


def test_activation_rms_in_float32_on_cpu_redone_exactly_when_it_overflows() -> None:
    x = torch.randn(64, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = float(x.double().pow(2).mean().sqrt())
    assert float(stats.rms(x)) == pytest.approx(reference, rel=1e-3)
    huge = torch.full((1000,), 3e30)  # its square overflows float32
    assert float(stats.rms(huge)) == pytest.approx(3e30, rel=1e-6)
    assert math.isnan(float(stats.rms(torch.tensor([float("nan"), 1.0]))))
    assert stats.rms(x).dtype == torch.float64
