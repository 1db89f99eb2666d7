"""The pieces every figure is made of: SVG text, numbers and ticks, the frame and axes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

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
        out.append(_text((f.left + f.right) / 2, height - 7, x_label, 11, "middle",
                         ' class="gw-xlabel"'))
    if y_label:
        cy = (f.top + f.bottom) / 2
        out.append(_text(13, cy, y_label, 11, "middle",
                         f' class="gw-ylabel" transform="rotate(-90 13 {cy:.1f})"'))
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
