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

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

__all__ = ["HEIGHT", "WIDTH", "heatmap", "line_chart", "profile_chart"]

WIDTH = 640
HEIGHT = 280

# tab10 without its red, which marks non-finite values; dashed lines after the ninth series
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
NONFINITE = "#d62728"
ZERO = "#a0a0a0"
_GRID = "#e6e6e6"
_AXIS = "#555"
_TEXT = "#222"
# viridis at 0, 0.1, ..., 1 (matplotlib): perceptually even, readable in grey, no red in it
_VIRIDIS = ("#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884",
            "#44bf70", "#7ad151", "#bddf26", "#fde725")
_LEVELS = 48  # colours of the heatmap scale: few enough to merge neighbouring cells
_CHAR = 0.6   # average glyph width of the sans-serif font, in units of the font size


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _num(v: Any) -> float | None:
    """``v`` as a finite float, or None (None, NaN, +-inf and non-numbers)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _is_inf(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isinf(v)


def _fmt(v: float) -> str:
    """A short tick label: 0.01, 2.5, 1e-09 -> 1e-9, 3e+12 -> 3e12."""
    if v == 0:
        return "0"
    if 1e3 <= abs(v) < 1e5:
        return f"{v:.0f}"
    if 1e-3 <= abs(v) < 1e3 and "e" not in f"{v:.3g}":
        return f"{v:.3g}"
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant.removesuffix('.0')}e{int(exp)}"


def _clip(name: str, chars: int) -> str:
    """Shorten a long name from the left: the end of a dotted path says most."""
    return name if len(name) <= chars else "…" + name[-(chars - 1):]


def _text(x: float, y: float, s: str, size: float = 11, anchor: str = "start",
          extra: str = "", full: str | None = None) -> str:
    tip = f"<title>{_e(full)}</title>" if full is not None and full != s else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="{_TEXT}"{extra}>{tip}{_e(s)}</text>')


def _svg(kind: str, title: str, body: Sequence[str], notes: Iterable[str],
         width: int = WIDTH, height: int = HEIGHT) -> str:
    """Wrap a figure's SVG body: stable class and data-figure, fixed viewBox, title, notes."""
    caption = "".join(f"<span class='gw-note'>{n}</span> " for n in notes)  # notes: escaped
    return (f'<figure class="gw-figure" data-figure="{_e(kind)}">'
            f'<svg class="gw-svg" viewBox="0 0 {width} {height}" width="100%" '
            f'preserveAspectRatio="xMidYMid meet" role="img" aria-label="{_e(title)}" '
            f'style="display:block;height:auto;background:#fff;'
            f'font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif">'
            f"<title>{_e(title)}</title>"
            + _text(8, 17, title if len(title) <= 80 else title[:79] + "…", 13,
                    extra=' font-weight="600"')
            + "".join(body) + "</svg>"
            + (f"<figcaption>{caption.strip()}</figcaption>" if caption else "")
            + "</figure>")


def _nice_step(span: float, n: int, integer: bool = False) -> float:
    raw = span / max(n, 1)
    if integer and raw <= 1:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer and mag < 10 else (1, 2, 2.5, 5, 10)
    return next(m * mag for m in steps if m * mag >= raw)


