"""Where a NaN is born: real training runs that turn NaN at a known step, in a custom module,
in attention, in the data, outside the model; healthy runs where nothing is replayed; and
the user's run bit-identical to the same run without gradwatch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import linear_stack, only, run_plain
from torch import nn

import gradwatch
from gradwatch.findings import Finding
from gradwatch.judge.context import Context
from gradwatch.judge.detectors import nonfinite
from gradwatch.measure.extensions.nanorigin import NanOrigin
from gradwatch.runner import run_script
from gradwatch.thresholds import Thresholds

SCRIPTS = Path(__file__).parent / "scripts"
ATTENTION_SCRIPT = SCRIPTS / "train_nan_attention.py"


class LogFeatures(nn.Module):
    """A custom module without parameters: log-features of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class LogNet(nn.Module):
    """Linear -> log (custom module) -> Linear; the log's input turns negative when a
    sample's first feature is very negative."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.feat = LogFeatures()
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).abs() + 1.0 + 10.0 * x[:, :1].clamp(max=0.0)
        return self.out(self.feat(h))


class MaskedAttention(nn.Module):
    """Hand-written attention: scores masked with -inf (``masked_fill`` or an indexed
    assignment), softmax, dropout."""

    def __init__(self, d: int = 8, setitem: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.setitem = setitem

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        mask = pad[:, None, :].expand_as(scores)
        if self.setitem:
            scores[mask] = float("-inf")
        else:
            scores = scores.masked_fill(mask, float("-inf"))
        weights = F.dropout(scores.softmax(dim=-1), 0.1, self.training)
        return self.proj(weights @ v)


class AttnNet(nn.Module):
    def __init__(self, masking: str) -> None:
        """``masking``: "mha" (nn.MultiheadAttention), "masked_fill" or "setitem"."""
        super().__init__()
        hand_written = masking != "mha"
        self.embed = nn.Linear(6, 8)
        self.attn: nn.Module = MaskedAttention(setitem=masking == "setitem") \
            if hand_written else nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.hand_written = hand_written

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.hand_written:
            a = self.attn(h, pad)
        else:
            a, _ = self.attn(h, h, h, key_padding_mask=pad)
        return self.head(a + h).mean(dim=1)


Batch = Callable[[int, torch.Generator], tuple[tuple[Any, ...], torch.Tensor]]


def log_batch(bad_step: int | None, nan_in_data: bool = False) -> Batch:
    """Positive inputs; at ``bad_step`` one very negative first feature (or a NaN)."""
    def batch(step: int, g: torch.Generator) -> tuple[tuple[Any, ...], torch.Tensor]:
        x = torch.rand(32, 4, generator=g) + 0.5
        if step == bad_step:
            x[5, 0] = math.nan if nan_in_data else -3.0
        return (x,), x.sum(dim=1, keepdim=True)
    return batch


def attention_batch(bad_step: int | None) -> Batch:
    """Padded sequences; at ``bad_step`` sequence 2 is padding only (its row all masked)."""
    def batch(step: int, g: torch.Generator) -> tuple[tuple[Any, ...], torch.Tensor]:
        x = torch.randn(8, 5, 6, generator=g)
        pad = torch.zeros(8, 5, dtype=torch.bool)
        pad[:, 4] = True
        if step == bad_step:
            pad[2, :] = True
        return (x, pad), x.sum(dim=(1, 2)).unsqueeze(1) / 10
    return batch


def train(make: Callable[[], nn.Module], batch: Batch, steps: int = 30,
          watched: bool = True) -> dict[str, Any]:
    """Adam on MSE, ``steps`` steps, with or without ``gradwatch.watch``."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    gw = gradwatch.watch(model, opt) if watched else None
    losses = []
    for step in range(steps):
        inputs, y = batch(step, g)
        opt.zero_grad()
        loss = F.mse_loss(model(*inputs), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    out: dict[str, Any] = {"state": model.state_dict(), "optimizer": opt.state_dict(),
                           "rng": torch.get_rng_state(), "losses": losses, "model": model}
    if gw is not None:
        gw.close()
        out["report"] = gw.report()
        out["origin"] = gw.monitor.history.events.nonfinite_origin
        out["ext"] = next(e for e in gw.monitor.extensions if isinstance(e, NanOrigin))
        out["errors"] = gw.monitor.errors
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN included (``torch.equal`` says NaN != NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.detach().reshape(-1).view(torch.uint8),
                    b.detach().reshape(-1).view(torch.uint8))


def assert_same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Weights, buffers, optimizer state and the RNG state equal bit for bit."""
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert same_bits(a["state"][key], b["state"][key]), key
    for (k, sa), (_, sb) in zip(sorted(a["optimizer"]["state"].items()),
                                sorted(b["optimizer"]["state"].items()), strict=True):
        for name in sa:
            assert same_bits(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), (k, name)
    assert torch.equal(a["rng"], b["rng"]), "the RNG state differs"


def first_bad(losses: list[float]) -> int:
    return next(k for k, v in enumerate(losses) if not math.isfinite(v))


# --------------------------------------------------------------------------- custom module
@pytest.mark.parametrize("bad_step", [5, 21])  # a detail step, and one that is not
def test_log_in_a_custom_module_is_the_producer_not_the_next_linear(bad_step: int) -> None:
    run = train(LogNet, log_batch(bad_step))
    assert first_bad(run["losses"]) == bad_step and run["errors"] == []
    f = only(run["report"], "nonfinite")
    assert f.first_step == bad_step
    ev = f.evidence
    assert ev["producer_status"] == "producer" and ev["producer_step"] == bad_step
    assert ev["producer"] == "feat" and ev["producer_op"] == "log"
    assert ev["producer_site"] == "feat.log@1" and ev["producer_type"] == "LogFeatures"
    assert ev["producer_kind"] == "nan" and ev["producer_inputs"] == "finite"
    low, high = ev["producer_input_range"]
    assert low < 0 < high  # a negative number reached the log
    assert f"produced them at step {bad_step}: feat (log) output NaN from finite inputs" \
        in f.summary
    if bad_step > 10:  # with a history to call it sudden: the cause names the producer too
        cause = next(c for c in f.causes if c.id == "invalid_forward_op")
        assert "feat (log) output NaN" in cause.text
    # ... and the run is the one it would have been without gradwatch
    assert_same_run(run, train(LogNet, log_batch(bad_step), watched=False))


def test_a_parameterised_layer_that_divides_by_zero_leads_the_layers() -> None:
    """A layer that divides by the sum of its input: Inf at a row summing to 0, NaN after
    it (inf - inf in the head): the producer is where the Inf was born."""
    class Normalised(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) / x.sum(dim=1, keepdim=True)

    class DivNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.norm = Normalised(4, 8)
            self.head = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.a(x)) + self.norm(x))

    def batch(step: int, g: torch.Generator) -> tuple[tuple[Any, ...], torch.Tensor]:
        x = torch.rand(16, 4, generator=g) + 0.1
        if step == 17:
            x[3] = torch.tensor([1.0, -1.0, 2.0, -2.0])  # finite, sums to exactly 0
        return (x,), x.sum(dim=1, keepdim=True)

    run = train(DivNet, batch, steps=25)
    assert first_bad(run["losses"]) == 17
    f = only(run["report"], "nonfinite")
    ev = f.evidence
    assert ev["producer"] == "norm" and ev["producer_type"] == "Normalised"
    assert ev["producer_op"] == "div" and ev["producer_kind"] == "inf"
    assert ev["producer_inputs"] == "finite" and ev["producer_nan_at"] == "head.linear@1"
    assert f.layers[0] == "norm"  # a parameterised layer, though "a" runs first
    assert "norm (div) output Inf from finite inputs" in f.summary
    assert "which turned to NaN in head (linear)" in f.summary


def test_an_op_the_function_mode_cannot_see_is_found_at_module_level() -> None:
    """A module whose computation no torch function mode sees (as a C++ extension's): the
    module whose output turned NaN from finite inputs is the producer, with no op."""
    class Opaque(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch._C.DisableTorchFunction():
                return torch.log(x)

    class Net(LogNet):
        def __init__(self) -> None:
            super().__init__()
            self.feat = Opaque()

    run = train(Net, log_batch(16), steps=20)
    assert first_bad(run["losses"]) == 16 and run["errors"] == []
    f = only(run["report"], "nonfinite")
    ev = f.evidence
    assert ev["producer"] == "feat" and ev["producer_type"] == "Opaque"
    assert ev["producer_op"] is None and ev["producer_site"] == "feat"
    assert ev["producer_kind"] == "nan" and ev["producer_inputs"] == "finite"
    assert "produced them at step 16: feat output NaN from finite inputs" in f.summary


# --------------------------------------------------------------------------- attention
@pytest.mark.parametrize("masking", ["mha", "masked_fill", "setitem"])
def test_a_fully_masked_attention_row_names_the_attention(masking: str) -> None:
    run = train(lambda: AttnNet(masking), attention_batch(13), steps=20)
    assert first_bad(run["losses"]) == 13 and run["errors"] == []
    f = only(run["report"], "nonfinite")
    ev = f.evidence
    assert f.first_step == 13 and ev["producer_step"] == 13
    assert ev["producer"] == "attn" and ev["producer_kind"] == "nan"
    # the -inf of the mask is written on purpose: the NaN is born where it is normalised
    assert ev["producer_inputs"] == "inf" and ev["producer_inf_from"] is not None
    if masking != "mha":
        assert ev["producer_type"] == "MaskedAttention" and ev["producer_op"] == "softmax"
        assert ev["producer_inf_from"] == f"attn.{masking}@1"
    else:
        assert ev["producer_type"] == "MultiheadAttention"
        assert ev["producer_op"] == "multi_head_attention_forward"
        assert f.layers[0] == "attn"  # a parameterised layer leads
    assert "the forward pass produced them at step 13: attn (" in f.summary
    assert_same_run(run, train(lambda: AttnNet(masking), attention_batch(13), steps=20,
                               watched=False))


# --------------------------------------------------------------------------- not the model
def test_nan_in_the_batch_blames_the_input_and_no_module() -> None:
    run = train(LogNet, log_batch(12, nan_in_data=True), steps=20)
    assert first_bad(run["losses"]) == 12
    f = only(run["report"], "nonfinite")
    ev = f.evidence
    assert ev["producer_status"] == "input" and ev["producer"] is None
    assert ev["producer_kind"] == "nan" and ev["producer_input_index"] == 0
    assert "input at step 12 already held NaN: no layer of the model produced it" in f.summary
    assert [c.id for c in f.causes] == ["nonfinite_input"]
    assert "assert_finite_inputs" in {r.id for r in f.remedies}


def test_nan_made_by_the_loss_outside_the_model_is_not_blamed_on_a_layer() -> None:
    torch.manual_seed(0)
    model = LogNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with gradwatch.watch(model, opt) as gw:
        for step in range(15):
            (x,), y = log_batch(None)(step, g)
            shift = -1e3 if step == 8 else 10.0
            loss = (torch.log(model(x) + shift) - torch.log(y + 10.0)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    f = only(gw.report(), "nonfinite")
    ev = f.evidence
    assert ev["producer_status"] == "output_finite" and ev["producer"] is None
    assert ev["producer_step"] == 8
    assert "gave a finite model output" in f.summary


# --------------------------------------------------------------------------- healthy runs
def test_a_healthy_run_replays_nothing_and_is_bit_identical() -> None:
    run = train(LogNet, log_batch(None), steps=40)
    assert all(math.isfinite(v) for v in run["losses"])
    assert run["origin"] is None and run["ext"].done is False
    assert "nonfinite" not in run["report"].kinds()
    assert_same_run(run, train(LogNet, log_batch(None), steps=40, watched=False))


def test_healthy_attention_with_masks_replays_nothing() -> None:
    """-inf masks at every step are no NaN: only a non-finite loss starts a replay."""
    run = train(lambda: AttnNet("masked_fill"), attention_batch(None), steps=20)
    assert run["origin"] is None and run["ext"].done is False
    assert "nonfinite" not in run["report"].kinds()


def test_backward_nan_then_nan_weights_blame_no_forward_op() -> None:
    """sqrt(0) has an infinite derivative: the loss of step 6 is finite (nothing replayed),
    its NaN gradient makes the weights NaN, and step 7's replay says so."""
    torch.manual_seed(0)
    model = LogNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with gradwatch.watch(model, opt) as gw:
        for step in range(12):
            (x,), y = log_batch(None)(step, g)
            out = model(x)
            loss = torch.sqrt((out * 0).pow(2)).mean() if step == 6 else F.mse_loss(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    f = only(gw.report(), "nonfinite")
    ev = f.evidence
    assert ev["origin"] == "backward" and f.first_step == 6
    assert ev["producer_status"] == "weights" and ev["producer_step"] == 7
    assert ev["producer"] is None and "backward() produced them" in f.summary


# --------------------------------------------------------------------------- gradwatch run
def test_gradwatch_run_finds_the_attention_and_leaves_the_run_unchanged(
        tmp_path: Path) -> None:
    torch.manual_seed(123)  # the script seeds itself; the RNG after it is compared
    run_plain(ATTENTION_SCRIPT, str(tmp_path / "plain.pt"))
    result = run_script(ATTENTION_SCRIPT, [str(tmp_path / "watched.pt")])
    assert result.exit_code == 0
    a = torch.load(tmp_path / "plain.pt")
    b = torch.load(tmp_path / "watched.pt")
    assert_same_run(a, b)
    f = only(result.report, "nonfinite")
    ev = f.evidence
    assert f.first_step == 9 and ev["producer_step"] == 9
    assert ev["producer"] == "attn" and ev["producer_op"] == "multi_head_attention_forward"
    assert ev["producer_kind"] == "nan" and ev["producer_inf_from"] == "attn.masked_fill_@1"


def test_the_command_line_report_names_the_producer(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "run", str(ATTENTION_SCRIPT),
                           "--json", "out.json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    [f] = [f for f in report["findings"] if f["kind"] == "nonfinite"]
    assert f["evidence"]["producer"] == "attn" and f["layers"][0] == "attn"
    assert "attn (multi_head_attention_forward) output NaN" in f["summary"]
    assert report["run"]["internal_errors"] == []


def test_a_compiled_model_is_not_replayed_and_its_run_is_unchanged() -> None:
    """torch.compile: the forward runs inside compiled code, gradwatch sees no forward to
    replay; the report says the origin was not checked, and the numbers are unchanged."""
    def make() -> nn.Module:
        return torch.compile(LogNet(), backend="aot_eager")

    torch._dynamo.reset()
    plain_run = train(make, log_batch(11), steps=14, watched=False)
    torch._dynamo.reset()
    run = train(make, log_batch(11), steps=14)
    assert first_bad(run["losses"]) == 11 and run["errors"] == []
    assert_same_run(plain_run, run)
    f = only(run["report"], "nonfinite")
    assert f.evidence["producer_status"] == "not_checked" and f.evidence["producer"] is None
    assert "torch.compile" in f.evidence["producer_reason"]


# --------------------------------------------------------------------------- replay fidelity
def test_fp16_overflow_under_autocast_is_found_in_the_layer_that_overflowed() -> None:
    """The forward runs under torch.autocast (float16); the backward, and so the replay,
    outside it: the replay enters the same autocast, or the overflow would not repeat."""
    def batch(step: int, g: torch.Generator) -> tuple[tuple[Any, ...], torch.Tensor]:
        x = torch.rand(16, 4, generator=g)
        if step == 14:
            x = x * 1e5  # finite in float32, beyond float16's 65504
        return (x,), torch.ones(16, 1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    with gradwatch.watch(model, opt) as gw:
        for step in range(18):
            (x,), y = batch(step, g)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.mse_loss(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    ev = only(gw.report(), "nonfinite").evidence
    assert ev["producer_status"] == "producer" and ev["producer_step"] == 14
    assert ev["producer"] == "0" and ev["producer_op"] == "linear"
    assert ev["producer_inputs"] == "finite"


def test_state_a_forward_keeps_in_attributes_is_put_back() -> None:
    """A forward that rebinds attributes (a call count, a carried hidden state): the
    replay's rebinding is undone, so the next forwards see what they would have seen."""
    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 8)
            self.head = nn.Linear(8, 1)
            self.calls = 0
            self.memory = torch.zeros(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls = self.calls + 1
            h = torch.tanh(self.lin(x) + self.memory)
            self.memory = h.mean(dim=0).detach()
            return self.head(torch.log(h + 1.0 + 10.0 * x[:, :1].clamp(max=0.0)))

    runs = []
    for watched in (False, True):
        runs.append(train(Stateful, log_batch(9), steps=15, watched=watched))
    plain_run, run = runs
    assert run["origin"]["status"] == "producer" and run["origin"]["op"] == "log"
    assert_same_run(plain_run, run)
    assert run["model"].calls == plain_run["model"].calls == 15
    assert same_bits(run["model"].memory, plain_run["model"].memory)


# --------------------------------------------------------------------------- the judge alone
def synthetic(origin: dict[str, Any] | None, bad_step: int = 20) -> Finding:
    """The nonfinite finding of a 3-layer history whose loss is NaN from ``bad_step`` on,
    with ``origin`` as the replay recorded it (the judge needs no torch)."""
    h = linear_stack(3, ["relu"] * 3)
    steps = np.arange(30)
    loss = np.linspace(1.0, 0.5, 30)
    loss[bad_step:] = np.nan
    grad = np.ones((30, 3)) / math.sqrt(3)
    h.record_steps(steps, loss, np.ones(30), grad, np.zeros_like(grad), np.zeros(30))
    h.facts.update(optimizers=[{"type": "SGD", "groups": [{"lr": 0.01}]}],
                   optimizer_roots=[[0]], graph={"0": {"branch_merges": 0, "norm_ops": 0}},
                   module={"0": {"norm_modules": []}})
    h.events.nonfinite_origin = origin
    [f] = nonfinite.detect(Context(h, Thresholds()))
    return f


def test_judge_names_the_producer_and_leads_with_its_layer() -> None:
    f = synthetic({"status": "producer", "step": 20, "module": "2", "module_type": "Linear",
                   "op": "linear", "site": "2.linear@1", "kind": "inf", "inputs": "finite",
                   "input_min": -3.0, "input_max": 5e4, "layer_index": 1})
    assert f.layers == ["2"]  # the producer leads (no gradient was recorded non-finite)
    assert "produced them at step 20: 2 (linear) output Inf from finite inputs (from -3 to " \
        "5.0e+04)" in f.summary
    assert f.evidence["producer"] == "2" and f.evidence["producer_site"] == "2.linear@1"
    cause = next(c for c in f.causes if c.id == "invalid_forward_op")
    assert "2 (linear) output Inf" in cause.text


def test_judge_without_a_replay_or_for_another_step_keeps_its_sentence() -> None:
    plain = synthetic(None)
    assert "producer_status" not in plain.evidence
    assert "the loss itself was non-finite" in plain.summary
    later = synthetic({"status": "producer", "step": 25, "module": "feat", "op": "log",
                       "kind": "nan", "inputs": "finite", "layer_index": None})
    assert "the loss itself was non-finite" in later.summary
    assert "the first non-finite loss (step 25) was born in feat (log)" in later.summary


@pytest.mark.parametrize(("origin", "text", "cause"), [
    ({"status": "input", "kind": "inf", "input_index": 0},
     "input at step 20 already held Inf: no layer", "nonfinite_input"),
    ({"status": "output_finite", "reason": "..."},
     "gave a finite model output, so the loss computation outside the model",
     "invalid_forward_op"),
    ({"status": "weights", "params": ["0.weight"]}, "read non-finite weights (0.weight)",
     "invalid_forward_op"),
    ({"status": "not_checked", "reason": "the loss lives on cuda"},
     "the loss itself was non-finite", "invalid_forward_op"),
])
def test_judge_says_what_the_replay_found_when_no_op_produced_it(
        origin: dict[str, Any], text: str, cause: str) -> None:
    f = synthetic({**origin, "step": 20})
    assert text in f.summary and f.evidence["producer"] is None
    assert f.evidence["producer_status"] == origin["status"]
    assert cause in {c.id for c in f.causes}


def test_gradwatch_run_with_keyword_arguments_says_it_could_not_replay(tmp_path: Path) -> None:
    """Global hooks do not see keyword arguments: the replay without them fails, the report
    says why, and the script runs on unchanged."""
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = nn.Linear(4, 1)\n"
        "    def forward(self, x, *, shift):\n"
        "        return self.lin(torch.log(x + shift))\n"
        "torch.manual_seed(0)\n"
        "model = Net()\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.01)\n"
        "for step in range(12):\n"
        "    x = torch.rand(8, 4)\n"
        "    loss = model(x, shift=-2.0 if step == 7 else 1.0).pow(2).mean()\n"
        "    opt.zero_grad()\n"
        "    loss.backward()\n"
        "    opt.step()\n"
        "print('DONE')\n", encoding="utf-8")
    result = run_script(script)
    assert result.exit_code == 0
    ev = only(result.report, "nonfinite").evidence
    assert ev["producer_status"] == "failed" and ev["producer_step"] == 7
    assert "keyword arguments" in ev["producer_reason"]
