"""A model compiled by Inductor trains bit-identically under ``gradwatch run`` (slow: Inductor
generates and compiles C++ for it, about half a minute of CPU per process).

Plain python and ``gradwatch run`` of the same script run one after the other in the
background (``start_in_background``); the second reuses the first's compiled kernels only
where its graphs are the same, so a graph break caused by gradwatch would show as other
numbers.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_run_cli import Launcher
from test_runs_unchanged import assert_same_run

SCRIPT = str(Path(__file__).parent / "scripts" / "train_bn_dropout.py")
PLAIN = [sys.executable, SCRIPT, "plain.pt", "--compile", "inductor"]
WATCHED = [sys.executable, "-m", "gradwatch", "run", SCRIPT, "run.pt", "--compile", "inductor",
           "--json", "out.json", "--quiet"]
_STARTED: list[Launcher] = []


def start_in_background() -> Launcher:
    if not _STARTED:
        cache = tempfile.mkdtemp(prefix="gradwatch-inductor-cache-")
        _STARTED.append(Launcher({"inductor": ["/bin/sh", "-c", " ".join(PLAIN) + " && " +
                                               " ".join(WATCHED)]},
                                 env={"TORCHINDUCTOR_CACHE_DIR": cache}))
    return _STARTED[0]


@pytest.fixture(scope="module")
def pair() -> Iterator[Launcher]:
    launcher = start_in_background()
    yield launcher
    launcher.close()


@pytest.mark.slow
def test_inductor_compiled_run_is_bit_identical_under_run(pair: Launcher) -> None:
    done = pair["inductor"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(torch.load(done.folder / "plain.pt"), torch.load(done.folder / "run.pt"))
    report = done.report()
    assert report["run"]["steps"] == 40
    assert report["facts"]["compiled_roots"] == ["model"]
