"""Several processes: DDP and FSDP2 on gloo (CPU), two ranks on 127.0.0.1.

Each rank is a real process: either ``torchrun --no-python gradwatch run`` (the issue's
command line) or one ``python -m gradwatch run`` per rank with the environment torchrun
would give it (RANK, WORLD_SIZE, MASTER_ADDR/PORT), so that each rank's own exit status can
be read. Every launch has a free port and a timeout: a hang fails the test, it never blocks.
The fast tests at the end need no process group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.cli import _ranked
from gradwatch.measure.distributed import Distributed, process_rank, unwrap_parallel

HERE = Path(__file__).parent / "scripts" / "distributed"
SCRIPT = str(HERE / "ddp_train.py")
ROOT = str(Path(__file__).resolve().parent.parent)
TIMEOUT = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(**extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1", GRADWATCH_DIST_TIMEOUT="20", GRADWATCH_DIST_END_WAIT="10")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def ranks(cmd: list[str] | Callable[[int], list[str]], cwd: Path, world: int = 2,
          **extra: Any) -> list[subprocess.CompletedProcess[str]]:
    """One process per rank, as torchrun would start them (``cmd``, or ``cmd(rank)``: a
    rank's own command line); each one's exit status kept."""
    port = free_port()
    procs = [subprocess.Popen(cmd(r) if callable(cmd) else cmd, cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=environment(RANK=r, LOCAL_RANK=r, WORLD_SIZE=world,
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                              **extra))
             for r in range(world)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


def gradwatch_run(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradwatch", "run", SCRIPT, *args]


def torchrun(cwd: Path, *args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
    """The issue's command: torchrun --nproc_per_node 2 --no-python gradwatch run ..."""
    launcher = Path(sys.executable).with_name("torchrun")
    cmd = [str(launcher), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--no-python", sys.executable, "-m",
           "gradwatch", "run", SCRIPT, *args]
    return subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, timeout=TIMEOUT,
                          env=environment(**extra))


def report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def problems(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in r["findings"] if f["severity"] in ("warning", "error")]


# ------------------------------------------------------------------ real processes
@pytest.mark.slow
def test_healthy_ddp_one_report_no_finding_and_bit_identical_weights(tmp_path: Path) -> None:
    done = torchrun(tmp_path, "--json", "r.json", "--sync-every", "10", STEPS=40,
                    SAVE=tmp_path / "watched.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("r*.json")) == ["r.json"]
    assert (done.stdout + done.stderr).count("gradwatch 0.1.0: ") == 1  # rank 0's summary
    r = report(tmp_path / "r.json")
    assert r["run"]["status"] == "completed" and r["run"]["steps"] == 40
    assert r["run"]["world_size"] == 2 and r["run"]["rank"] == 0
    assert problems(r) == [], [f["summary"] for f in problems(r)]
    assert [layer["name"] for layer in r["layers"]] == ["0", "2", "4"]  # no "module." prefix
    d = r["facts"]["distributed"]
    assert d["exchanges"] == 4 and d["combined_until_step"] == 39 and d["local_only"] is None
    assert [i["status"] for i in d["ranks"]] == ["completed", "completed"]
    # each rank's own layer output RMS (its own batches), and where they differ most
    assert all(len(i["act_rms"]) == 3 and i["act_rms_window_end"] == 39 for i in d["ranks"])
    assert d["ranks"][0]["act_rms"] != d["ranks"][1]["act_rms"]
    assert d["act_rms_spread"]["layer"] in ("0", "2", "4")
    assert not r["run"]["internal_errors"]
    # The same run without gradwatch: the same weights, bit for bit.
    plain = ranks([sys.executable, SCRIPT], tmp_path, STEPS=40, SAVE=tmp_path / "plain.pt")
    assert [p.returncode for p in plain] == [0, 0], plain[0].stderr[-2000:]
    watched, ref = torch.load(tmp_path / "watched.pt"), torch.load(tmp_path / "plain.pt")
    assert watched.keys() == ref.keys()
    assert all(torch.equal(watched[k], ref[k]) for k in ref)


@pytest.mark.slow
def test_the_ranks_agree_on_one_detail_cadence(tmp_path: Path) -> None:
    # Rank 0 is within a 90% budget, rank 1 far over a 1e-6 one: each proposes its own
    # interval at every host copy, the exchange takes the largest, and both measure the
    # same detail steps (which a per-layer comparison of the ranks relies on).
    budgets = ("0.9", "1e-6")
    done = ranks(lambda r: gradwatch_run("--json", "r.json", "--per-rank", "--overhead",
                                         budgets[r]), tmp_path, STEPS=1100)
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-2000:]
    both = [report(tmp_path / "r.json"), report(tmp_path / "r.rank1.json")]
    cadences = [r["run"]["cadence"] for r in both]
    assert [c["overhead_budget"] for c in cadences] == [0.9, 1e-6]
    assert cadences[0]["detail_every"] == cadences[1]["detail_every"]
    assert len(cadences[0]["detail_every"]) >= 2  # stretched: rank 1's proposal won
    assert both[0]["series"]["detail_step"] == both[1]["series"]["detail_step"]


