"""Which re-runs a ``--verify`` pass makes: the remedies gradwatch can apply itself, and pairs
of remedies where no single one settles a finding."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..findings import Remedy
from ..remedies import CATALOGUE, refuses
from .launch import VerifySettings
from .verdict import Outcome, Parts, rank, solved, verdict

__all__ = ["PAIRS_PER_FINDING", "PAIRS_PER_PASS", "asked", "candidate_key", "pairs",
           "remedy_parts"]

#: At most this many pairs per finding, and per pass.
PAIRS_PER_FINDING = 3
PAIRS_PER_PASS = 6


def _diagnostic(remedy_id: str) -> bool:
    entry = CATALOGUE.get(remedy_id)
    return entry is not None and entry.diagnostic


def candidate_key(parts: Parts) -> str:
    return " + ".join(rid + " " + json.dumps(params, sort_keys=True, default=str)
                      for rid, params in parts)


def remedy_params(remedy: Any) -> dict[str, Any]:
    params = getattr(remedy, "params", None)
    return dict(params) if isinstance(params, dict) else {}


def remedy_parts(remedy: Any) -> Parts:
    """The (id, params) pairs a report's remedy applies: one, or a verified combination's."""
    params = remedy_params(remedy)
    if "+" in remedy.id and isinstance(params.get("parts"), list):
        return tuple((p["id"], dict(p.get("params") or {})) for p in params["parts"])
    return ((remedy.id, params),)


def asked(settings: VerifySettings, parts: Parts) -> bool:
    """Is every remedy of ``parts`` among those ``--verify-remedies`` asked for?"""
    return settings.only is None or all(rid in settings.only for rid, _ in parts)


def combined_remedy(first: Any, second: dict[str, Any]) -> Any:
    """A report remedy for ``first`` and the re-run's follow-up ``second`` applied together."""
    parts = [{"id": first.id, "params": remedy_params(first)},
             {"id": second["id"], "params": dict(second.get("params") or {})}]
    text = (f"{first.id} and {second['id']} together (with {first.id} alone, the re-run "
            f"still needed {second['id']}): {first.text} {second.get('text') or ''}").strip()
    code = f"{first.code}\n{second.get('code') or ''}".strip()
    return Remedy(f"{first.id}+{second['id']}", text, code, params={"parts": parts})


def pairs(problems: list[Any], candidates: dict[str, Parts],
           results: dict[str, list[Outcome]], steps: int,
           settings: VerifySettings) -> dict[str, Parts]:
    """Pairs to verify for the findings no single remedy settled; each is added to its
    finding's remedies (unverified until the pass re-runs it)."""
    base = results.get("baseline", [])
    pairs: dict[str, Parts] = {}
    queued: dict[str, Any] = {}  # pair id -> its report remedy
    for finding in problems:
        tried = [r for r in finding.remedies if candidate_key(remedy_parts(r)) in candidates
                 and "+" not in r.id]
        verdicts = {id(r): verdict(finding.kind, base, results.get(
            candidate_key(remedy_parts(r)), []), steps, remedy_parts(r)).to_dict()
            for r in tried}
        if any(solved(v) for v in verdicts.values()):
            continue
        # The singles that ran and changed something, best first.
        firsts = sorted((r for r in tried if not _diagnostic(r.id) and verdicts[id(r)][
            "status"] in ("better", "fixed", "no_effect") and verdicts[id(r)].get("changes")),
                        key=lambda r: rank(verdicts[id(r)]))[:2]
        added = 0
        for first in firsts:
            outcome = next(o for o in results[candidate_key(remedy_parts(first))]
                           if o.status == "ok")
            for follow in outcome.follow_ups:
                if added >= PAIRS_PER_FINDING or len(pairs) >= PAIRS_PER_PASS:
                    break
                if follow["id"] == first.id or follow["id"] not in CATALOGUE or \
                        _diagnostic(follow["id"]) or refuses(follow["id"]) or \
                        not asked(settings, ((follow["id"], {}),)):
                    continue
                remedy = combined_remedy(first, follow)
                if remedy.id in queued:
                    # The same pair for another finding (whose measured params differ a
                    # little): one re-run answers for both.
                    remedy = dataclasses.replace(queued[remedy.id], verified=None)
                key = candidate_key(remedy_parts(remedy))
                if key not in candidates and all(r.id != remedy.id for r in finding.remedies):
                    pairs.setdefault(key, remedy_parts(remedy))
                    queued.setdefault(remedy.id, remedy)
                    finding.remedies.append(remedy)
                    added += 1
                    break  # one follow-up per single: its re-run's most pressing remedy
    return pairs
