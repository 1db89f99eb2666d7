"""The remedy catalogue: one entry per remedy, with code filled from the run's measurements,
and the appliers that make each remedy change a live model and optimizer itself."""

from .apply import APPLIERS, Application, Applier, NotApplicable, apply
from .catalogue import CATALOGUE, RemedyEntry, remedy

__all__ = ["APPLIERS", "CATALOGUE", "Application", "Applier", "NotApplicable", "RemedyEntry",
           "apply", "remedy"]
