"""The benchmarks' command lines run: ``overhead.py --list`` names every peer (and why one
cannot run here), ``memory.py`` prints its table. Behaviour only: no timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_overhead_lists_models_and_peers() -> None:
    out = bench("overhead.py", "--list")
    for name in ("mlp-10m", "transformer", "cnn", "lstm", "gpt-124m", "lightning-grad-norm",
                 "tb-histograms", "wandb-all-1", "wandb-all-100", "anomaly", "cockpit-economy"):
        assert name in out
    peers = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(peers) == 6
    assert all(line.endswith(": available") or ": not " in line for line in peers)


def test_overhead_runs_a_peer_and_option_sets_beside_gradwatch() -> None:
    out = bench("overhead.py", "--models", "--variants", "norms_only", "--peers", "anomaly",
                "--peer-models", "cnn", "--variant-models", "cnn", "--steps", "1",
                "--repeats", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith("cnn ")]
    assert sorted(r[2] for r in rows) == ["anomaly", "norms_only"]


def test_memory_table() -> None:
    out = bench("memory.py", "--steps", "100")
    assert "history" in out and "device buf" in out
    assert out.strip().splitlines()[-1].split()[0] == "100"
