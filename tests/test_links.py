"""Findings linked by cause: an adaptive optimizer at a rate typed 1000x too high blows the
gradient up on its first update and kills the ReLU units after it; the explosion is reported
as the root and the dead units and diverging loss as its consequences. Healthy runs with the
same net (the intended rate, a zero-initialised output layer whose first gradients are small)
report no explosion."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import only
from torch import nn

import gradwatch
from gradwatch.findings import Finding
from gradwatch.judge import links
from gradwatch.runner import run_script
from gradwatch.thresholds import Thresholds

SCRIPTS = Path(__file__).parent / "scripts"


def _run(lr: float, zero_last: bool = False, steps: int = 200) -> gradwatch.Report:
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x @ torch.randn(20, 1)).tanh() + 0.1 * torch.randn(512, 1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    if zero_last:
        nn.init.zeros_(model[4].weight)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with gradwatch.watch(model, opt) as gw:
        for _ in range(steps):
            idx = torch.randint(0, 512, (32,))
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return gw.report()


def test_a_blow_up_on_the_first_update_is_the_root_of_the_dead_units() -> None:
    report = _run(lr=1.0)
    root = only(report, "exploding_gradient")
    # The norm jumped ~1e6x between step 0 and step 2: the baseline is step 0's level, not
    # the median of the first steps (which already include the blow-up).
    assert root.first_step <= 2
    assert root.evidence["grad_norm_baseline"] < 10
    assert root.evidence["growth"] > 1e5
    dying = only(report, "dying_relu")
    assert dying.first_step > root.first_step
    assert dying.evidence["root"] == {"kind": "exploding_gradient",
                                      "first_step": root.first_step}
    assert [c.id for c in dying.causes][-1] == "follows_explosion"
    kinds = {c["kind"] for c in root.evidence["consequences"]}
    assert {"dying_relu", "loss_divergence"} <= kinds
    # The root is as severe as what it brought on, and is listed before it.
    assert root.severity == "error"
    order = [f.kind for f in report.findings]
    assert order.index("exploding_gradient") < order.index("dying_relu")
    assert "brought on" in root.summary


def test_the_intended_rate_and_a_zero_initialised_output_layer_do_not_explode() -> None:
    for report in (_run(lr=1e-3), _run(lr=1e-3, zero_last=True)):
        kinds = {f.kind for f in report.findings if f.severity != "info"}
        assert kinds == set(), [f.summary for f in report.findings]


def _finding(kind: str, first: int, severity: str = "warning") -> Finding:
    return Finding(kind, severity, first, first + 10, [], kind, {})


def test_only_findings_that_begin_within_the_window_after_the_root_are_linked() -> None:
    t = Thresholds(consequence_window_steps=20)
    root = _finding("exploding_gradient", 100)
    before, near, far = (_finding("dying_relu", 90, "error"), _finding("loss_plateau", 120),
                         _finding("saturated_activation", 121))
    links.link([root, before, near, far], t)
    assert "root" not in before.evidence and "root" not in far.evidence
    assert near.evidence["root"]["first_step"] == 100
    assert root.evidence["consequences"] == [{"kind": "loss_plateau", "first_step": 120}]
    assert root.severity == "warning"  # an error before it was not its doing


def test_a_nan_is_not_the_consequence_of_what_it_caused_and_explains_later_findings() -> None:
    t = Thresholds()
    nan = _finding("nonfinite", 50, "error")
    boom = _finding("exploding_gradient", 40)
    stall = _finding("loss_plateau", 60)
    links.link([nan, boom, stall], t)
    assert "root" not in boom.evidence  # the explosion came first: it is the NaN's cause
    assert stall.evidence["root"]["kind"] == "nonfinite"
    assert "consequences" not in boom.evidence  # already explained by the stronger root


def test_a_gan_keeps_its_findings_on_the_model_they_are_about() -> None:
    # Two models, two optimizers, alternating steps under gradwatch run: the critic's dead
    # units are the critic's finding (named, its layers), the generator has none, and no
    # finding of one model is linked to the other's.
    result = run_script(SCRIPTS / "train_gan_dead_critic.py")
    assert result.exit_code == 0 and result.report is not None
    problems = [f for f in result.report.findings if f.severity != "info"]
    assert [f.kind for f in problems] == ["dying_relu"]
    (dying,) = problems
    assert dying.summary.startswith("critic: ")
    assert all(name.startswith("critic.") for name in dying.layers)
    assert dying.evidence["dead_units"] >= 16 and "root" not in dying.evidence
    assert len(result.report.to_dict()["facts"]["optimizers"]) == 2


def test_a_gradient_that_grows_for_many_steps_explains_what_happens_while_it_grows() -> None:
    t = Thresholds(consequence_window_steps=20)
    root = _finding("exploding_gradient", 6)
    root.evidence["growth_past_limit_step"] = 264  # rising from step 6, past 1000x at 264
    dying, diverging, later = (_finding("dying_relu", 64, "error"),
                               _finding("loss_divergence", 111, "error"),
                               _finding("loss_plateau", 300))
    links.link([root, dying, diverging, later], t)
    assert dying.evidence["root"] == diverging.evidence["root"] == {
        "kind": "exploding_gradient", "first_step": 6}
    assert "root" not in later.evidence
    assert root.severity == "error"
