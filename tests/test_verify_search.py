"""The repair search's rounds on measured outcomes: what the next round re-runs."""

from __future__ import annotations

from gradwatch.findings import Finding, Remedy
from gradwatch.remedies import describe
from gradwatch.verify.launch import VerifySettings
from gradwatch.verify.search import candidate_key, combined_remedy, next_round, remedy_parts
from gradwatch.verify.verdict import Outcome

STEPS = 100


def outcome(loss: float, kinds: set[str], changes: list[str] | None = None,
            follow_ups: list[dict] | None = None) -> Outcome:
    losses = [(s, loss) for s in range(STEPS)]
    return Outcome("ok", steps=STEPS, loss=loss, first_loss=loss, losses=losses, kinds=kinds,
                   changes=changes or ["changed"], follow_ups=follow_ups or [])


def remedy(rid: str, **params: object) -> Remedy:
    return describe(Remedy(rid, "", "", params=dict(params)))


def finding(*remedies: Remedy) -> Finding:
    return Finding("vanishing_gradient", "error", 0, STEPS - 1, ["0"], "s", {}, [],
                   list(remedies))


def test_a_pair_that_helped_without_repairing_gets_its_follow_up_as_a_triple() -> None:
    pair = combined_remedy(remedy("kaiming_init", nonlinearity="relu"),
                           {"id": "lower_learning_rate", "params": {
                               "old_lr": "0.1", "lr": 0.01, "factor": 0.1,
                               "measured": "1", "target": "0.001", "capped": True}})
    f = finding(remedy("kaiming_init", nonlinearity="relu"), pair)
    results = {
        "baseline": [outcome(10.0, {"vanishing_gradient"})],
        candidate_key(remedy_parts(f.remedies[0])): [outcome(10.0, {"vanishing_gradient"})],
        # Better (10 -> 5) but the finding stays; its own report asks for normalisation.
        candidate_key(remedy_parts(pair)): [outcome(5.0, {"vanishing_gradient"}, follow_ups=[
            {"id": "batch_norm", "params": {}, "text": "normalise", "code": "..."}])],
    }
    tried = {k: p for k, p in ((candidate_key(remedy_parts(r)), remedy_parts(r))
                               for r in f.remedies)}
    batch = next_round([f], tried, results, STEPS, VerifySettings())
    triples = [p for p in batch.values() if len(p) == 3]
    assert [tuple(rid for rid, _ in p) for p in triples] == [
        ("kaiming_init", "lower_learning_rate", "batch_norm")]
    listed = [r.id for r in f.remedies]
    assert "kaiming_init+lower_learning_rate+batch_norm" in listed
    # b+a of a pair already listed is not queued again.
    assert not any(set(rid for rid, _ in p) == {"kaiming_init", "lower_learning_rate"}
                   for p in batch.values())


def test_a_repaired_finding_gets_no_further_round() -> None:
    f = finding(remedy("kaiming_init", nonlinearity="relu"))
    key = candidate_key(remedy_parts(f.remedies[0]))
    results = {"baseline": [outcome(10.0, {"vanishing_gradient"})],
               key: [outcome(1.0, set())]}
    assert next_round([f], {key: remedy_parts(f.remedies[0])}, results, STEPS,
                      VerifySettings()) == {}


def test_rungs_that_differ_only_in_what_they_measured_are_one_candidate() -> None:
    a = remedy("lower_learning_rate", old_lr="0.1", lr=0.01, factor=0.1, measured="0.5",
               target="0.001", capped=True)
    b = remedy("lower_learning_rate", old_lr="0.1", lr=0.01, factor=0.1, measured="3.2",
               target="0.001", capped=True)
    c = remedy("lower_learning_rate", old_lr="0.1", lr=0.001, factor=0.01, measured="3.2",
               target="0.001", capped=False, ladder=True)
    assert candidate_key(remedy_parts(a)) == candidate_key(remedy_parts(b))
    assert candidate_key(remedy_parts(a)) != candidate_key(remedy_parts(c))
