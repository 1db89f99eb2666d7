"""Which re-runs a ``--verify`` pass makes: the remedies gradwatch can apply itself, then,
round after round for the findings no re-run has repaired yet, lower learning rates and
pairs of remedies, until one repairs each finding or nothing is left to try."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..findings import Remedy
from ..judge.advice import round_sig
from ..remedies import CATALOGUE, describe, refuses
from .launch import VerifySettings
from .verdict import Outcome, Parts, declares_all, rank, solved, verdict

__all__ = ["COMPATIBLE", "LADDER", "MAX_PARTS", "PAIRS_PER_FINDING", "PAIRS_PER_PASS", "asked",
           "candidate_key", "next_round", "remedy_parts"]

#: The most remedies one candidate applies together (a triple).
MAX_PARTS = 3
#: At most this many new candidates per finding, and per round.
PAIRS_PER_FINDING = 3
PAIRS_PER_PASS = 6


def _diagnostic(remedy_id: str) -> bool:
    return declares_all(((remedy_id, {}),), "diagnostic")


def candidate_key(parts: Parts) -> str:
    """One string per re-run's worth of change: the remedies and the parameters they apply
    (not those that only say what was measured)."""
    def applied(rid: str, params: dict[str, Any]) -> dict[str, Any]:
        keep = CATALOGUE[rid].applies if rid in CATALOGUE else None
        return params if keep is None else {k: v for k, v in params.items() if k in keep}

    return " + ".join(rid + " " + json.dumps(applied(rid, params), sort_keys=True, default=str)
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


def combined_remedy(first: Any, second: dict[str, Any], reason: str | None = None) -> Remedy:
    """A report remedy for ``first`` and ``second`` applied together: the re-run's
    follow-up (``reason`` None) or a remedy that belongs with it."""
    parts = [*({"id": rid, "params": dict(params)} for rid, params in remedy_parts(first)),
             {"id": second["id"], "params": dict(second.get("params") or {})}]
    why = reason or f"with {first.id} alone, the re-run still needed {second['id']}"
    text = (f"{first.id} and {second['id']} together ({why}): {first.text} "
            f"{second.get('text') or ''}").strip()
    code = f"{first.code}\n{second.get('code') or ''}".strip()
    return Remedy(f"{first.id}+{second['id']}", text, code, params={"parts": parts})


def next_round(problems: list[Any], tried: dict[str, Parts],
               results: dict[str, list[Outcome]], steps: int, settings: VerifySettings,
               default_lr: float | None = None,
               framework: dict[str, Any] | None = None) -> dict[str, Parts]:
    """The re-runs of the next round of the search, each added to its finding's remedies
    (unverified until the round runs): for every finding that no re-run has repaired yet,
    the next rung of the learning-rate ladder, compatible pairs of the remedies it offers,
    and its best single together with what that single's own re-run still found. The
    rungs' code is written for ``framework`` (the run's ``facts["framework"]``)."""
    base = results.get("baseline", [])
    seen = {_as_set(parts) for parts in tried.values()}
    # The remedy object of each candidate tried or queued, to list it under another finding
    # that arrives at the same candidate (one re-run answers for both).
    known = {_as_set(remedy_parts(r)): r for f in problems for r in f.remedies
             if candidate_key(remedy_parts(r)) in tried}
    out: dict[str, Parts] = {}
    for finding in problems:
        ran = [r for r in finding.remedies if candidate_key(remedy_parts(r)) in results]
        verdicts = {id(r): verdict(finding.kind, base, results[candidate_key(
            remedy_parts(r))], steps, remedy_parts(r)).to_dict() for r in ran}
        if any(solved(v) for v in verdicts.values()):
            continue
        found = [_lr_rung(finding, ran, verdicts, default_lr, framework),
                 *_compatible(finding, ran, verdicts),
                 *_follow_up_pairs(finding, ran, verdicts, results, settings)]
        added = 0
        for remedy in found:
            if remedy is None or added >= PAIRS_PER_FINDING or len(out) >= PAIRS_PER_PASS:
                continue
            parts = remedy_parts(remedy)
            if any(_as_set(remedy_parts(r)) == _as_set(parts) for r in finding.remedies):
                continue  # already listed under this finding
            if _as_set(parts) in seen or not asked(settings, parts):
                # b+a when a+b ran, a rung already tried, or the same pair for another
                # finding: listed with the one re-run that answers for both.
                same = known.get(_as_set(parts))
                if same is not None:
                    finding.remedies.append(dataclasses.replace(same, verified=None))
                continue
            seen.add(_as_set(parts))
            known[_as_set(parts)] = remedy
            out[candidate_key(parts)] = parts
            finding.remedies.append(remedy)
            added += 1
    return out


#: Remedies that belong together where neither settles a finding alone, applied in this
#: order: an activation swap with the init that fits it, a rate with clipping, a
#: normalisation with a rate.
COMPATIBLE = (("leaky_relu", "kaiming_init"), ("lower_learning_rate", "clip_grad_norm"),
              ("batch_norm", "lower_learning_rate"))
#: Learning-rate factors the ladder tries after the one the measured updates call for,
#: with the optimizer's default rate, mildest first.
LADDER = (0.1, 0.01)
_HELPED = ("better", "fixed", "no_effect")  # ran and changed something measurable


def _as_set(parts: Parts) -> frozenset[str]:
    """A candidate as the set of its remedies: a+b and b+a are one re-run's worth (their
    parameters, measured on different re-runs, differ only in what each measured); a
    single remedy with other parameters (a rung of the rate ladder) is another."""
    if len(parts) > 1:
        return frozenset(rid for rid, _ in parts)
    return frozenset(candidate_key((part,)) for part in parts)


def _lr_rung(finding: Any, ran: list[Any], verdicts: dict[int, dict[str, Any]],
             default_lr: float | None, framework: dict[str, Any] | None = None
             ) -> Remedy | None:
    """The next, lower learning rate, when every rung tried so far ran without repairing
    the finding and none made the loss worse (a rate too low to learn ends the ladder)."""
    rungs = [r for r in ran if r.id == "lower_learning_rate"]
    if not rungs or any(verdicts[id(r)]["status"] in ("worse", "failed") for r in rungs):
        return None
    first = rungs[0].params
    try:
        old = float(first["old_lr"])
        tried = min(float(r.params["factor"]) for r in rungs)
    except (KeyError, TypeError, ValueError):
        return None
    ladder = set(LADDER)
    if default_lr is not None and 0 < default_lr < old:
        ladder.add(round_sig(default_lr / old))
    lower = sorted((f for f in ladder if 0 < f < tried * 0.99), reverse=True)
    if not lower:
        return None
    factor = lower[0]
    return describe(Remedy("lower_learning_rate", "", "", params={
        **first, "factor": factor, "lr": round_sig(old * factor), "ladder": True,
        "capped": False}), framework)


def _compatible(finding: Any, ran: list[Any], verdicts: dict[int, dict[str, Any]]
                ) -> list[Remedy]:
    """Pairs of COMPATIBLE remedies the finding offers, each of which ran alone without
    repairing it; an activation swap brings the init that fits it even if not offered."""
    singles = {r.id: r for r in ran if "+" not in r.id and
               verdicts[id(r)]["status"] in _HELPED}
    offered = {r.id: r for r in finding.remedies if "+" not in r.id}
    out = []
    for a, b in COMPATIBLE:
        first = singles.get(a)
        second = singles.get(b) or (offered.get(b) if b in offered and
                                    id(offered[b]) not in verdicts else None)
        if first is None:
            continue
        if second is None and (a, b) == ("leaky_relu", "kaiming_init"):
            second = describe(Remedy("kaiming_init", "", "", params={}))
        if second is not None:
            out.append(combined_remedy(first, {"id": second.id, "params": second.params,
                                               "text": second.text, "code": second.code},
                                       reason="they belong together"))
    return out


def _follow_up_pairs(finding: Any, ran: list[Any], verdicts: dict[int, dict[str, Any]],
                     results: dict[str, list[Outcome]], settings: VerifySettings
                     ) -> list[Remedy]:
    """The two best singles that changed something, or pairs that made the loss better
    without repairing the finding, each with the first remedy its own re-run's report offers
    for what is still wrong (errors first): pairs, then triples."""
    firsts = sorted((r for r in ran if not _diagnostic(r.id) and verdicts[id(r)].get("changes")
                     and (verdicts[id(r)]["status"] in _HELPED if "+" not in r.id else
                          verdicts[id(r)]["status"] == "better" and
                          len(remedy_parts(r)) < MAX_PARTS)),
                    key=lambda r: rank(verdicts[id(r)]))[:2]
    # What ran alone and could not apply or failed is no partner for anything.
    dead = {r.id for r in ran if verdicts[id(r)]["status"] in ("not_applicable", "failed")}
    out = []
    for first in firsts:
        outcome = next((o for o in results[candidate_key(remedy_parts(first))]
                        if o.status == "ok"), None)
        for follow in outcome.follow_ups if outcome is not None else []:
            if follow["id"] in {rid for rid, _ in remedy_parts(first)} or \
                    follow["id"] not in CATALOGUE or \
                    follow["id"] in dead or _diagnostic(follow["id"]) or \
                    refuses(follow["id"]) or not asked(settings, ((follow["id"], {}),)):
                continue
            out.append(combined_remedy(first, follow))
            break  # one follow-up per single: its re-run's most pressing remedy
    return out
