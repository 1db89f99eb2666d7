"""The lab: the seed documents' experiments, run as written, judged on what they show.

``EXPERIMENTS`` lists every experiment by name, in the order ``gradwatch demo`` runs them.
To add one: write a module with its arms (``run(seed) -> RunResult`` functions under
``gradwatch.watch``), a judge and an :class:`~gradwatch.lab.core.Experiment`, and list it
here.
"""

from __future__ import annotations

from . import architectures, recurrent, seed000, seed001, seed002, seed003
from .core import Arm, ArmResults, Experiment, RunResult, Verdict

__all__ = ["EXPERIMENTS", "Arm", "ArmResults", "Experiment", "RunResult", "Verdict"]

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    *seed002.EXPERIMENTS,
    *seed000.EXPERIMENTS,
    *seed001.EXPERIMENTS,
    *seed003.EXPERIMENTS,
    *architectures.EXPERIMENTS,
    *recurrent.EXPERIMENTS,
)}
"""Every experiment by name, in the order the demo runs them."""
