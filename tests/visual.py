"""Measure pages as a reader sees them: laid out by headless Chromium at 1400 px width.

A harness page (written next to the pages, so that their relative paths hold) loads each
page in an iframe 1400 px wide and runs a small script on it: the page's height with its
``<details>`` folded, then, with every fold open, each SVG's ``<title>`` and axis labels, the
SVG texts whose box leaves their figure's box, and the HTML elements whose content is wider
than their own box. Chromium's ``--dump-dom`` gives the results back as JSON. The pages
themselves hold no script; only the harness does. Used by tests/test_visual.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

WIDTH = 1400

_MEASURE = r"""
function gwMeasure(frame) {
  var d = frame.contentDocument, w = frame.contentWindow;
  var out = {height: d.documentElement.scrollHeight, svgs: [], overflow: []};
  d.querySelectorAll('details').forEach(function (x) { x.open = true; });
  out.open_height = d.documentElement.scrollHeight;
  out.width = d.documentElement.scrollWidth;
  d.querySelectorAll('svg').forEach(function (s) {
    var t = s.querySelector(':scope > title'), r = s.getBoundingClientRect();
    var fig = s.closest('figure');
    var info = {title: t ? t.textContent : '', kind: fig ? fig.getAttribute('data-figure') : '',
                x_label: !!s.querySelector('.gw-xlabel'),
                y_label: !!s.querySelector('.gw-ylabel, .gw-row'), outside: []};
    s.querySelectorAll('text').forEach(function (tx) {
      var b = tx.getBoundingClientRect();
      if (b.width && (b.left < r.left - 1 || b.right > r.right + 1 ||
                      b.top < r.top - 1 || b.bottom > r.bottom + 1))
        info.outside.push(tx.textContent.slice(0, 60));
    });
    out.svgs.push(info);
  });
  d.querySelectorAll('body *').forEach(function (e) {
    if (e.closest('svg') || e.clientWidth === 0) return;
    if (w.getComputedStyle(e).overflowX !== 'visible') return;  // scrolls on purpose (pre)
    if (e.scrollWidth > e.clientWidth + 1)
      out.overflow.push(e.tagName.toLowerCase() + ': ' + e.textContent.slice(0, 80));
  });
  return out;
}
window.addEventListener('load', function () {
  var res = {};
  document.querySelectorAll('iframe').forEach(function (f) {
    try { res[f.getAttribute('data-name')] = gwMeasure(f); }
    catch (err) { res[f.getAttribute('data-name')] = {error: String(err)}; }
  });
  var pre = document.createElement('pre');
  pre.id = 'gw-result';
  pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
"""


def chromium_cmd(binary: str, profile: Path, height: int, *extra: str) -> list[str]:
    """Headless Chromium at 1400 px width, offline, local files allowed to read each other
    (the harness reads its iframes)."""
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions",
            "--allow-file-access-from-files", f"--user-data-dir={profile}",
            "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--window-size={WIDTH},{height}", *extra]


def measure(binary: str, folder: Path, pages: dict[str, str]) -> dict[str, Any]:
    """Lay out ``pages`` ({name: path relative to ``folder``}) and measure each; the harness
    is written in ``folder``."""
    frames = "".join(
        f"<iframe data-name='{name}' src='{path}' style='width:{WIDTH}px;height:900px;"
        f"border:0;display:block'></iframe>" for name, path in pages.items())
    harness = folder / "visual-harness.html"
    harness.write_text(f"<!DOCTYPE html><html><body style='margin:0'>{frames}"
                       f"<script>{_MEASURE}</script></body></html>", encoding="utf-8")
    cmd = chromium_cmd(binary, folder / "chromium-profile", 900, "--virtual-time-budget=15000",
                       "--dump-dom", harness.resolve().as_uri())
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r"<pre id=\"gw-result\">(.*?)</pre>", done.stdout, re.S)
    assert found, f"the harness gave no result (status {done.returncode}):\n{done.stderr[-2000:]}"
    harness.unlink()
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


def screenshot(binary: str, page: Path, png: Path, height: int) -> None:
    """One screenshot of ``page`` at 1400 x ``height`` px."""
    cmd = chromium_cmd(binary, png.parent / "chromium-profile", height,
                       f"--screenshot={png}", page.resolve().as_uri())
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot (status {done.returncode}):\n" \
                         f"{done.stderr[-2000:]}"


def first_screens(binary: str, folder: Path, pages: dict[str, str], out: Path,
                  height: int = 1000) -> list[Path]:
    """The first screen (1400 x ``height``) of each page, one Chromium run for all: the pages
    stacked in iframes, the screenshot cut into one PNG per page in ``out``."""
    from PIL import Image  # the test extra has it; tests skip without it

    frames = "".join(f"<iframe src='{path}' style='width:{WIDTH}px;height:{height}px;border:0;"
                     f"display:block'></iframe>" for path in pages.values())
    harness = folder / "screens-harness.html"
    harness.write_text(f"<!DOCTYPE html><html><body style='margin:0'>{frames}</body></html>",
                       encoding="utf-8")
    whole = out / "first-screens.png"
    screenshot(binary, harness, whole, height * len(pages))
    harness.unlink()
    img = Image.open(whole).convert("RGB")
    paths = []
    for k, name in enumerate(pages):
        path = out / f"report-{name}.png"
        img.crop((0, k * height, WIDTH, (k + 1) * height)).save(path)
        paths.append(path)
    whole.unlink()
    return paths


def problems(name: str, m: dict[str, Any], max_height: int | None = None) -> list[str]:
    """What a reader would trip over in one measured page (empty when it reads well)."""
    if "error" in m:
        return [f"{name}: could not be measured: {m['error']}"]
    out: list[str] = []
    if max_height is not None and m["height"] >= max_height:
        out.append(f"{name}: {m['height']} px tall (at most {max_height})")
    if m["width"] > WIDTH:
        out.append(f"{name}: {m['width']} px wide at a {WIDTH} px window")
    for k, svg in enumerate(m["svgs"]):
        label = f"{name}: svg {k} ({svg['kind']}, {svg['title'][:40]!r})"
        if not svg["title"].strip():
            out.append(f"{label} has no <title>")
        if not (svg["x_label"] and svg["y_label"]):
            out.append(f"{label} lacks an axis label (x {svg['x_label']}, y {svg['y_label']})")
        if svg["outside"]:
            out.append(f"{label}: text outside the figure: {svg['outside'][:3]}")
    out += [f"{name}: text wider than its box: {o}" for o in m["overflow"][:5]]
    return out


def one_report_per_kind(lab: dict[str, Any]) -> dict[str, str]:
    """The report page of the first run with each finding kind (warning or error), and of
    the first run with none: {kind or 'no-problem': its path relative to the lab folder}."""
    out: dict[str, str] = {}
    for exp in lab["experiments"]:
        for arm in exp["arms"]:
            for run in arm["runs"]:
                kinds = sorted({f["kind"] for f in run["findings"]
                                if f["severity"] in ("warning", "error")}) or ["no-problem"]
                for kind in kinds:
                    out.setdefault(kind, run["report_html"])
    return out