@pytest.mark.slow
def test_nan_in_rank_1_batch_names_rank_1_and_the_step(tmp_path: Path) -> None:
    done = ranks(gradwatch_run("--json", "r.json", "--per-rank", "--sync-every", "10"),
                 tmp_path, STEPS=40, NAN_RANK=1, NAN_STEP=25)
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-3000:]
    r = report(tmp_path / "r.json")
    [f] = [f for f in r["findings"] if f["kind"] == "nonfinite"]
    assert f["first_step"] == 25
    assert f["evidence"]["rank"] == 1 and f["evidence"]["rank_step"] == 25
    assert f["evidence"]["this_rank"] == 0
    assert "rank 1's loss was non-finite first, at step 25" in f["summary"]
    assert "gradient all-reduce" in f["summary"]
    d = r["facts"]["distributed"]
    assert d["first_nonfinite"] == {"rank": 1, "step": 25, "what": "loss", "ranks": [1]}
    # Rank 0's own loss turned NaN one step later (the all-reduced NaN gradient).
    assert d["ranks"][0]["first_nonfinite_loss"] == 26
    # --per-rank: rank 1's own report, which says it started there.
    r1 = report(tmp_path / "r.rank1.json")
    [f1] = [f for f in r1["findings"] if f["kind"] == "nonfinite"]
    assert f1["evidence"]["rank"] == 1 and f1["evidence"]["this_rank"] == 1
    assert f1["first_step"] == 25 and "on rank 1" in f1["summary"]
    assert sum(p.stderr.count("gradwatch 0.1.0: ") for p in done) == 2


@pytest.mark.slow
def test_exploding_on_every_rank_is_one_finding_of_no_one_rank(tmp_path: Path) -> None:
    done = ranks(gradwatch_run("--json", "r.json", "--sync-every", "10"), tmp_path,
                 STEPS=40, EXPLODE=1, LR=1.5e-7)
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("r*.json")) == ["r.json"]
    r = report(tmp_path / "r.json")
    exploding = [f for f in r["findings"] if f["kind"] == "exploding_gradient"]
    assert len(exploding) == 1 and exploding[0]["severity"] == "error"
    assert "rank" not in exploding[0]["evidence"]
    assert r["facts"]["distributed"]["exchanges"] == 4


@pytest.mark.slow
def test_a_rank_that_raises_keeps_the_statuses_and_rank_0_reports_failed(
        tmp_path: Path) -> None:
    done = ranks(gradwatch_run("--json", "r.json", "--sync-every", "10"), tmp_path,
                 STEPS=60, RAISE_RANK=1, RAISE_STEP=15)
    assert done[1].returncode == 1 and "rank 1 fails at step 15" in done[1].stderr
    # Rank 0's next gradient all-reduce lost its peer: the script's own error, its status.
    assert done[0].returncode == 1
    assert sorted(p.name for p in tmp_path.glob("r*.json")) == ["r.json"]
    r = report(tmp_path / "r.json")
    assert r["run"]["status"] == "failed" and r["run"]["rank"] == 0
    assert 1 in r["run"]["failed_ranks"]
    assert "rank 1 fails at step 15" in r["run"]["rank_errors"]["1"]
    assert r["facts"]["distributed"]["exchanges"] == 1  # step 10; none at the end
    assert "rank 1 ended with RuntimeError: rank 1 fails at step 15" in done[0].stderr


@pytest.mark.slow
def test_fsdp2_shards_give_the_same_layer_norms_as_ddp(tmp_path: Path) -> None:
    """FSDP2 on each Linear and on a root that owns a parameter of its own (whose unsharded
    copy, in the autograd graph, must not be adopted: its storage is freed after backward)."""
    norms = {}
    for wrap in ("ddp", "fsdp"):
        out = tmp_path / f"{wrap}.json"
        done = ranks(gradwatch_run("--json", str(out), "--sync-every", "5"), tmp_path,
                     STEPS=10, WRAP=wrap, ROOT_PARAM=1)
        assert [p.returncode for p in done] == [0, 0], done[0].stderr[-3000:]
        r = report(out)
        assert not r["run"]["internal_errors"] and problems(r) == []
        norms[wrap] = r["series"]["grad_norm"]
    assert norms["ddp"].keys() == norms["fsdp"].keys()
    assert len(norms["ddp"]) == 4, norms["ddp"].keys()  # the root's gain and three Linear
    for name in norms["ddp"]:
        np.testing.assert_allclose(norms["fsdp"][name], norms["ddp"][name], rtol=1e-5)


