"""The lab: the seed documents' experiments, reproduced as written and watched by gradwatch."""

from .seed002 import EXPERIMENTS, RUNS, RunResult, Variant

__all__ = ["EXPERIMENTS", "RUNS", "RunResult", "Variant"]
