"""The report of a preflight: the contract's JSON plus the measured per-layer table."""

from __future__ import annotations

import textwrap
from html import escape
from typing import Any

from .._version import __version__
from ..findings import Finding, jsonable
from ..judge.context import fmt
from ..remedies import describe_findings
from ..report import SCHEMA, Report
from ..report import html as report_html
from ..report import text as report_text
from .judge import Measured


class PreflightReport(Report):
    """A :class:`Report` of one forward/backward at init, with the per-layer table.

    JSON, ``findings`` and ``problems`` are those of any report (``run.mode`` is
    ``"preflight"``, ``run.steps`` 0); the text and HTML add the measured per-layer table.
    """

    @property
    def preflight(self) -> dict[str, Any]:
        """The measured tables: ``layers``, ``sites``, and what ran (mode, batch, gradient)."""
        return self._data["preflight"]

    def table(self, max_rows: int = 40) -> str:
        """The per-layer measurements as a fixed-width table."""
        head = ("layer", "type", "act", "init", "out rms", "fwd gain", "grad norm", "bwd gain")
        lines = []
        for r in self.preflight["layers"]:
            init = f"{fmt(r['init']['ratio'])}x {r['init']['family']}" if r["init"] else ""
            lines.append((r["name"], r["type"], r["activation"] or "", init,
                          fmt(r["output_rms"]), fmt(r["forward_gain"]), fmt(r["grad_norm"]),
                          fmt(r["backward_gain"])) if r["ran"] else
                         # parameters used without the module's forward (MultiheadAttention's
                         # out_proj) still get a gradient
                         (r["name"], r["type"], "", init, "no forward", "",
                          fmt(r["grad_norm"]) if r["grad_norm"] is not None else "unused", ""))
        if len(lines) > max_rows:
            keep = max_rows // 2
            lines = [*lines[:keep], ("...",) + ("",) * 7, *lines[-keep:]]
        widths = [max(len(str(x[i])) for x in (head, *lines)) for i in range(len(head))]
        return "\n".join("  ".join(str(x[i]).ljust(widths[i]) for i in range(len(head))).rstrip()
                         for x in (head, *lines))

    def summary(self, width: int = 100) -> str:
        """The text report: what ran, the layer table, then the findings."""
        p = self.preflight
        grad = "the loss's gradient" if p["gradient"] == "loss_fn" else \
            f"a random N(0, 1) output gradient (seed {p['seed']})"
        head = (f"gradwatch {self._data['tool']['version']} preflight: one forward/backward at "
                f"init, model in {p['model_mode']} mode, example batch {p['batch']}, {grad}")
        # After the head and model lines of the usual summary.
        rest = report_text.render_text(self.to_dict(), width).splitlines()[2:]
        return "\n".join([*textwrap.wrap(head, width, subsequent_indent="  "), self.table(),
                          *rest]) + "\n"

    def to_html(self) -> str:
        """The HTML report with the layer table above the per-layer section."""
        page = report_html.render_html(self.to_dict())
        table = "<h2>Preflight: one forward/backward at init</h2><pre>" + \
            escape(self.table(max_rows=10_000)) + "</pre>"
        marker = "<h2>Layers"
        return page.replace(marker, table + marker, 1) if marker in page else \
            page.replace("</body>", table + "</body>")


def build_report(m: Measured, found: list[Finding], *, duration_s: float, model_mode: str,
                 seed: int, batch: str, with_loss: bool) -> PreflightReport:
    """The contract's report of one preflight: step 0 only, plus the measured tables."""
    graph = m.graph
    data = {
        "schema": SCHEMA,
        "tool": {"name": "gradwatch", "version": __version__},
        "run": {"steps": 0, "status": "completed", "in_progress": False, "error": None,
                "duration_s": round(duration_s, 3), "mode": "preflight",
                "internal_errors": []},
        "layers": [{k: r[k] for k in ("name", "type", "depth", "params")} for r in m.rows],
        "findings": [f.to_dict() for f in describe_findings(found)],
        "series": {"step": [0], "loss": [m.loss], "lr": [None],
                   "grad_norm": {r["name"]: [r["grad_norm"]] for r in m.rows},
                   "activation_rms": {r["name"]: [r["output_rms"]] for r in m.rows},
                   "dead_fraction": {s["name"]: [s["dead_fraction"]] for s in m.sites
                                     if s["dead_fraction"] is not None},
                   "saturated_fraction": {s["name"]: [s["saturated_fraction"]] for s in m.sites
                                          if s["saturated_fraction"] is not None},
                   "stride": 1},
        "facts": {"layers": {r["name"]: {"activation": r["activation"], "init_scale": r["init"],
                                         "fan_in": r["fan_in"]} for r in m.rows},
                  "graph": None if graph is None else {
                      "activations": graph.activations, "norm_ops": graph.norm_ops,
                      "branch_merges": graph.branch_merges, "nodes": graph.nodes}},
        "preflight": {"model_mode": model_mode, "seed": seed, "batch": batch,
                      "gradient": "loss_fn" if with_loss else "random_unit_normal",
                      "input": m.inp, "output": {"rms": m.out_rms, "nonfinite": m.out_nonfinite},
                      "loss": m.loss, "layers": m.rows, "sites": m.sites},
    }
    return PreflightReport(jsonable(data))
