"""One finding for an activation call that runs many times per forward: an unrolled
recurrent cell (``h = torch.tanh(W x_t + U h)`` in a loop over timesteps) makes one call site
per timestep (``cell.tanh@1`` .. ``cell.tanh@16``), and the same problem at each of them is one
problem of the cell, not sixteen."""

from __future__ import annotations

import re

from ..findings import Finding

__all__ = ["KINDS", "merge_repeated"]

KINDS = {"saturated_activation": "saturated_fraction", "dying_relu": "dead_fraction"}
"""Per-site kinds, and the evidence key that says how bad each call is."""
_CALL = re.compile(r"^(?P<base>.+)@(?P<call>\d+)$")
_SEVERITY = {"info": 0, "warning": 1, "error": 2}


def _key(f: Finding) -> tuple[str, str, str | None] | None:
    """(kind, site without its call count, feeding layer) of a per-site finding."""
    if f.kind not in KINDS:
        return None
    match = _CALL.match(str(f.evidence.get("site", "")))
    if match is None:
        return None
    return f.kind, match["base"], f.evidence.get("feeding_layer")


def _calls(calls: list[int]) -> str:
    """``@1-@16`` for a run of consecutive calls, else the calls listed."""
    if calls == list(range(calls[0], calls[-1] + 1)):
        return f"@{calls[0]}-@{calls[-1]}"
    return ", ".join(f"@{c}" for c in calls)


def merge_repeated(findings: list[Finding]) -> list[Finding]:
    """``findings`` with the per-call findings of one repeated site (same kind, same site
    but for its call count, fed by the same layer; two calls or more) merged into one: the
    worst call's finding, its summary led by the calls it stands for, ``evidence["calls"]``,
    ``evidence["sites"]`` and ``evidence["per_call"]`` (each call's fraction), the union of
    the layers and steps, the highest severity. Order is kept, at the first call's place."""
    groups: dict[tuple[str, str, str | None], list[Finding]] = {}
    for f in findings:
        key = _key(f)
        if key is not None:
            groups.setdefault(key, []).append(f)
    out: list[Finding] = []
    done: set[int] = set()
    for f in findings:
        key = _key(f)
        group = groups.get(key) if key is not None else None
        if group is None or len(group) < 2:
            out.append(f)
            continue
        if id(group[0]) in done:
            continue
        done.add(id(group[0]))
        out.append(_merge(key[1], KINDS[f.kind], group))
    return out


def _merge(base: str, measure: str, group: list[Finding]) -> Finding:
    def call(f: Finding) -> int:
        return int(_CALL.match(f.evidence["site"])["call"])

    group = sorted(group, key=call)
    worst = max(group, key=lambda f: (_SEVERITY[f.severity], f.evidence.get(measure) or 0))
    calls = [call(f) for f in group]
    sites = [f.evidence["site"] for f in group]
    values = [f.evidence.get(measure) for f in group]
    shown = [v for v in values if isinstance(v, (int, float))]
    spread = (f" ({measure.replace('_', ' ')} {100 * min(shown):.3g}-{100 * max(shown):.3g}% "
              f"across them)" if shown else "")
    summary = (f"{base} runs {len(group)} times in each forward (calls {_calls(calls)}: a "
               f"loop, such as a recurrent cell unrolled over timesteps), with the same "
               f"problem at every call{spread}; reported once, with the worst call's numbers. "
               f"{worst.summary}")
    evidence = {**worst.evidence, "calls": calls, "sites": sites,
                "per_call": dict(zip(sites, values, strict=True))}
    others = [name for f in group for name in f.layers if name not in sites]
    layers = list(dict.fromkeys([*others, *sites]))
    severity = max((f.severity for f in group), key=lambda s: _SEVERITY[s])
    return Finding(worst.kind, severity, min(f.first_step for f in group),
                   max(f.last_step for f in group), layers, summary, evidence,
                   worst.causes, worst.remedies)
