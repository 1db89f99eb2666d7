"""Figures as inline SVG: hand-written, no scripts, no network, every user-provided name escaped.

Each function returns one ``<figure class="gw-figure" data-figure="KIND">`` holding an
``<svg>`` with a fixed ``viewBox`` that scales to the width of its container, and a
``<figcaption>`` with the notes a reader needs (gaps, non-finite values, what the colours mean).
Values arrive as in the report's JSON: ``None`` is a non-finite or unrecorded value.

>>> fig = line_chart({"loss": ([0, 1, 2], [2.0, 1.0, None])}, "Loss", "step", "loss")
>>> 'data-figure="line"' in fig and "<script" not in fig
True
"""

from __future__ import annotations

from .heatmap import _color, heatmap, row_label
from .lines import line_chart, profile_chart
from .svg import HEIGHT, NONFINITE, PALETTE, WIDTH, ZERO

__all__ = ["HEIGHT", "NONFINITE", "PALETTE", "WIDTH", "ZERO", "_color", "heatmap", "line_chart",
           "profile_chart", "row_label"]
