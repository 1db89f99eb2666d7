"""The gradient-flow heatmap: layers x steps on a log colour scale, non-finite cells red."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import Any

from .svg import (
    _AXIS,
    _CHAR,
    _LEVELS,
    _TEXT,
    _VIRIDIS,
    NONFINITE,
    WIDTH,
    ZERO,
    _clip,
    _e,
    _fmt,
    _index_ticks,
    _is_inf,
    _linear_ticks,
    _num,
    _step_text,
    _svg,
    _text,
)

__all__ = ["heatmap", "row_label"]


def row_label(name: str, layer_type: str | None = None) -> str:
    """A heatmap row's label: ``layer 4 (Linear)`` for a Sequential's index, ``fc1
    (Linear)`` for a named layer; the bare name when its type is unknown."""
    name = str(name)
    head = f"layer {name}" if name.replace(".", "").isdigit() else name
    return f"{head} ({layer_type})" if layer_type else head


def _color(t: float) -> str:
    """Viridis at t in [0, 1], quantised to _LEVELS colours."""
    t = min(1.0, max(0.0, t))
    t = round(t * (_LEVELS - 1)) / (_LEVELS - 1)
    pos = t * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    frac = pos - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    rgb = [round(int(a[k:k + 2], 16) * (1 - frac) + int(b[k:k + 2], 16) * frac)
           for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _cell(values: Sequence[Any], bad: Sequence[Any]) -> tuple[str, float | None]:
    """One downsampled cell: ('nonfinite' | 'blank' | 'zero' | 'value', geometric mean)."""
    if any(_is_inf(v) for v in values) or any((_num(b) or 0) > 0 for b in bad):
        return "nonfinite", None
    finite = [v for v in (_num(x) for x in values) if v is not None and v >= 0]
    if not finite:
        return "blank", None
    positive = [v for v in finite if v > 0]
    if not positive:
        return "zero", None
    return "value", sum(math.log10(v) for v in positive) / len(positive)


def heatmap(rows: Sequence[str], xs: Sequence[Any], values: Sequence[Sequence[Any]],
            title: str = "Gradient flow: gradient norm per layer and step", *,
            kind: str = "gradient-heatmap", nonfinite: Sequence[Sequence[Any]] | None = None,
            x_label: str = "step", value_label: str = "gradient norm",
            max_columns: int = 200, log_range: tuple[float, float] | None = None,
            notes: Sequence[str] = ()) -> str:
    """Layers (rows, forward order) x steps, log10 colour scale; input side at the bottom.

    ``values[r][c]`` is row r's value at step ``xs[c]``. NaN/None cells are blank unless
    ``nonfinite[r][c]`` (the report's per-layer count of non-finite values) is > 0; those
    and +-inf are drawn red, exact zeros grey. More than ``max_columns`` steps are merged
    into bins (geometric mean; a bin with a non-finite value is non-finite).
    ``log_range`` fixes the colour scale (log10 of the values at its ends), so that several
    heatmaps can share one.
    """
    n_rows, n_cols = len(rows), len(xs)
    caption = [_e(n) for n in notes]
    height = int(min(440, max(200, 78 + 16 * n_rows)))
    label_chars = 22
    label_w = min(label_chars, max([len(str(r)) for r in rows] or [4])) * 10 * _CHAR + 10
    # room for the row labels, and for "output side" / "input side" above and below them
    left, top, right, bottom = max(70.0, 12 + label_w), 36.0, WIDTH - 96.0, height - 42.0
    if not n_rows or not n_cols:
        what = "no steps recorded" if not n_cols else "no layers recorded"
        body = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
                f'fill="#fafafa" stroke="{_AXIS}"/>',
                _text((left + right) / 2, (top + bottom) / 2, what, 13, "middle")]
        body.append(_text((left + right) / 2, height - 8, x_label, 11, "middle",
                          ' class="gw-xlabel"'))
        return _svg(kind, title, body, [*caption, _e(what.capitalize() + ".")], height=height)

    per_bin = max(1, math.ceil(n_cols / max(1, max_columns)))
    bins = [(a, min(a + per_bin, n_cols)) for a in range(0, n_cols, per_bin)]
    bad_rows = nonfinite if nonfinite is not None else [[] for _ in rows]
    cells = []
    for r in range(n_rows):
        row_vals, row_bad = list(values[r]) if r < len(values) else [], \
            list(bad_rows[r]) if r < len(bad_rows) else []
        cells.append([_cell(row_vals[a:b], row_bad[a:b]) for a, b in bins])
    logs = [v for row in cells for state, v in row if state == "value" and v is not None]
    if logs or log_range is not None:
        lo, hi = log_range if log_range is not None else (min(logs), max(logs))
        if hi - lo < 1:  # at least one decade: noise of a few percent must not look like news
            lo, hi = (lo + hi) / 2 - 0.5, (lo + hi) / 2 + 0.5
    else:
        lo, hi = -1.0, 1.0

    cell_w = (right - left) / len(bins)
    cell_h = (bottom - top) / n_rows
    paths: dict[str, list[str]] = {}
    for r, row in enumerate(cells):
        y = bottom - (r + 1) * cell_h  # row 0 (input side) at the bottom
        c = 0
        while c < len(row):
            state, v = row[c]
            fill = (NONFINITE if state == "nonfinite" else ZERO if state == "zero" else
                    _color((v - lo) / (hi - lo)) if state == "value" and v is not None
                    else None)
            end = c + 1
            while end < len(row) and row[end][0] == state and (
                    state != "value" or _color((row[end][1] - lo) / (hi - lo)) == fill):
                end += 1
            if fill is not None:
                # cells overlap their right neighbour by a hair so no white seams show
                w = (end - c) * cell_w + (0.4 if end < len(row) else 0)
                paths.setdefault(fill, []).append(
                    f"M{left + c * cell_w:.2f} {y:.2f}h{w:.2f}v{cell_h + 0.4:.2f}h{-w:.2f}z")
            c = end
    body = [f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
            f'height="{bottom - top:.1f}" fill="#fff"/>']
    body += [f'<path fill="{fill}" d="{"".join(d)}"/>' for fill, d in paths.items()]
    body.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
                f'height="{bottom - top:.1f}" fill="none" stroke="{_AXIS}"/>')

    label_every = max(1, math.ceil(11 / cell_h))
    for r in range(n_rows):
        if r % label_every and r != n_rows - 1:
            continue
        name = str(rows[r])
        y = bottom - (r + 0.5) * cell_h + 3.5
        body.append(f'<text class="gw-row" data-row="{r}" x="{left - 5:.1f}" y="{y:.1f}" '
                    f'font-size="10" text-anchor="end" fill="{_TEXT}"><title>{_e(name)}</title>'
                    f"{_e(_clip(name, label_chars))}</text>")
    body.append(_text(left - 5, top - 4, "output side", 9, "end", ' font-style="italic"'))
    body.append(_text(left - 5, bottom + 14, "input side", 9, "end", ' font-style="italic"'))
    for px, label in _step_ticks([_num(xs[a]) for a, _ in bins], left, cell_w, per_bin == 1):
        body.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{bottom:.1f}" y2="{bottom + 4:.1f}" '
                    f'stroke="{_AXIS}"/>')
        body.append(_text(px, bottom + 15, label, 10, "middle"))
    body.append(_text((left + right) / 2, height - 8, x_label, 11, "middle",
                      ' class="gw-xlabel"'))
    body += _colour_bar(right + 14, top, bottom, lo, hi, value_label, cells)

    states = {s for row in cells for s, _ in row}
    if per_bin > 1:
        caption.append(f"{n_cols} steps merged into {len(bins)} columns of {per_bin} steps "
                       f"(geometric mean).")
    if "nonfinite" in states:
        caption.append(f"<b style='color:{NONFINITE}'>Red cells</b>: non-finite values "
                       f"(NaN or inf).")
    if "zero" in states:
        caption.append("Grey cells: exactly zero.")
    if "blank" in states:
        caption.append("Blank cells: not measured.")
    if not logs:
        caption.append("No finite positive value to colour.")
    return _svg(kind, title, body, caption, height=height)


def _step_ticks(starts: Sequence[float | None], left: float, cell_w: float,
                centred: bool) -> list[tuple[float, str]]:
    """Round step numbers placed where they fall among the columns (each column starts at
    ``starts[i]``; a one-step column is labelled at its centre, a merged one at its edge)."""
    offset = 0.5 if centred else 0.0
    known = [s for s in starts if s is not None]
    if len(known) < 2 or len(known) < len(starts) or \
            any(b <= a for a, b in itertools.pairwise(known)):
        return [(left + (i + offset) * cell_w,
                 "?" if starts[i] is None else _step_text(starts[i]))  # type: ignore[arg-type]
                for i in _index_ticks(len(starts))]
    out = []
    for t in _linear_ticks(known[0], known[-1], 6, integer=True)[2]:
        if not known[0] - 1e-9 <= t <= known[-1] + 1e-9:
            continue
        i = bisect.bisect_right(known, t + 1e-9) - 1
        frac = 0.0 if i == len(known) - 1 else (t - known[i]) / (known[i + 1] - known[i])
        out.append((left + (i + offset + frac) * cell_w, _step_text(t)))
    return out


def _colour_bar(x: float, top: float, bottom: float, lo: float, hi: float, label: str,
                cells: Sequence[Sequence[tuple[str, float | None]]]) -> list[str]:
    """Vertical log10 colour bar (decades labelled) plus swatches for zero and non-finite."""
    states = {s for row in cells for s, _ in row}
    swatches = [(s, c) for s, c in (("non-finite", NONFINITE), ("0", ZERO))
                if ("nonfinite" if s == "non-finite" else "zero") in states]
    bar_bottom = bottom - 16 * len(swatches)
    cy = (top + bar_bottom) / 2
    out = [_text(WIDTH - 6, cy, label + " (log scale)", 9, "middle",
                 f' class="gw-clabel" transform="rotate(-90 {WIDTH - 6} {cy:.1f})"')]
    n = _LEVELS
    h = (bar_bottom - top) / n
    for i in range(n):
        out.append(f'<rect x="{x:.1f}" y="{bar_bottom - (i + 1) * h:.2f}" width="12" '
                   f'height="{h + 0.4:.2f}" fill="{_color(i / (n - 1))}"/>')
    out.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="12" height="{bar_bottom - top:.1f}" '
               f'fill="none" stroke="{_AXIS}" stroke-width="0.6"/>')
    first, last = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
    decades = list(range(first, last + 1))
    if len(decades) > 7:
        every = math.ceil(len(decades) / 7)
        decades = decades[::every]
    def row(t: float) -> float:
        return bar_bottom - (t - lo) / (hi - lo) * (bar_bottom - top)

    ticks = [float(d) for d in decades]
    if len(ticks) < 2:  # less than two decades in range: label the ends too, apart from them
        ticks += [e for e in (lo, hi) if all(abs(row(e) - row(t)) > 11 for t in ticks)]
    for t in ticks:
        py = row(t)
        out.append(f'<line x1="{x + 12:.1f}" x2="{x + 16:.1f}" y1="{py:.1f}" y2="{py:.1f}" '
                   f'stroke="{_AXIS}"/>')
        out.append(_text(x + 18, py + 3.5, _fmt(10 ** t), 9))
    for k, (name, color) in enumerate(swatches):
        y = bar_bottom + 6 + 16 * k
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="12" height="10" fill="{color}"/>')
        out.append(_text(x + 18, y + 9, name, 9))
    return out
