"""The pages read at a glance (issue 17): `gradwatch demo`'s index and one run report per
finding kind, laid out by headless Chromium at 1400 px width.

Checked: the index is shorter than 12,000 px with its details folded; every SVG has a
``<title>`` and axis labels (x, and y or layer names on the rows); no SVG text leaves its
figure's box and no HTML element's content is wider than its box (details open); nothing is
wider than the window. Screenshots of the whole index and of each report's first screen go
to ``<demo output>/screenshots/``, and are copied where CI keeps its artifacts:
``$GRADWATCH_SCREENSHOTS`` if set, else ``./gradwatch-demo/screenshots`` on CI (CI=true),
the folder CI's own ``gradwatch demo`` writes. Without Chromium the tests skip, except on
CI, where they fail (tests/test_html_render.py's rule).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import DemoRun
from test_html_render import _chromium
from visual import first_screens, measure, one_report_per_kind, problems, screenshot

MAX_INDEX_HEIGHT = 12_000


def _keep(pngs: list[Path]) -> None:
    """Copy the screenshots to the folder CI keeps as artifacts (see the module text)."""
    keep = os.environ.get("GRADWATCH_SCREENSHOTS") or (
        "gradwatch-demo/screenshots" if os.environ.get("CI") == "true" else "")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for png in pngs:
            shutil.copy(png, Path(keep) / png.name)


def test_the_checks_catch_what_they_must(tmp_path: Path) -> None:
    """A page with an SVG lacking title and axis labels, text leaving its figure and a word
    wider than its table cell is flagged on each count; a tall page on its height."""
    binary = _chromium()
    bad = ("<!DOCTYPE html><html><body style='margin:0'><div style='height:3000px'>"
           "<svg viewBox='0 0 100 50' width='200'><text x='60' y='20' font-size='20'>"
           "far too long a label</text></svg>"
           "<table style='width:100px;table-layout:fixed'><tr><td>"
           "unbreakableunbreakableunbreakableunbreakable</td></tr></table></div></body></html>")
    (tmp_path / "bad.html").write_text(bad, encoding="utf-8")
    found = problems("bad", measure(binary, tmp_path, {"bad": "bad.html"})["bad"], 2000)
    text = "\n".join(found)
    for what in ("px tall", "has no <title>", "lacks an axis label", "text outside the figure",
                 "text wider than its box"):
        assert what in text, (what, found)


@pytest.mark.slow  # it reads `gradwatch demo`'s output
@pytest.mark.needs_demo  # it asks for demo_run only once it knows chromium is there
def test_demo_index_and_reports_read_at_a_glance(request: pytest.FixtureRequest) -> None:
    binary = _chromium()  # skip (or fail on CI) before waiting for the demo
    demo: DemoRun = request.getfixturevalue("demo_run")
    assert demo.code == 0 and demo.lab is not None, demo.stderr[-3000:]
    reports = one_report_per_kind(demo.lab)
    assert {"no-problem", "vanishing_gradient", "nonfinite", "dying_relu"} <= set(reports)
    measured = measure(binary, demo.out, {"index": "index.html", **reports})
    found = problems("index", measured["index"], MAX_INDEX_HEIGHT)
    for kind in reports:
        found += problems(f"report ({kind}: {reports[kind]})", measured[kind])
    index = measured["index"]
    # per experiment: the loss, each arm's gradient flow, and its own evidence figure
    # (gradient through time, dead units) when it names one
    assert len(index["svgs"]) == sum(1 + len(e["arms"]) + (e.get("evidence") != "layers")
                                     for e in demo.lab["experiments"])

    shots = demo.out / "screenshots"
    shots.mkdir(exist_ok=True)
    screenshot(binary, demo.out / "index.html", shots / "index.png",
               min(index["height"], 2 * MAX_INDEX_HEIGHT))
    pngs = [shots / "index.png", *first_screens(
        binary, demo.out, {k.replace("_", "-"): p for k, p in reports.items()}, shots)]
    _keep(pngs)
    assert all(p.stat().st_size > 10_000 for p in pngs), [p.name for p in pngs]
    assert found == [], "\n".join(found)
