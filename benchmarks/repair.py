"""How often ``gradwatch run --verify`` repairs a broken training script, and at what cost.

For every script of ``benchmarks/broken/`` (each with one realistic mistake, its docstring
naming the finding kind it causes: ``benchmark: kind=... arch=... cause=...``) it times the
plain run (``python SCRIPT``), then ``gradwatch run SCRIPT --verify`` and reads the report:
the script is *repaired* when gradwatch found its kind (warning or error) and the top
verified remedy of that finding made the run better or fixed it (the finding gone, or the
loss at least 2x lower) without making it worse. Then it times ``gradwatch run SCRIPT
--fix``: *fixed* when the run was restarted with a remedy and the restarted run no longer
has the kind (or the remedy's re-run had the loss at least 2x lower). It prints one row per
script, the rates per kind and overall, and the median time of ``--verify`` and ``--fix``
against the plain run.

    python benchmarks/repair.py                      # every script
    python benchmarks/repair.py --only 'a_*' -j 1    # some of them, one at a time
    python benchmarks/repair.py --modes verify       # without the --fix runs
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROKEN = Path(__file__).resolve().parent / "broken"
IMPROVED = 2.0  # a repair without the finding gone must lower the loss this many times


@dataclass
class Case:
    """One broken script and what it is declared to break."""

    path: Path
    kind: str
    arch: str
    cause: str
    missed: bool = False  # the script says gradwatch does not see its failure (yet)


@dataclass
class Outcome:
    case: Case
    plain_s: float = 0.0
    verify_s: float = 0.0
    found: bool = False
    top: str | None = None
    status: str | None = None
    improvement: float | None = None
    finding_gone: bool | None = None
    repaired: bool = False
    fix_s: float | None = None
    fixed: bool | None = None
    fix_note: str = ""
    note: str = ""
    verified: list[str] = field(default_factory=list)


def cases(folder: Path, only: str | None) -> list[Case]:
    out = []
    for path in sorted(folder.glob("*.py")):
        if only and not fnmatch.fnmatch(path.name, only):
            continue
        doc = path.read_text(encoding="utf-8")
        m = re.search(r"^benchmark:\s*(.+)$", doc, re.M)
        if not m:
            continue
        fields = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        out.append(Case(path, fields.get("kind", "?"), fields.get("arch", "?"),
                        fields.get("cause", "?"), fields.get("missed") == "yes"))
    return out


def _timed(cmd: list[str], cwd: Path, timeout: float) -> tuple[float, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = -9
    return time.perf_counter() - start, code


def judge(case: Case, report: dict[str, Any]) -> Outcome:
    """Was the case's kind found, and did the top verified remedy repair it?"""
    out = Outcome(case)
    hits = [f for f in report.get("findings", []) if f["kind"] == case.kind and
            f["severity"] in ("warning", "error")]
    out.found = bool(hits)
    if not hits:
        kinds = sorted({f["kind"] for f in report.get("findings", [])
                        if f["severity"] in ("warning", "error")})
        out.note = f"not found (found: {', '.join(kinds) or 'nothing'})"
        return out
    finding = hits[0]
    tried = [r for r in finding["remedies"] if r.get("verified")]
    out.verified = [f"{r['id']}:{r['verified'].get('status')}" for r in tried]
    if not tried:
        out.note = "no remedy verified"
        return out
    top = tried[0]
    v = top["verified"]
    out.top, out.status = top["id"], v.get("status")
    out.improvement, out.finding_gone = v.get("improvement"), v.get("finding_gone")
    better = v.get("status") in ("better", "fixed")
    enough = v.get("finding_gone") is True or (
        isinstance(v.get("improvement"), (int, float)) and v["improvement"] >= IMPROVED)
    out.repaired = better and enough and v.get("status") != "worse"
    if not out.repaired:
        out.note = (v.get("note") or "")[:80]
    return out


def judge_fix(case: Case, report: dict[str, Any]) -> tuple[bool, str]:
    """Did ``--fix`` restart the run with a remedy that repaired the case's kind?"""
    fix = report.get("fix") or {}
    if not fix.get("restarted"):
        return False, fix.get("reason") or "not restarted"
    still = {f["kind"] for f in report.get("findings", [])
             if f["severity"] in ("warning", "error")}
    v = (fix.get("remedy") or {}).get("verified") or {}
    improved = isinstance(v.get("improvement"), (int, float)) and v["improvement"] >= IMPROVED
    remedy = (fix.get("remedy") or {}).get("id")
    if case.kind in still and not improved:
        return False, f"restarted with {remedy}, {case.kind} remains"
    return True, f"restarted with {remedy} after {fix.get('found_at_step')} steps"


