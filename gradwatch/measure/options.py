"""How and how often a monitor measures (``gradwatch.watch``'s options)."""

from __future__ import annotations

import dataclasses

__all__ = ["Options"]


@dataclasses.dataclass(frozen=True)
class Options:
    """How and how often to measure; see ``gradwatch.watch`` for the user-facing names."""

    sync_every: int = 64
    """Steps between host copies. One transfer per this many steps; 64 keeps the sync
    cost negligible on GPU and bounds the device buffers to 64 rows."""
    detail_every: int = 16
    """Weights, updates and activations are measured on steps 0-7 and every this many
    steps after (a snapshot of the weights costs a copy of them)."""
    every: int = 1
    """Gradient norms and loss are measured every this many steps."""
    capacity: int = 2048
    """Rows kept per series; longer runs are downsampled evenly."""
    strict: bool = False
    """Re-raise errors inside gradwatch instead of reporting them and going on."""
    overhead: float | None = 0.01
    """gradwatch's share of the step it keeps to (0.01: 1%) by measuring in detail less
    often on long runs (``measure/cadence.py``); None keeps ``detail_every`` fixed."""
    probe_backwards: int = 64
    """Backward calls without any optimizer step and without any change of the weights
    before a run counts as hand-updated (a change of the weights decides at once)."""

    def __post_init__(self) -> None:
        for name in ("sync_every", "detail_every", "every", "probe_backwards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"option {name!r} must be an integer >= 1, got {value!r}")
        if not isinstance(self.capacity, int) or self.capacity < 16 or self.capacity % 2:
            raise ValueError(f"option 'capacity' must be an even integer >= 16, "
                             f"got {self.capacity!r}")
        if self.overhead is not None and (isinstance(self.overhead, bool) or not isinstance(
                self.overhead, (int, float)) or not 0 < self.overhead <= 1):
            raise ValueError(f"option 'overhead' must be a fraction of the step in (0, 1] "
                             f"(0.01 = 1%) or None (fixed cadence), got {self.overhead!r}")
        if not isinstance(self.strict, bool):
            raise TypeError(f"option 'strict' must be True or False, got {self.strict!r}")
