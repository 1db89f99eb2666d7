"""Line charts: the loss and any per-step series; the per-layer profile at chosen steps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .svg import (
    _AXIS,
    HEIGHT,
    NONFINITE,
    PALETTE,
    WIDTH,
    _axes,
    _clip,
    _e,
    _Frame,
    _linear_ticks,
    _log_ticks,
    _num,
    _runs,
    _step_text,
    _svg,
    _text,
)

__all__ = ["line_chart", "profile_chart"]


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
               notes: Sequence[str] = (), colors: Mapping[str, str] | None = None) -> str:
    """Named lines ``{name: (xs, ys)}`` with axes, ticks and a legend, as an SVG figure.

    ``None``/NaN/inf in ys are gaps, marked in red along the top edge and named in the
    caption; with ``log_y`` values <= 0 are marked at the bottom edge. ``faint`` adds thin
    pale lines in a series' colour (e.g. single seeds behind their median). ``y_range``
    fixes the y axis (e.g. (0, 1) for fractions); ``x_ticks`` replaces the numeric x ticks
    with labelled positions; ``notes`` are extra caption lines (plain text); ``colors``
    fixes a series' colour (the same arm in the same colour on several charts).
    """
    data = {str(name): _series_xy(xs, ys) for name, (xs, ys) in series.items()}
    extra = {str(name): [_series_xy(xs, ys) for xs, ys in lines]
             for name, lines in (faint or {}).items()}
    names = list(data) + [n for n in extra if n not in data]
    colors = {n: (colors or {}).get(n) or PALETTE[i % len(PALETTE)]
              for i, n in enumerate(names)}
    dashes = {n: (' stroke-dasharray="5 3"' if i >= len(PALETTE) else "")
              for i, n in enumerate(names)}
    every = [(x, y) for xs, ys in [*data.values(), *(p for v in extra.values() for p in v)]
             for x, y in zip(xs, ys, strict=False)]
    plottable = [v for _, y in every if (v := _num(y)) is not None and (not log_y or v > 0)]
    all_x = [x for x, _ in every]
    caption = [_e(n) for n in notes]
    legend_w = 150 if names else 0
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
        body += _axes(_Frame(left, top, right, bottom, (0, 1), (0, 1), False), [], [],
                      x_label, y_label, height)
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

    gaps, low, row = [], 0, 0
    for name, (xs, ys) in data.items():
        vals = [_num(y) for y in ys]
        # a lone finite point (one step, then NaN) is drawn again on top of every line, so
        # that another arm's line cannot hide it
        for a, b in _runs([v is not None and (not log_y or v > 0) for v in vals]):
            if a == b:
                body.append(f'<circle cx="{f.x(xs[a]):.1f}" cy="{f.y(vals[a]):.1f}" r="3.8" '
                            f'fill="{colors[name]}" stroke="#fff" stroke-width="1"/>')
        bad = [v is None for v in vals]
        if not any(bad):
            pass
        elif all(bad):
            gaps.append(f"{_e(name)}: no finite value at all")
        else:
            # each non-finite step is a marker on the x axis, one row per series, in the
            # series' colour edged red: never a band or a line that reads as a value
            y = bottom - 5 - 8 * row
            row += 1
            seen: set[int] = set()
            for i, is_bad in enumerate(bad):
                px = f.x(xs[i])
                if is_bad and round(px / 3) not in seen:
                    seen.add(round(px / 3))
                    body.append(f'<path class="gw-nonfinite" '
                                f'd="M{px:.1f} {y + 3:.1f}l-3.5 -6h7z" '
                                f'fill="{colors[name]}" stroke="{NONFINITE}" '
                                f'stroke-width="0.8"/>')
            for a, b in _runs(bad):
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
                    body.append(f'<path d="M{px:.1f} {top + 1:.1f}l-4 7h8z" '
                                f'fill="{colors[name]}"/>')
    if gaps:
        shown = gaps[:6] + ([f"and {len(gaps) - 6} more gaps"] if len(gaps) > 6 else [])
        caption.append("<b style='color:" + NONFINITE + "'>▼ red-edged marks on the x "
                       "axis</b>: steps whose value is not finite (NaN/inf) or not recorded, "
                       "not drawn as values: " + "; ".join(shown) + ".")
    if low:
        caption.append(f"▲ at the top edge: {low} value{'s' if low > 1 else ''} ≤ 0, "
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