def _linear_ticks(lo: float, hi: float, n: int = 5,
                  integer: bool = False) -> tuple[float, float, list[float]]:
    """A range widened to round numbers and the ticks inside it (whole numbers only when
    ``integer``, e.g. for steps)."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, n, integer)
    lo2, hi2 = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    count = round((hi2 - lo2) / step)
    return lo2, hi2, [lo2 + i * step for i in range(count + 1)]


def _log_ticks(lo: float, hi: float, n: int = 6) -> tuple[float, float, list[float]]:
    """Decade range (as exponents) around [lo, hi] (> 0) and the decades to label."""
    elo, ehi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if ehi <= elo:
        ehi = elo + 1
    every = max(1, math.ceil((ehi - elo) / n))
    return float(elo), float(ehi), [float(e) for e in range(elo, ehi + 1, every)]


def _index_ticks(n: int, count: int = 6) -> list[int]:
    if n <= 1:
        return [0] if n else []
    step = max(1, math.ceil((n - 1) / (count - 1)))
    return list(range(0, n, step))


class _Frame:
    """A plot area inside the viewBox with x and y scales (y possibly log10)."""

    def __init__(self, left: float, top: float, right: float, bottom: float,
                 x_range: tuple[float, float], y_range: tuple[float, float], log_y: bool):
        self.left, self.top, self.right, self.bottom = left, top, right, bottom
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.log_y = log_y

    def x(self, v: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (v - self.x0) / span * (self.right - self.left)

    def y(self, v: float) -> float:
        """Pixel row of a value (for log_y a value > 0; exponents are given to y_exp)."""
        return self.y_exp(math.log10(v)) if self.log_y else self.y_exp(v)

    def y_exp(self, t: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        py = self.bottom - (t - self.y0) / span * (self.bottom - self.top)
        # a fixed y range (fractions in [0, 1]) must not let a line leave the frame
        return min(self.bottom + 2, max(self.top - 2, py))


def _axes(f: _Frame, y_ticks: list[float], x_ticks: list[tuple[float, str]], x_label: str,
          y_label: str, height: float, rotate_x: bool = False) -> list[str]:
    out = [f'<rect x="{f.left:.1f}" y="{f.top:.1f}" width="{f.right - f.left:.1f}" '
           f'height="{f.bottom - f.top:.1f}" fill="none" stroke="{_AXIS}" stroke-width="1"/>']
    for t in y_ticks:
        py = f.y_exp(t)
        label = _fmt(10 ** t) if f.log_y else _fmt(t)
        out.append(f'<line x1="{f.left:.1f}" x2="{f.right:.1f}" y1="{py:.1f}" y2="{py:.1f}" '
                   f'stroke="{_GRID}"/>')
        out.append(_text(f.left - 5, py + 3.5, label, 10, "end"))
    for v, label in x_ticks:
        px = f.x(v)
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{f.bottom:.1f}" '
                   f'y2="{f.bottom + 4:.1f}" stroke="{_AXIS}"/>')
        if rotate_x:
            out.append(_text(px + 3, f.bottom + 12, label, 9, "end",
                             f' transform="rotate(-40 {px + 3:.1f} {f.bottom + 12:.1f})"'))
        else:
            out.append(_text(px, f.bottom + 15, label, 10, "middle"))
    if x_label:
        out.append(_text((f.left + f.right) / 2, height - 7, x_label, 11, "middle"))
    if y_label:
        cy = (f.top + f.bottom) / 2
        out.append(_text(13, cy, y_label, 11, "middle", f' transform="rotate(-90 13 {cy:.1f})"'))
    return out


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """Index ranges [a, b] (inclusive) where flags is True."""
    out, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i - 1))
            start = None
    return out


def _step_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else _fmt(x)


def _lines_body(f: _Frame, xs: Sequence[float], ys: Sequence[Any], color: str, width: float,
                dash: str, opacity: float, markers: bool) -> list[str]:
    """One series as polylines broken at gaps; isolated points as dots."""
    vals = [_num(y) for y in ys]
    ok = [v is not None and (not f.log_y or v > 0) for v in vals]
    out = []
    for a, b in _runs(ok):
        pts = [(f.x(xs[i]), f.y(vals[i])) for i in range(a, b + 1)]  # type: ignore[arg-type]
        if len(pts) == 1 or markers:
            out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.6" fill="{color}" '
                    f'fill-opacity="{opacity}"/>' for px, py in pts]
        if len(pts) > 1:
            d = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" '
                       f'stroke-width="{width}" stroke-opacity="{opacity}" '
                       f'stroke-linejoin="round"{dash}/>')
    return out


def _series_xy(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[float], list[Any]]:
    """Pairs with a finite x; y kept as given (None/NaN/inf are gaps)."""
    pairs = [(_num(x), y) for x, y in zip(xs, ys, strict=False)]
    kept = [(x, y) for x, y in pairs if x is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def line_chart(series: Mapping[str, tuple[Sequence[Any], Sequence[Any]]], title: str,
               x_label: str, y_label: str, log_y: bool = False, *, kind: str = "line",
               y_range: tuple[float, float] | None = None,
               faint: Mapping[str, Sequence[tuple[Sequence[Any], Sequence[Any]]]] | None = None,
               x_ticks: Sequence[tuple[float, str]] | None = None, markers: bool = False,
               notes: Sequence[str] = ()) -> str:
    """Named lines ``{name: (xs, ys)}`` with axes, ticks and a legend, as an SVG figure.

    ``None``/NaN/inf in ys are gaps, marked in red along the top edge and named in the
    caption; with ``log_y`` values <= 0 are marked at the bottom edge. ``faint`` adds thin
    pale lines in a series' colour (e.g. single seeds behind their median). ``y_range``
    fixes the y axis (e.g. (0, 1) for fractions); ``x_ticks`` replaces the numeric x ticks
    with labelled positions; ``notes`` are extra caption lines (plain text).
    """
    data = {str(name): _series_xy(xs, ys) for name, (xs, ys) in series.items()}
    extra = {str(name): [_series_xy(xs, ys) for xs, ys in lines]
             for name, lines in (faint or {}).items()}
    names = list(data) + [n for n in extra if n not in data]
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    dashes = {n: (' stroke-dasharray="5 3"' if i >= len(PALETTE) else "")
              for i, n in enumerate(names)}
    every = [(x, y) for xs, ys in [*data.values(), *(p for v in extra.values() for p in v)]
             for x, y in zip(xs, ys, strict=False)]
    plottable = [v for _, y in every if (v := _num(y)) is not None and (not log_y or v > 0)]
    all_x = [x for x, _ in every]
    caption = [_e(n) for n in notes]
    legend_w = 150 if len(names) > 1 else 0
    rotate = x_ticks is not None and len(x_ticks) > 6
    # rotated tick labels (layer names) need room below the axis, as much as the longest
    room = math.ceil(3.6 * min(16, max(len(lab) for _, lab in x_ticks))) if rotate else 0
    height = HEIGHT + room  # type: ignore[arg-type]
    bottom = height - 42 - room
    left, top, right = 62.0, 28.0, WIDTH - 14.0 - legend_w

    if not plottable:
        what = "no steps recorded" if not all_x else "no finite values to plot"
        body = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
                f'fill="#fafafa" stroke="{_AXIS}"/>',
                _text((left + right) / 2, (top + bottom) / 2, what, 13, "middle",
                      ' fill-opacity="0.8"')]
        return _svg(kind, title, body, [*caption, _e(what.capitalize() + ".")], height=height)

    if y_range is not None:
        y_ticks = _linear_ticks(*y_range, 5)[2]
        pad = 0.03 * (y_range[1] - y_range[0])  # a line at 0 must not hide in the frame
        y0, y1 = y_range[0] - pad, y_range[1] + pad
    elif log_y:
        y0, y1, y_ticks = _log_ticks(min(plottable), max(plottable))
    else:
        y0, y1, y_ticks = _linear_ticks(min(plottable), max(plottable))
    x0, x1 = min(all_x), max(all_x)
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    f = _Frame(left, top, right, bottom, (x0, x1), (y0, y1), log_y)
    if x_ticks is None:
        ticks = _linear_ticks(x0, x1, 6, all(float(x).is_integer() for x in all_x))[2]
        xt = [(t, _step_text(t)) for t in ticks if x0 - 1e-9 <= t <= x1 + 1e-9]
    else:
        keep = max(1, math.ceil(len(x_ticks) / 16))
        xt = [(v, _clip(lab, 16)) for v, lab in list(x_ticks)[::keep]]
    body = _axes(f, y_ticks, xt, x_label, y_label, height, rotate)
    for name, lines in extra.items():
        for xs, ys in lines:
            body += _lines_body(f, xs, ys, colors[name], 1.0, dashes[name], 0.28, False)
    for name, (xs, ys) in data.items():
        body += _lines_body(f, xs, ys, colors[name], 2.0, dashes[name], 1.0,
                            markers or len(xs) <= 2)

    gaps, low = [], 0
    for name, (xs, ys) in data.items():
        bad = [_num(y) is None for y in ys]
        if ys and all(bad):
            gaps.append(f"{_e(name)}: no finite value at all")
            continue
        for a, b in _runs(bad):
            xa, xb = f.x(xs[a]), f.x(xs[b])
            body.append(f'<rect x="{xa - 1:.1f}" y="{top + 1:.1f}" width="{xb - xa + 2:.1f}" '
                        f'height="4" fill="{NONFINITE}" fill-opacity="0.45"/>')
            body.append(f'<path d="M{xa:.1f} {top + 1:.1f}l-4 -7h8z" fill="{NONFINITE}"/>')
            span = (f"from step {_step_text(xs[a])} on" if b == len(xs) - 1 else
                    f"at step {_step_text(xs[a])}" if a == b else
                    f"at steps {_step_text(xs[a])}-{_step_text(xs[b])}")
            gaps.append(f"{_e(name)}: no finite value {span}")
        if log_y:
            for i, y in enumerate(ys):
                v = _num(y)
                if v is not None and v <= 0:
                    low += 1
                    px = f.x(xs[i])
                    body.append(f'<path d="M{px:.1f} {bottom - 1:.1f}l-4 -7h8z" '
                                f'fill="{colors[name]}"/>')
    if gaps:
        shown = gaps[:6] + ([f"and {len(gaps) - 6} more gaps"] if len(gaps) > 6 else [])
        caption.append("<b style='color:" + NONFINITE + "'>▼ red marks</b>: steps without a "
                       "finite value (NaN/inf, or not recorded): " + "; ".join(shown) + ".")
    if low:
        caption.append(f"▼ at the bottom edge: {low} value{'s' if low > 1 else ''} ≤ 0, "
                       f"which a log scale cannot show.")

    if legend_w:
        body += _legend(names, colors, dashes, WIDTH - legend_w, top, bottom)
    return _svg(kind, title, body, caption, height=height)


def _legend(names: Sequence[str], colors: Mapping[str, str], dashes: Mapping[str, str],
            x: float, top: float, bottom: float) -> list[str]:
    out, row = [], 14.0
    fits = int((bottom - top) // row)
    shown = names if len(names) <= fits else names[: fits - 1]
    for i, name in enumerate(shown):
        y = top + 6 + i * row
        out.append(f'<line x1="{x:.1f}" x2="{x + 18:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="{colors[name]}" stroke-width="2.5"{dashes[name]}/>')
        out.append(_text(x + 23, y + 3.5, _clip(name, 19), 10, full=name))
    if len(shown) < len(names):
        out.append(_text(x, top + 6 + len(shown) * row + 3.5,
                         f"and {len(names) - len(shown)} more", 10))
    return out


def profile_chart(layers: Sequence[str], profiles: Mapping[str, Sequence[Any]],
                  title: str = "Gradient norm per layer", y_label: str = "gradient norm",
                  *, kind: str = "gradient-profile", notes: Sequence[str] = ()) -> str:
    """One line per chosen step across the layers (forward order, input side left), log y."""
    xs = list(range(len(layers)))
    series = {label: (xs, list(values)) for label, values in profiles.items()}
    return line_chart(series, title, "layer (forward order: input side left, output right)",
                      y_label, log_y=True, kind=kind, markers=len(layers) <= 40,
                      x_ticks=[(i, str(name)) for i, name in enumerate(layers)], notes=notes)


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
    body.append(_text((left + right) / 2, height - 8, x_label, 11, "middle"))
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
                 f' transform="rotate(-90 {WIDTH - 6} {cy:.1f})"')]
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