def measure(case: Case, python: str, gradwatch: list[str], timeout: float,
            verify_time: float, modes: set[str]) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="gradwatch-repair-") as tmp:
        folder = Path(tmp)
        plain_s, _ = _timed([python, str(case.path)], folder, timeout)
        report = folder / "report.json"
        out = Outcome(case)
        if "verify" in modes:
            verify_s, code = _timed([*gradwatch, "run", "--quiet", "--json", str(report),
                                     "--verify", "--verify-time", str(verify_time),
                                     str(case.path)], folder, timeout + verify_time)
            if not report.is_file():
                out = Outcome(case, note=f"no report (exit {code})")
            else:
                out = judge(case, json.loads(report.read_text(encoding="utf-8")))
            out.verify_s = verify_s
            report.unlink(missing_ok=True)
        if "fix" in modes:
            out.fix_s, code = _timed([*gradwatch, "run", "--quiet", "--json", str(report),
                                      "--fix", "--verify-time", str(verify_time),
                                      str(case.path)], folder, 2 * timeout + verify_time)
            out.fixed, out.fix_note = judge_fix(case, json.loads(report.read_text(
                encoding="utf-8"))) if report.is_file() else (False, f"no report (exit {code})")
    out.plain_s = plain_s
    return out


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", type=Path, default=BROKEN)
    parser.add_argument("--only", help="a file-name pattern (fnmatch), e.g. 'b_*'")
    parser.add_argument("-j", "--jobs", type=int, default=1,
                        help="scripts measured at once (each --verify uses 2 workers)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per plain run")
    parser.add_argument("--verify-time", type=float, default=600.0)
    parser.add_argument("--modes", default="verify,fix",
                        help="what to time besides the plain run: verify, fix or both")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    ns = parser.parse_args()
    todo = cases(ns.scripts, ns.only)
    if not todo:
        print(f"no benchmark scripts in {ns.scripts}", file=sys.stderr)
        return 2
    modes = {m.strip() for m in ns.modes.split(",") if m.strip()}
    if not modes <= {"verify", "fix"}:
        parser.error(f"--modes takes verify, fix or both, got {ns.modes!r}")
    gradwatch = [sys.executable, "-m", "gradwatch"]
    with ThreadPoolExecutor(max(1, ns.jobs)) as pool:
        outcomes = list(pool.map(lambda c: measure(c, sys.executable, gradwatch, ns.timeout,
                                                   ns.verify_time, modes), todo))
    print(f"{'script':<38} {'kind':<21} {'arch':<11} {'top remedy':<34} {'status':<10} "
          f"{'impr.':>6} {'gone':>5} {'ok':>3} {'plain':>6} {'verify':>7} {'ratio':>6} "
          f"{'fix':>3} {'ratio':>6}")
    for o in outcomes:
        print(f"{o.case.path.name[:38]:<38} {o.case.kind:<21} {o.case.arch:<11} "
              f"{(o.top or '-')[:34]:<34} {(o.status or '-'):<10} {_fmt(o.improvement):>6} "
              f"{str(o.finding_gone) if o.found else '':>5} {'yes' if o.repaired else 'no':>3} "
              f"{o.plain_s:6.1f} {o.verify_s:7.1f} {o.verify_s / max(o.plain_s, 1e-9):6.2f} "
              f"{'' if o.fixed is None else 'yes' if o.fixed else 'no':>3} "
              f"{'' if o.fix_s is None else f'{o.fix_s / max(o.plain_s, 1e-9):.2f}':>6}"
              + (f"  {o.note}" if o.note else "")
              + (f"  [fix: {o.fix_note}]" if o.fix_note and not o.fixed else ""))
    print()
    kinds = sorted({o.case.kind for o in outcomes})
    for kind in kinds:
        rows = [o for o in outcomes if o.case.kind == kind]
        print(f"{kind:<22} repaired {sum(o.repaired for o in rows)}/{len(rows)}, "
              f"found {sum(o.found for o in rows)}/{len(rows)}"
              + (f", fixed {sum(bool(o.fixed) for o in rows)}/{len(rows)}"
                 if "fix" in modes else ""))
    print()
    if "verify" in modes:
        ratios = [o.verify_s / max(o.plain_s, 1e-9) for o in outcomes]
        total = sum(o.repaired for o in outcomes)
        print(f"--verify: repaired {total}/{len(outcomes)} "
              f"({100 * total / len(outcomes):.1f}%); median time "
              f"{statistics.median(ratios):.2f}x the plain run "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    if "fix" in modes:
        ratios = [(o.fix_s or 0) / max(o.plain_s, 1e-9) for o in outcomes]
        total = sum(bool(o.fixed) for o in outcomes)
        print(f"--fix: fixed {total}/{len(outcomes)} ({100 * total / len(outcomes):.1f}%); "
              f"median total time {statistics.median(ratios):.2f}x the plain run "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    if ns.json:
        ns.json.write_text(json.dumps([{
            "script": o.case.path.name, "kind": o.case.kind, "arch": o.case.arch,
            "cause": o.case.cause, "found": o.found, "top": o.top, "status": o.status,
            "improvement": o.improvement, "finding_gone": o.finding_gone,
            "repaired": o.repaired, "plain_s": o.plain_s, "verify_s": o.verify_s,
            "fixed": o.fixed, "fix_s": o.fix_s, "fix_note": o.fix_note,
            "verified": o.verified, "note": o.note} for o in outcomes], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
