"""The HTML report and the lab page in headless Chromium: self-contained, offline, plots drawn.

Chromium (Debian's ``chromium``) renders each page with the network off; the screenshots are
read back and every figure's region must really hold a drawing: coloured lines for a line
chart, many colours for a heatmap. Without Chromium these tests skip, except on CI (CI=true),
where they fail: CI must not pass without having looked at the page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import torch
from conftest import DemoRun, deep_net, seed_data, train_full_batch
from torch import nn

from gradwatch.lab.page import render_lab_page
from gradwatch.report import Report
from gradwatch.report.plots import ZERO, line_chart

try:
    from PIL import Image
except ImportError:  # the test extra has it; without it the screenshots cannot be read
    Image = None

ZERO_RGB = (int(ZERO[1:3], 16), int(ZERO[3:5], 16), int(ZERO[5:7], 16))

# Chromium with every way out closed: all traffic to a dead proxy, every host name unknown.
OFFLINE = ("--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--proxy-bypass-list=<-loopback>")


def _missing(message: str) -> None:
    """Skip, but fail on CI (CI=true): CI must not pass without having looked at the page."""
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; on CI this test must run, not skip")
    pytest.skip(message)


def _chromium() -> str:
    """The chromium binary (and Pillow to read its screenshots), or skip / fail on CI."""
    if Image is None:
        _missing("Pillow reads the screenshots: pip install -e '.[test]'")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        _missing("headless Chromium is needed to render the HTML: apt-get install chromium "
                 "(Debian's package; .ci/run installs it)")
    return found  # type: ignore[return-value]


def _screenshot(html: Path, png: Path, width: int, height: int) -> Any:
    """Render a local file with the network off and return the screenshot as an RGB image."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={png.parent / 'chromium-profile'}", *OFFLINE,
           f"--window-size={width},{height}", f"--screenshot={png}", html.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot (status {done.returncode}):\n" \
                         f"{done.stderr[-2000:]}"
    keep = os.environ.get("GRADWATCH_SCREENSHOTS")  # a folder to keep them in, for a person
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / png.name)
    return Image.open(png).convert("RGB")


