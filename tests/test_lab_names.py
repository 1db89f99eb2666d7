"""The lab page's arm metrics read as a person says them: human names, units, n/a."""

from __future__ import annotations

import math

from gradwatch.lab.core import percent
from gradwatch.lab.names import first_sentence, metric_label, metric_text


def test_numbers_carry_their_unit_on_every_number() -> None:
    assert percent([0.844, 0.812, 0.906]) == "84.4% (81.2-90.6% over 3 seeds)"
    assert metric_text("dead_fraction", {"median": 0.844, "min": 0.812, "max": 0.906}, 3) \
        == "84.4% (81.2-90.6% over 3 seeds)"
    assert metric_text("saved_bytes", {"median": 4.79e5, "min": 4.79e5, "max": 4.79e5}, 3) \
        == "468 KiB"
    assert metric_text("saved_bytes", {"median": 2048, "min": 1024, "max": 4096}, 3) \
        == "2 KiB (1-4 KiB over 3 seeds)"
    assert metric_text("batch1_error", {"median": 1.0, "min": 1.0, "max": 1.0}, 3) == "yes"


def test_a_metric_that_does_not_apply_reads_na_and_a_nan_loss_reads_nan() -> None:
    nan = {"median": math.nan, "min": math.nan, "max": math.nan, "nonfinite": 3}
    assert metric_text("dead_fraction", nan, 3) == "n/a"
    assert metric_text("dead_fraction", None, 3) == "n/a"
    assert metric_text("final_loss", nan, 3) == "NaN/Inf on every seed"
    assert metric_text("first_nonfinite_step", nan, 3) == "never"
    assert metric_text("final_loss", {"median": 2.0, "min": 1.0, "max": 3.0, "nonfinite": 1},
                       3) == "2 (1-3 over 3 seeds); NaN/Inf on 1 of 3"


def test_keys_get_human_names_and_texts_their_first_sentence() -> None:
    assert metric_label("gradwatch_dead_fraction") == "dead fraction gradwatch measured"
    assert metric_label("batch1_error") == "a batch of 1 fails"
    assert metric_label("some_new_metric") == "some new metric"
    assert first_sentence("loss 0.5 (0.4-0.6). Then more.") == "loss 0.5 (0.4-0.6)."