@pytest.mark.slow
def test_fsdp2_nan_in_rank_1_batch_names_rank_1_without_replaying_the_forward(
        tmp_path: Path) -> None:
    done = ranks(gradwatch_run("--json", "r.json", "--sync-every", "5", "--per-rank"),
                 tmp_path, STEPS=10, WRAP="fsdp", NAN_RANK=1, NAN_STEP=7)
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-3000:]
    for name, this in (("r.json", 0), ("r.rank1.json", 1)):
        [f] = [f for f in report(tmp_path / name)["findings"] if f["kind"] == "nonfinite"]
        assert f["first_step"] == 7 and f["evidence"]["rank"] == 1
        assert f["evidence"]["this_rank"] == this
    # rank 1 did not replay its FSDP forward alone (the others would never join it)
    assert f["evidence"]["producer_status"] == "skipped"


@pytest.mark.slow
def test_watch_a_ddp_model_with_the_group_started_after_the_watch(tmp_path: Path) -> None:
    done = ranks([sys.executable, str(HERE / "watch_ddp.py"), str(tmp_path / "w.json")],
                 tmp_path)
    assert [p.returncode for p in done] == [0, 0], [p.stderr[-1500:] for p in done]
    r = report(tmp_path / "w.json")
    d = r["facts"]["distributed"]
    assert d["world_size"] == 2 and d["exchanges"] == 4 and d["local_only"] is None
    assert [i["status"] for i in d["ranks"]] == ["completed", "completed"]
    wrapped = report(tmp_path / "w.ddp.json")  # watch(DistributedDataParallel(net))
    assert [layer["name"] for layer in wrapped["layers"]] == ["0", "2"]


@pytest.mark.slow
def test_a_watch_on_rank_0_only_does_not_wait_for_the_others(tmp_path: Path) -> None:
    started = time.monotonic()
    done = ranks([sys.executable, str(HERE / "watch_rank0.py"), str(tmp_path / "w.json")],
                 tmp_path)
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    # rank 1 never announced itself: one short wait (5 s at most), no group, no end wait
    assert time.monotonic() - started < 40
    d = report(tmp_path / "w.json")["facts"]["distributed"]
    assert d["exchanges"] == 0 and "rank(s) 1 run no gradwatch" in d["local_only"]
    assert d["ranks_missing"] == [1]


# ------------------------------------------------------------------ no process group
def test_rank_comes_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_rank() == 3
    monkeypatch.setenv("RANK", "1")
    assert process_rank() == 1


def test_ranked_report_paths() -> None:
    assert _ranked("out/r.json", 1) == str(Path("out/r.rank1.json"))
    assert _ranked("r.html", 3) == "r.rank3.html"
    assert _ranked(None, 1) is None


def test_a_ddp_wrapper_is_seen_through() -> None:
    inner = nn.Linear(2, 2)
    wrapper = type("DistributedDataParallel", (nn.Module,), {})()
    wrapper.module = inner
    assert unwrap_parallel(wrapper) is inner and unwrap_parallel(inner) is inner


def test_shard_norms_combine_into_the_global_norm() -> None:
    # two ranks x one step x three slots: shard norms 3 and 4 make 5; unmeasured stays so
    values = np.array([[[3.0, -1.0, np.inf]], [[4.0, -1.0, 1.0]]])
    out = Distributed._global(values)
    assert out[0, 0] == 5.0 and out[0, 1] == -1.0 and np.isinf(out[0, 2])


def test_one_process_has_no_distributed_facts() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, sync_every=4) as gw:
        for _ in range(9):
            opt.zero_grad()
            model(torch.randn(5, 3)).pow(2).mean().backward()
            opt.step()
    r = gw.report().to_dict()
    assert "distributed" not in r["facts"] and "world_size" not in r["run"]


def test_the_nonfinite_finding_names_the_rank_whose_loss_went_first() -> None:
    """A judged history that another rank's facts say began on rank 1 (as DDP all-reduces
    rank 1's NaN gradient into this rank's at the same step)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, sync_every=4) as gw:
        for step in range(12):
            opt.zero_grad()
            # step 7: the all-reduced NaN gradient, while this rank's own loss is finite
            hook = model.weight.register_hook(lambda g: torch.full_like(g, float("nan"))) \
                if step == 7 else None
            model(torch.randn(5, 3)).pow(2).mean().backward()
            if hook is not None:
                hook.remove()
            opt.step()
    facts = gw.monitor.history.facts
    facts["distributed"] = {"world_size": 2, "rank": 0, "first_nonfinite": {
        "rank": 1, "step": 7, "what": "loss", "ranks": [1]}}
    [f] = [f for f in gw.report().findings if f.kind == "nonfinite"]
    assert f.first_step == 7 and f.evidence["rank"] == 1 and f.evidence["this_rank"] == 0
    assert f.summary.startswith("Non-finite values (NaN/Inf) from step 7 on: rank 1's loss "
                                "was non-finite first, at step 7; this process (rank 0) got "
                                "them from the gradient all-reduce")
    # Every rank at once: no one rank is named.
    facts["distributed"]["first_nonfinite"] = {"rank": 0, "step": 7, "what": "gradient",
                                               "ranks": [0, 1]}
    [f] = [f for f in gw.report().findings if f.kind == "nonfinite"]
    assert f.evidence["rank"] is None and "on ranks 0, 1 at the same step" in f.summary
