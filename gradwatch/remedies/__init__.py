"""The remedy catalogue: one entry per remedy, with code filled from the run's measurements."""

from .catalogue import CATALOGUE, RemedyEntry, remedy

__all__ = ["CATALOGUE", "RemedyEntry", "remedy"]
