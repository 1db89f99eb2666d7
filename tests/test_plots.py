"""The SVG figures: escaping, gaps and non-finite values, log scales, input side at the bottom."""

from __future__ import annotations

import math
import re

import torch
from conftest import deep_net, seed_data, train_full_batch
from torch import nn

import gradwatch
from gradwatch.report.plots import NONFINITE, ZERO, _color, heatmap, line_chart, profile_chart

EVIL = "<script>alert(1)</script>"


def _polylines(svg: str) -> list[list[tuple[float, float]]]:
    """The points of every solid line drawn (faint lines included)."""
    return [[tuple(map(float, p.split(","))) for p in pts.split()]  # type: ignore[misc]
            for pts in re.findall(r'<polyline points="([^"]*)"', svg)]


def _cells(svg: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """Heatmap cells by fill colour: (x, y, width, height) of each run of merged cells."""
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    for fill, d in re.findall(r'<path fill="(#[0-9a-f]{6})" d="([^"]*)"', svg):
        out[fill] = [tuple(map(float, m)) for m in  # type: ignore[misc]
                     re.findall(r"M([\d.-]+) ([\d.-]+)h([\d.-]+)v([\d.-]+)", d)]
    return out


def _at(cells: dict[str, list[tuple[float, float, float, float]]], x: float, y: float
        ) -> str | None:
    """The fill of the cell covering point (x, y), if any."""
    hits = [fill for fill, rects in cells.items() for cx, cy, w, h in rects
            if cx <= x < cx + w - 0.5 and cy <= y < cy + h - 0.5]
    return hits[0] if hits else None


def _frame(svg: str) -> tuple[float, float, float, float]:
    """left, top, right, bottom of the (first) plot frame."""
    x, y, w, h = map(float, re.search(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" '
                                      r'height="([\d.]+)" fill="(?:none|#fff)"', svg).groups())
    return x, y, x + w, y + h


def test_figure_is_a_self_contained_svg_with_a_stable_hook() -> None:
    fig = line_chart({"loss": ([0, 1, 2], [3.0, 2.0, 1.0])}, "Loss", "step", "loss",
                     kind="loss")
    assert fig.startswith('<figure class="gw-figure" data-figure="loss">')
    assert 'viewBox="0 0 640 280"' in fig and 'width="100%"' in fig
    assert "<script" not in fig and "http" not in fig.replace("http://www.w3.org", "")
    assert len(_polylines(fig)) == 1 and len(_polylines(fig)[0]) == 3


def test_every_user_name_is_escaped() -> None:
    figs = [
        line_chart({EVIL: ([0, 1], [1.0, 2.0]), "b": ([0, 1], [2.0, 1.0])}, EVIL, EVIL, EVIL,
                   notes=[EVIL]),
        heatmap([EVIL, "x"], [0, 1], [[1.0, 2.0], [3.0, 4.0]], EVIL, notes=[EVIL]),
        profile_chart([EVIL, "out"], {EVIL: [1.0, 2.0]}, EVIL),
    ]
    for fig in figs:
        assert "<script" not in fig
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fig


def test_gaps_break_the_line_and_non_finite_values_are_marked_in_red() -> None:
    xs = [0, 1, 2, 3, 4, 5, 6]
    fig = line_chart({"loss": (xs, [4.0, 3.0, None, math.nan, 2.0, 1.5, math.inf])}, "Loss",
                     "step", "loss")
    lines = _polylines(fig)
    assert [len(line) for line in lines] == [2, 2]  # steps 0-1 and 4-5; nothing through 2-3
    # one marker on the x axis per non-finite step (2, 3 and 6), edged red; no band, no
    # flat line that could read as a value
    assert fig.count('class="gw-nonfinite"') == 3
    assert fig.count(f'stroke="{NONFINITE}"') == 3 and f'fill="{NONFINITE}"' not in fig
    # a lone finite point before the NaNs is drawn again on top, where no line can hide it
    lone = line_chart({"no_clip": ([0, 1, 2], [5e26, None, None]),
                       "clip10": ([0, 1, 2], [5e26, 5e26, 5e26])}, "Loss", "step", "loss")
    assert lone.rindex('r="3.8"') > lone.rindex("<polyline")
    # every line has a legend entry, a single one too
    assert ">loss</text>" in fig
    assert "loss: no finite value at steps 2-3" in fig
    assert "loss: no finite value from step 6 on" in fig
    # a series with nothing finite says so instead of drawing an empty frame silently
    empty = line_chart({"loss": (xs, [None] * 7)}, "Loss", "step", "loss")
    assert _polylines(empty) == [] and "no finite values to plot" in empty
    assert "no steps recorded" in line_chart({"loss": ([], [])}, "Loss", "step", "loss")


def test_log_scale_spaces_decades_evenly_and_marks_values_it_cannot_show() -> None:
    fig = line_chart({"g": ([0, 1, 2, 3], [1e-9, 1e-3, 1.0, 1e3])}, "g", "step", "norm",
                     log_y=True)
    (pts,) = _polylines(fig)
    ys = [y for _, y in pts]
    assert math.isclose(ys[0] - ys[1], 2 * (ys[1] - ys[2]), rel_tol=1e-2)
    assert math.isclose(ys[1] - ys[2], ys[2] - ys[3], rel_tol=1e-2)
    assert ">1e-9<" in fig and ">1<" in fig  # decade ticks
    low = line_chart({"g": ([0, 1, 2, 3], [0.0, -1.0, 1.0, 10.0])}, "g", "step", "norm",
                     log_y=True)
    assert len(_polylines(low)) == 1 and len(_polylines(low)[0]) == 2  # only 1 and 10
    assert "2 values ≤ 0, which a log scale cannot show" in low


def test_fixed_range_keeps_fractions_inside_the_frame() -> None:
    fig = line_chart({"relu": ([0, 1, 2], [0.0, 0.5, 1.0])}, "dead", "step", "fraction",
                     y_range=(0.0, 1.0), kind="dead-fraction")
    _, top, _, bottom = _frame(fig)
    ys = [y for _, y in _polylines(fig)[0]]
    assert top < ys[2] < ys[1] < ys[0] < bottom
    assert ">0<" in fig and ">1<" in fig


def test_faint_lines_are_drawn_behind_in_the_same_colour() -> None:
    fig = line_chart({"arm": ([0, 1], [2.0, 1.0])}, "Loss", "step", "loss",
                     faint={"arm": [([0, 1], [2.5, 1.5]), ([0, 1], [1.5, 0.5])]})
    assert len(_polylines(fig)) == 3
    assert fig.count('stroke-opacity="0.28"') == 2 and fig.count('stroke-opacity="1.0"') == 1


def test_heatmap_puts_the_input_side_at_the_bottom() -> None:
    rows = ["first", "middle", "last"]  # forward order: "first" is the input side
    values = [[1e-8] * 4, [1e-4] * 4, [1.0] * 4]
    fig = heatmap(rows, [0, 1, 2, 3], values)
    label_y = {m[1]: float(m[0]) for m in re.findall(
        r'<text class="gw-row" data-row="\d+" x="[\d.]+" y="([\d.]+)".*?</title>([^<]*)</text>',
        fig)}
    assert label_y["first"] > label_y["middle"] > label_y["last"]  # larger y is lower
    cells = _cells(fig)
    left, top, right, bottom = _frame(fig)
    mid = (left + right) / 2
    assert _at(cells, mid, bottom - 2) == _color(0.0)  # smallest norm, darkest, at the bottom
    assert _at(cells, mid, top + 2) == _color(1.0)
    assert ">1e-8<" in fig and ">1<" in fig  # the colour bar's decades


def test_heatmap_leaves_gaps_blank_and_marks_non_finite_and_zero() -> None:
    rows = ["a", "b"]
    values = [[1.0, math.nan, None, math.inf], [0.0, 10.0, None, 100.0]]
    bad = [[0, 0, 0, 0], [0, 0, 3, 0]]  # the report counts 3 non-finite values in b at step 2
    fig = heatmap(rows, [0, 1, 2, 3], values, nonfinite=bad)
    cells = _cells(fig)
    left, top, right, bottom = _frame(fig)
    col = (right - left) / 4
    row_a, row_b = bottom - (bottom - top) / 4, top + (bottom - top) / 4
    at = [[_at(cells, left + (c + 0.5) * col, y) for c in range(4)] for y in (row_a, row_b)]
    assert at[0][1] is None and at[0][2] is None  # NaN / null with no count: blank
    assert at[0][3] == NONFINITE and at[1][2] == NONFINITE
    assert at[1][0] == ZERO
    assert at[0][0] == _color(0.0) and at[1][3] == _color(1.0)
    for note in ("Red cells", "Grey cells: exactly zero", "Blank cells: not measured"):
        assert note in fig


def test_heatmap_merges_long_runs_into_at_most_200_columns() -> None:
    n = 1000
    values = [[10 ** (-3 + 3 * i / n) for i in range(n)], [1.0] * n]
    values[0][777] = math.inf  # one non-finite step must survive the merging
    fig = heatmap(["a", "b"], list(range(n)), values)
    cells = _cells(fig)
    starts = {round(x, 1) for rects in cells.values() for x, _, _, _ in rects}
    assert len(starts) <= 200
    assert NONFINITE in cells and len(cells[NONFINITE]) == 1
    assert "1000 steps merged into 200 columns of 5 steps" in fig
    assert ">0<" in fig and ">800<" in fig  # round step numbers on the axis


def test_profile_runs_from_the_input_side_on_the_left() -> None:
    fig = profile_chart(["in", "hidden", "out"], {"step 0": [1e-6, 1e-3, 1.0]})
    (pts,) = _polylines(fig)
    assert pts[0][0] < pts[1][0] < pts[2][0] and pts[0][1] > pts[2][1]
    assert 'data-figure="gradient-profile"' in fig


def test_real_report_draws_every_figure_and_escapes_layer_names(tmp_path) -> None:
    x, y = seed_data()
    torch.manual_seed(0)
    net = deep_net(nn.Sigmoid, depth=4)
    named = nn.Sequential()
    for i, module in enumerate(net):
        named.add_module(EVIL if i == 0 else f"m{i}", module)
    report = train_full_batch(named, x, y, lr=0.01, steps=30)
    assert EVIL in report.series["grad_norm"]
    html = report.to_html()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    kinds = re.findall(r'data-figure="([^"]+)"', html)
    assert kinds == ["loss", "gradient-heatmap", "gradient-profile", "saturated-fraction"]
    # the first layer (the evil name) is the bottom row of the heatmap
    rows = re.findall(r'<text class="gw-row" data-row="(\d+)" x="[\d.]+" y="([\d.]+)"', html)
    assert max(rows, key=lambda r: float(r[1]))[0] == "0"
    report.save(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == html


def test_preflight_report_shows_the_profile_at_init() -> None:
    x, _ = seed_data()
    torch.manual_seed(0)
    report = gradwatch.preflight(deep_net(nn.Sigmoid), x)
    html = report.to_html()
    kinds = re.findall(r'data-figure="([^"]+)"', html)
    assert kinds == ["gradient-profile", "activation-profile"]
    assert "Preflight: one forward/backward at init" in html  # the preflight's own table
    (pts,) = _polylines(html.split('data-figure="gradient-profile"')[1])[:1]
    assert pts[0][1] > pts[-1][1]  # sigmoid stack at init: the input side gets less