def _coloured(img: Any, box: tuple[int, int, int, int],
              also: tuple[int, int, int] | None = None) -> tuple[int, int]:
    """(pixels, distinct colours) in ``box`` that are clearly coloured: not white, grey or
    black, i.e. not page, frame, grid or text; only the data of a figure is coloured.
    ``also`` counts one more colour as data (the heatmap's grey of exact zeros)."""
    region = img.crop(box)
    hist = region.getcolors(maxcolors=region.width * region.height)
    picked = [(n, c) for n, c in hist if max(c) - min(c) > 40 or
              (also is not None and max(abs(a - b) for a, b in zip(c, also, strict=True)) < 3)]
    coarse = {(r // 16, g // 16, b // 16) for _, (r, g, b) in picked}
    return sum(n for n, _ in picked), len(coarse)


def _ink(img: Any, box: tuple[int, int, int, int]) -> float:
    """The fraction of pixels in ``box`` that are not (near) white."""
    region = img.crop(box).convert("L")
    hist = region.histogram()
    return sum(hist[:235]) / max(1, region.width * region.height)


class _Refs(HTMLParser):
    """Every reference a browser would load: src/href/srcset/data/poster attributes,
    script and stylesheet links, and url()/@import in inline styles."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.scripts: list[str] = []
        self._style = False
        self.css = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self.scripts.append(a.get("src", "inline"))
        for key in ("src", "srcset", "data", "poster", "xlink:href", "action", "background"):
            if key in a:
                self.loads.append(a[key])
        if tag != "a" and "href" in a:
            self.loads.append(a["href"])
        self.css += a.get("style", "")
        self._style = tag == "style"

    def handle_data(self, data: str) -> None:
        if self._style:
            self.css += data

    def handle_endtag(self, tag: str) -> None:
        self._style = False


def _external(html: str) -> list[str]:
    """What in the page could reach beyond the file itself (must be empty)."""
    refs = _Refs()
    refs.feed(html)
    bad = [f"<script {s}>" for s in refs.scripts]
    bad += [r for r in refs.loads if not r.startswith(("data:", "#"))]
    bad += re.findall(r"@import[^;]*|url\((?!\s*['\"]?(?:data:|#))[^)]*\)", refs.css)
    links = re.findall(r"<a\s[^>]*href=['\"]([^'\"]*)", html)
    bad += [h for h in links if re.match(r"^(?:[a-z][a-z0-9+.-]*:|//)", h, re.I)]
    return bad


def _figures(html: str) -> list[tuple[str, str]]:
    """(data-figure kind, its <svg> element) for every figure of a page, in order."""
    return re.findall(r'<figure class="gw-figure" data-figure="([^"]+)">(<svg.*?</svg>)', html,
                      re.S)


# --------------------------------------------------------------------- the pages under test
@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Report]:
    """Real short runs: the seeds' deep sigmoid net (vanishing), a deep ReLU net with
    default init, and the N(0, 10) ReLU net whose loss overflows at once (non-finite)."""
    x, y = seed_data()
    torch.manual_seed(0)
    out = {"sigmoid": train_full_batch(deep_net(nn.Sigmoid), x, y, lr=0.01, steps=60)}
    torch.manual_seed(0)
    out["relu"] = train_full_batch(deep_net(nn.ReLU), x, y, lr=0.01, steps=60)
    torch.manual_seed(0)
    out["n0_10"] = train_full_batch(deep_net(nn.ReLU, lambda w: nn.init.normal_(w, 0, 10)),
                                    x, y, lr=0.1, steps=20)
    return out


def _curve(report: Report) -> dict[str, list[Any]]:
    return {"step": report.series["step"], "loss": report.series["loss"]}


def _heat(report: Report) -> dict[str, Any]:
    s = report.series
    return {"layers": list(s["grad_norm"]), "step": s["step"],
            "grad_norm": list(s["grad_norm"].values())}


def lab_fixture(runs: dict[str, dict[int, Report]], folder: Path) -> dict[str, Any]:
    """A lab JSON in the shape gradwatch.lab/v1, from real runs (reports saved in folder)."""
    experiments = []
    for name, arms, verdict in (("sigmoid_vs_relu", ("sigmoid", "relu"), "partly"),
                                ("clipping", ("no clip", "clip 10"), "does not hold")):
        arm_entries = []
        for arm in arms:
            entries = []
            for seed, report in runs[arm].items():
                stem = f"{arm.replace(' ', '_')}-seed{seed}"
                (folder / name).mkdir(parents=True, exist_ok=True)
                report.save(folder / name / f"{stem}.html")
                report.save(folder / name / f"{stem}.json")
                loss = report.series["loss"]
                entries.append({
                    "seed": seed, "final_loss": loss[-1], "first_loss": loss[0],
                    "metrics": {}, "report_json": f"{name}/{stem}.json",
                    "report_html": f"{name}/{stem}.html", "loss_curve": _curve(report),
                    "findings": [{"kind": f.kind, "severity": f.severity,
                                  "summary": f.summary} for f in report.findings],
                    "heatmap": _heat(report) if seed == 0 else None})
            finals = [e["final_loss"] for e in entries if e["final_loss"] is not None]
            arm_entries.append({
                "name": arm, "role": "seed", "claim": f"{arm} as the seed claims",
                "description": f"the {arm} arm",
                "summary": {"final_loss": {"median": sorted(finals)[len(finals) // 2],
                                           "min": min(finals), "max": max(finals)}
                            if finals else None},
                "runs": entries})
        experiments.append({
            "name": name, "source": "seed 002", "title": name.replace("_", " "),
            "claim": "the claim", "verdict": verdict, "observed": "what happened, in numbers",
            "reason": "the measured reason", "repair": "the repair", "setup": "the setup",
            "arms": arm_entries})
    return {"schema": "gradwatch.lab/v1", "seeds": [0, 1], "duration_s": 1.0,
            "gradwatch": "0.1.0", "experiments": experiments}


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory, reports: dict[str, Report]
          ) -> dict[str, Path]:
    """The HTML report of the sigmoid run and a lab page built from real runs, on disk."""
    folder = tmp_path_factory.mktemp("pages")
    report_page = folder / "report.html"
    reports["sigmoid"].save(report_page)
    x, y = seed_data()
    runs: dict[str, dict[int, Report]] = {"sigmoid": {}, "relu": {}, "no clip": {},
                                          "clip 10": {}}
    for seed in (0, 1):
        for arm, act in (("sigmoid", nn.Sigmoid), ("relu", nn.ReLU)):
            torch.manual_seed(seed)
            runs[arm][seed] = train_full_batch(deep_net(act), x, y, lr=0.01, steps=40)
        for arm, clip in (("no clip", None), ("clip 10", 10.0)):
            torch.manual_seed(seed)
            model = deep_net(nn.ReLU, lambda w: nn.init.normal_(w, 0, 10))
            runs[arm][seed] = train_full_batch(model, x, y, lr=0.1, steps=15, clip=clip)
    lab_page = folder / "index.html"
    lab_page.write_text(render_lab_page(lab_fixture(runs, folder)), encoding="utf-8")
    return {"report": report_page, "lab": lab_page}


# ------------------------------------------------------------------------------- the tests
def test_pages_reference_nothing_outside_themselves(pages: dict[str, Path]) -> None:
    for page in pages.values():
        html = page.read_text(encoding="utf-8")
        assert _external(html) == [], page.name
        assert "<script" not in html.lower()
    # the checker itself catches what it must
    assert _external("<img src='http://x/a.png'><script src='a.js'></script>"
                     "<link rel=stylesheet href='https://x/s.css'>"
                     "<style>@import 'x.css'; b{background:url(http://x/i.png)}</style>") \
        == ["<script a.js>", "http://x/a.png", "a.js", "https://x/s.css", "@import 'x.css'",
            "url(http://x/i.png)"]


def test_every_report_figure_is_in_the_page(pages: dict[str, Path],
                                            reports: dict[str, Report]) -> None:
    kinds = [k for k, _ in _figures(pages["report"].read_text(encoding="utf-8"))]
    assert kinds == ["loss", "gradient-heatmap", "gradient-profile", "saturated-fraction"]
    relu = [k for k, _ in _figures(reports["relu"].to_html())]
    assert "dead-fraction" in relu
    lab = [k for k, _ in _figures(pages["lab"].read_text(encoding="utf-8"))]
    assert lab == ["loss", "gradient-heatmap", "gradient-heatmap"] * 2


def _check_figures(tmp_path: Path, figs: list[tuple[str, str]], name: str) -> None:
    """Each figure alone in a fixed box of a test page: its box must hold coloured data.

    Frame, grid and text are grey or black; only data is coloured. A control chart with
    nothing to draw is added and must read as blank, or the check would mean nothing.
    """
    figs = [*figs, *_figures(line_chart({"loss": ([0, 1, 2], [None, None, None])}, "empty",
                                        "step", "loss", kind="control-empty"))]
    boxes, top, html = [], 0, []
    for kind, svg in figs:
        w, h = (int(float(v)) for v in re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"',
                                                 svg).groups())
        html.append(f"<div style='position:absolute;left:0;top:{top}px;width:{w}px;"
                    f"height:{h}px'>{svg}</div>")
        boxes.append((kind, (0, top, w, top + h)))
        top += h + 20
    page = tmp_path / f"{name}.html"
    page.write_text("<!DOCTYPE html><html><body style='margin:0;background:#fff'>"
                    + "".join(html) + "</body></html>", encoding="utf-8")
    img = _screenshot(page, tmp_path / f"{name}.png", 660, top)
    for kind, (x0, y0, x1, y1) in boxes:
        pixels, colours = _coloured(img, (x0, y0, x1, y1))
        if kind == "control-empty":
            assert pixels < 50, (kind, pixels)
        elif kind.endswith("gradient-heatmap"):
            # a wall of colour where the cells are (left of the colour bar), many hues in all
            cells = (x0, y0, x0 + (x1 - x0) * 84 // 100, y1)
            covered = _coloured(img, cells, ZERO_RGB)[0] / \
                ((cells[2] - cells[0]) * (cells[3] - cells[1]))
            assert covered > 0.4 and colours >= 12, (kind, covered, colours)
        else:
            assert pixels > 300, (kind, pixels, colours)  # the lines, in colour


def _check_whole_page(tmp_path: Path, name: str, page: Path) -> None:
    """The page renders offline, with content in its top, middle and bottom thirds and its
    plots drawn in place."""
    img = _screenshot(page, tmp_path / f"{name}.png", 1200, 6000)
    rows = [y for y in range(0, img.height, 10) if _ink(img, (0, y, img.width, y + 10)) > 0.002]
    end = rows[-1] + 10
    assert end > 1200, (name, end)  # a long page: text, plots and tables all laid out
    for a, b in ((0, end // 3), (end // 3, 2 * end // 3), (2 * end // 3, end)):
        assert _ink(img, (0, a, img.width, b)) > 0.01, (name, a, b)
    pixels, colours = _coloured(img, (0, 0, img.width, end))
    assert pixels > 20_000 and colours >= 12, (name, pixels, colours)


def test_every_figure_is_drawn_in_chromium(tmp_path: Path, pages: dict[str, Path],
                                           reports: dict[str, Report]) -> None:
    figs = _figures(pages["report"].read_text(encoding="utf-8"))
    figs += [(f"relu {k}", s) for k, s in _figures(reports["relu"].to_html())
             if k == "dead-fraction"]
    figs += [(f"n0_10 {k}", s) for k, s in _figures(reports["n0_10"].to_html())
             if k == "gradient-heatmap"]
    figs += [(f"lab {k}", s) for k, s in _figures(pages["lab"].read_text(encoding="utf-8"))]
    _check_figures(tmp_path, figs, "figures")


def test_whole_pages_render_offline_top_to_bottom(tmp_path: Path,
                                                  pages: dict[str, Path]) -> None:
    for name, page in pages.items():
        _check_whole_page(tmp_path, f"{name}-page", page)


@pytest.mark.slow  # it runs `gradwatch demo` (the end-to-end test of the README's main job)
@pytest.mark.needs_demo  # it asks for demo_run only once it knows chromium is there
def test_demo_pages_render_offline_with_every_figure_drawn(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The acceptance test: `gradwatch demo`'s index page and a run report, in Chromium."""
    _chromium()  # skip (or fail on CI) before waiting for the demo
    demo_run: DemoRun = request.getfixturevalue("demo_run")
    assert demo_run.code == 0 and demo_run.lab is not None, demo_run.stderr[-3000:]
    index = demo_run.out / "index.html"
    html = index.read_text(encoding="utf-8")
    assert _external(html) == [] and "<script" not in html.lower()
    lab = demo_run.lab
    figs = _figures(html)
    kinds = [k for k, _ in figs]
    assert kinds.count("loss") == len(lab["experiments"])
    assert kinds.count("gradient-heatmap") == sum(len(e["arms"]) for e in lab["experiments"])
    links = {unquote(h) for h in re.findall(r"<a href='([^'#]+)'", html)}
    for exp in lab["experiments"]:
        assert f">{exp['verdict']}</span>" in html
        for arm in exp["arms"]:
            for run in arm["runs"]:
                assert run["report_html"] in links
                assert (demo_run.out / run["report_html"]).exists()
    _check_figures(tmp_path, figs, "demo-figures")
    _check_whole_page(tmp_path, "demo-index", index)
    first = lab["experiments"][0]["arms"][0]["runs"][0]["report_html"]
    report = (demo_run.out / first).read_text(encoding="utf-8")
    assert _external(report) == []
    _check_whole_page(tmp_path, "demo-report", demo_run.out / first)


def test_lab_page_escapes_names_and_keeps_only_relative_links() -> None:
    evil = "<script>alert(1)</script>"
    lab = {"schema": "gradwatch.lab/v1", "seeds": [0], "experiments": [{
        "name": evil, "title": evil, "source": evil, "claim": evil, "verdict": evil,
        "observed": evil, "reason": evil, "repair": evil, "setup": evil,
        "arms": [{"name": evil, "role": evil, "description": evil, "claim": evil,
                  "summary": {evil: {"median": 1.0, "min": 0.5, "max": 2.0}},
                  "runs": [{"seed": 0, "final_loss": None, "findings": [
                      {"kind": evil, "severity": "error", "summary": evil}],
                            "report_html": "javascript:alert(1)",
                            "report_json": "https://example.com/r.json",
                            "loss_curve": {"step": [0, 1], "loss": [1.0, None]},
                            "heatmap": {"layers": [evil], "step": [0, 1],
                                        "grad_norm": [[1.0, None]]}}]}]}]}
    html = render_lab_page(lab)
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "javascript:" not in html and "example.com" not in html
    assert _external(html) == []
    # an unknown verdict is shown, in grey, not silently dropped
    assert "badge v-unknown" in html
    # the lab measures every layer at every step: a null gradient norm is non-finite (red)
    assert "Red cells" in html


def test_report_renders_without_steps_layers_or_finite_values(reports: dict[str, Report]
                                                              ) -> None:
    data = reports["relu"].to_dict()
    empty = {**data, "run": {**data["run"], "steps": 0}, "layers": [], "findings": [],
             "series": {"step": [], "loss": [], "grad_norm": {}, "site_step": [],
                        "dead_fraction": {}, "saturated_fraction": {}, "through_time": {}}}
    html = Report(empty).to_html()
    assert "no steps recorded" in html.lower() and _external(html) == []
    s = data["series"]
    nan = {**data, "series": {**s, "loss": [None] * len(s["step"]),
                              "grad_norm": {k: [None] * len(v)
                                            for k, v in s["grad_norm"].items()}}}
    html = Report(nan).to_html()
    assert "no finite values to plot" in html and "gradient-profile" not in html
