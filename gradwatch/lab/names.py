"""Human names and units for the lab's arm metrics, and their numbers over seeds as text.

The arms record metrics under short keys (``saved_bytes``, ``batch1_error``); the index page
shows them as a reader would say them, with units: ``memory kept for backward 468 KiB``,
``a batch of 1 fails: yes``, ``84.4% (81.2-90.6% over 3 seeds)``. A metric that is NaN on
every seed of an arm does not apply to it (the dead fraction of an ELU net) and reads
``n/a``; a non-finite loss reads ``NaN/Inf``.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["METRICS", "first_sentence", "metric_label", "metric_text", "value_text"]

# key -> (human name, unit): pct (a fraction shown as %), bytes, flag (0/1: no/yes), count,
# step, ratio (x), num (three significant digits)
METRICS: dict[str, tuple[str, str]] = {
    "final_loss": ("final loss", "num"),
    "best_loss": ("lowest loss", "num"),
    "dead_fraction": ("dead ReLU units at the end (worst layer)", "pct"),
    "negative_fraction": ("units <= 0 on every sample (worst layer)", "pct"),
    "peak_dead_fraction": ("dead ReLU units at the peak (worst layer)", "pct"),
    "dead_units": ("dead units at the end", "count"),
    "revived_units": ("dead units that came back", "count"),
    "gradwatch_dead_fraction": ("dead fraction gradwatch measured", "pct"),
    "gradwatch_dying_relu": ("gradwatch reported dying ReLU", "flag"),
    "output_rel_diff": ("change between two evaluations (relative L2)", "pct"),
    "output_max_abs_diff": ("largest output change between two evaluations", "num"),
    "val_accuracy": ("held-out accuracy", "pct"),
    "val_accuracy_min": ("held-out accuracy, lowest repeat", "pct"),
    "val_accuracy_max": ("held-out accuracy, highest repeat", "pct"),
    "eval_accuracy": ("accuracy in eval mode", "pct"),
    "rel_diff_from_eval": ("output difference from eval mode (relative L2)", "pct"),
    "bn_running_stats_change": ("BatchNorm statistics moved by one evaluation", "pct"),
    "bn_batch_order_rel_diff": ("output change when the batch order changes", "pct"),
    "batch2_accuracy": ("accuracy in batches of 2", "pct"),
    "batch2_bn_rel_diff_from_eval": ("difference from eval mode in batches of 2", "pct"),
    "batch2_max_abs_output": ("largest output in batches of 2", "num"),
    "eval_max_abs_output": ("largest output in eval mode", "num"),
    "batch1_error": ("a batch of 1 fails", "flag"),
    "saved_bytes": ("memory kept for backward", "bytes"),
    "max_grad_norm": ("largest gradient norm", "num"),
    "median_grad_norm": ("median gradient norm", "num"),
    "early_grad_norm": ("gradient norm over the first steps", "num"),
    "initial_weight_norm": ("weight norm at initialisation", "num"),
    "ratio_first_to_last_timestep": ("gradient at the first / last timestep (median)", "ratio"),
    "max_ratio_first_to_last_timestep": ("gradient at the first / last timestep (largest)",
                                         "ratio"),
    "first_nonfinite_step": ("first NaN/Inf step", "step"),
    "grad_ratio_first_to_last": ("gradient at the first / last layer (median)", "ratio"),
    "grad_ratio_at_step0": ("gradient at the first / last layer at step 0", "ratio"),
    "vanishing_reported": ("gradwatch reported vanishing gradient", "flag"),
    "factor_per_layer": ("gradient factor per layer", "ratio"),
    "grad_ratio_first_to_last_timestep": ("gradient at the first / last timestep (median)",
                                          "ratio"),
    "gradwatch_eval_mode": ("gradwatch reported eval_mode", "flag"),
    "gradwatch_output_rel_diff": ("output change gradwatch measured (relative)", "pct"),
    "val_loss": ("held-out loss", "num"),
    "val_loss_long": ("held-out loss, marker 30-34 steps back", "num"),
    "val_loss_short": ("held-out loss, marker 0-4 steps back", "num"),
    "timestep_ratio_at_step0": ("gradient at the first / last timestep at step 0", "ratio"),
    "timestep_ratio_at_end": ("gradient at the first / last timestep at the end", "ratio"),
    "head_weight_growth": ("growth of the output layer's weight norm", "ratio"),
    "rnn_weight_growth": ("growth of the recurrent weights' norm", "ratio"),
    "clipped_steps": ("steps where clipping was active", "count"),
    "clip_threshold": ("clip threshold gradwatch suggests", "num"),
}


def metric_label(key: str) -> str:
    """The human name of a metric key (unknown keys: the key with spaces)."""
    return METRICS.get(key, (key.replace("_", " "), "num"))[0]


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
        and math.isfinite(v) else None


def value_text(v: Any, unit: str = "num") -> str:
    """One value in its unit; ``n/a`` for a missing or non-finite one (``NaN/Inf`` for a
    loss, where non-finite is a result, not a metric that does not apply)."""
    f = _finite(v)
    if f is None:
        return "NaN/Inf" if unit == "loss" else "n/a"
    if unit == "pct":
        return f"{100 * f:.3g}%"
    if unit == "flag":
        return "yes" if f >= 0.5 else "no"
    if unit in ("count", "step"):
        return f"{f:.0f}"
    if unit == "bytes":
        for scale, name in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
            if abs(f) >= scale:
                return f"{f / scale:.3g} {name}"
        return f"{f:.0f} B"
    text = f"{f:.3g}" if f == 0 or 1e-3 <= abs(f) < 1e5 else f"{f:.2e}"
    return text + ("x" if unit == "ratio" else "")


def metric_text(key: str, summary: Any, n_seeds: int) -> str:
    """A summary ``{median, min, max[, nonfinite]}`` over seeds as plain text:
    ``84.4% (81.2-90.6% over 3 seeds)``; ``n/a`` when no seed has a finite value."""
    unit = "loss" if key in ("final_loss", "best_loss") else METRICS.get(key, ("", "num"))[1]
    if not isinstance(summary, dict):
        return value_text(summary, unit)
    med = _finite(summary.get("median"))
    bad = int(summary.get("nonfinite") or 0)
    if med is None:
        if key == "first_nonfinite_step":
            return "never"
        return "NaN/Inf on every seed" if unit == "loss" else "n/a"
    text = value_text(med, unit)
    lo, hi = value_text(summary.get("min"), unit), value_text(summary.get("max"), unit)
    seeds = f" over {n_seeds} seeds" if n_seeds > 1 else ""
    if lo != hi:
        unit_of = re.search(r"[^\d.]*$", hi).group()  # type: ignore[union-attr]
        if unit_of and lo.endswith(unit_of) and not unit_of.startswith("e"):
            lo = lo[:-len(unit_of)]  # 81.2-90.6%, not 81.2%-90.6%
        text += f" ({lo}-{hi}{seeds})"
    if bad:
        text += f"; {'NaN/Inf' if unit == 'loss' else 'n/a'} on {bad} of {n_seeds or '?'}"
    return text


def first_sentence(text: Any, limit: int = 420) -> str:
    """The first sentence of a generated text (cut at ``limit`` characters)."""
    s = str(text or "").strip()
    cut = s.find(". ")
    if 0 < cut < limit:
        return s[:cut + 1]
    return s if len(s) <= limit else s[:limit - 1].rstrip() + "…"
