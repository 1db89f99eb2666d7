"""gradwatch: watch PyTorch training and say, with evidence, where gradients go wrong."""

from ._version import __version__
from .findings import KINDS, Cause, Finding, Remedy
from .preflight import preflight
from .report import Report
from .thresholds import Thresholds
from .watch import Watch, watch

__all__ = ["KINDS", "Cause", "Finding", "Remedy", "Report", "Thresholds", "Watch",
           "__version__", "preflight", "watch"]
