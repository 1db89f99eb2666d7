"""Every threshold gradwatch judges by, in one documented, overridable table.

Override per run with ``gradwatch.watch(model, opt, thresholds={"vanishing_ratio": 1e-4})``
or a :class:`Thresholds` instance; ``gradwatch run --threshold NAME=VALUE`` does the same on
the command line. ``docs/thresholds.md`` is the same table in prose and a test keeps the two
in step.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

__all__ = ["Thresholds", "resolve_thresholds"]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Limits the detectors compare measurements against; each field documents its meaning.

    >>> Thresholds().replace(vanishing_ratio=1e-4).vanishing_ratio
    0.0001
    """

    # --- gradient flow through depth -------------------------------------------------
    vanishing_ratio: float = 1e-3
    """Input-side layer's gradient norm / output-side layer's below this: vanishing (warning)."""
    vanishing_ratio_error: float = 1e-6
    """... below this: vanishing (error). SEEDS.md: the stalled sigmoid net sits near 1e-9."""
    exploding_depth_ratio: float = 1e3
    """Input-side / output-side gradient norm above this: exploding through depth."""
    persistence: float = 0.8
    """Fraction of the sampled steps in which a condition must hold to count as persistent."""
    active_grad_fraction: float = 1e-3
    """Depth ratios skip steps whose output-side gradient is below this fraction of its
    run maximum: once a model has settled (stalled or converged) every layer's gradient
    is tiny and their ratio says nothing about depth."""
    min_layers: int = 3
    """Depth analyses need at least this many layers with parameters."""

    # --- gradient scale over time ----------------------------------------------------
    exploding_growth: float = 1e3
    """Total gradient norm above this multiple of its early-run median: exploding."""
    exploding_grad_to_weight: float = 1e2
    """Total gradient norm / total weight norm above this: one SGD step of lr 0.01 would
    move the weights by more than their own size."""
    exploding_error_factor: float = 1e4
    """Either exploding ratio above this multiple of its limit: severity error."""
    baseline_steps: int = 5
    """Sampled steps whose median is the early-run baseline of the gradient norm."""
    baseline_fraction: float = 0.1
    """A clipping threshold is the median gradient norm over the first ``baseline_steps``
    sampled steps or this fraction of the run, whichever is longer."""

    # --- loss --------------------------------------------------------------------------
    min_steps: int = 20
    """Loss-trend findings need at least this many steps with a finite loss."""
    plateau_window: float = 0.5
    """Trailing fraction of the run examined for a plateau."""
    plateau_rel_change: float = 1e-2
    """Relative loss change over the plateau window below this: the loss is flat."""
    collapsed_output_spread: float = 1e-3
    """Between-sample std / RMS of the model output below this: the model predicts a
    constant, whatever its input."""
    frozen_update_ratio: float = 1e-9
    """Update / weight norm below this for every layer: the weights do not move."""
    divergence_factor: float = 10.0
    """Loss above this multiple of its best value so far: divergence."""
    divergence_persistence: int = 3
    """Consecutive sampled steps the loss must stay diverged."""
    onset_factor: float = 2.0
    """A loss above this multiple of its best, or a gradient norm above this multiple of its
    early baseline, has left its normal level: divergence and explosion are dated from the
    first step of the rise past it, and large gradients count as an explosion only if the
    loss rose past it too (or fluctuates, stalls, or turns non-finite)."""
    divergence_error_factor: float = 1e3
    """Loss above this multiple of its best: divergence of severity error."""

    # --- causes and remedies ---------------------------------------------------------------
    init_scale_low: float = 0.5
    """Weight std below this multiple of the Kaiming/Xavier std: initialised too small."""
    init_scale_high: float = 2.0
    """Weight std above this multiple of the Kaiming/Xavier std: initialised too large."""
    deep_stack_layers: int = 6
    """A stack of at least this many layers without skips or normalisation counts as deep."""
    large_update_ratio: float = 1e-1
    """Update / weight norm above this: the learning rate is too high for this layer."""
    target_update_ratio: float = 1e-3
    """Update / weight norm a suggested learning rate aims at (a common rule of thumb)."""
    max_lr_reduction: float = 1e4
    """A suggested learning rate is never below the current one divided by this."""
    explosion_lr_reduction: float = 10.0
    """... and, against an explosion or divergence, never below the current one divided by
    this: updates measured while gradients explode are sized by the gradients, not by the
    rate (a 0.35 -> 1e-4 suggestion froze a run that learns at 0.05)."""
    blowup_window_steps: int = 8
    """A lower learning rate against an explosion or divergence is sized by the largest
    update from the one before the onset to this many steps after it: later, dead or frozen
    weights barely move, and their tiny updates would hide the oversized ones."""
    forward_shrink_per_layer: float = 0.7
    """Activation RMS falling by more than this factor per layer at the first step: the
    forward signal (and with it the backward one) shrinks with depth."""
    single_layer_drop: float = 10.0
    """A gradient drop between two adjacent layers above this factor, and above twice the
    mean per-layer drop, is named as the place where the gradient is lost."""
    input_scale_high: float = 10.0
    """Input RMS above this (or below its inverse): the inputs are not standardised."""
    forward_overflow: float = 1e15
    """Loss or activation RMS above this: the forward pass has overflowed in practice
    (its square is out of float32 range, so norms and gradients reach inf)."""

    # --- activations: dead ReLU units, saturation ---------------------------------------
    dying_persist_measurements: int = 4
    """A unit counts as dead once it has output 0 for every sample of the batch on this
    many consecutive detail measurements (transient zeros are not death)."""
    dying_fraction: float = 0.25
    """Fraction of a ReLU site's units dead at the end of the run (and persistently)
    at or above this: dying ReLU (warning)."""
    dying_fraction_error: float = 0.5
    """... at or above this, or every unit of a site dead: dying ReLU (error)."""
    saturation_margin: float = 0.01
    """An output within this fraction of the activation's output range from a bound is
    saturated (sigmoid < 0.01 or > 0.99, |tanh| > 0.98): its slope is below ~4% of the
    maximum, so it passes almost no gradient."""
    saturation_fraction: float = 0.5
    """Fraction of a site's outputs saturated, on the persistence fraction of the
    measurements, at or above this: saturated activation (warning)."""
    saturation_fraction_error: float = 0.9
    """... at or above this: saturated activation (error)."""

    # --- eval mode: no-grad forwards with Dropout/BatchNorm in training mode -----------
    eval_mode_output_change: float = 1e-3
    """Relative L2 difference between the training-mode output of a no-grad forward and
    the eval-mode output of the same forward above this: the mode changes the results
    (warning). For a model without Dropout/BatchNorm layers it is also the difference that
    reveals ``self.training`` logic elsewhere (``F.dropout(x, training=self.training)``)."""
    eval_mode_bn_change: float = 1e-3
    """Relative change of the BatchNorm running statistics (mean and variance together)
    over the first pass of no-grad forwards above this: evaluation data was mixed into
    them (warning)."""
    eval_mode_in_step_fraction: float = 0.5
    """No-grad forwards one at a time, in at least this fraction of the training steps:
    they run inside the training loop (a target/teacher network, a training-metric pass),
    which the finding then says."""

    # --- gradient flow through time (nn.RNN, nn.LSTM, nn.GRU) -----------------------------
    through_time_vanishing_ratio: float = 1e-3
    """Gradient norm reaching the first timestep's input / the last timestep's below this,
    persistently and still at the end of the run: vanishing through time (warning). Also
    the level that defines the effective memory (timesteps back until the gradient is
    below this fraction of the last one's)."""
    through_time_vanishing_ratio_error: float = 1e-6
    """... its median over the measured steps below this: vanishing through time (error)."""
    through_time_exploding_ratio: float = 1e3
    """First timestep's / last timestep's input-gradient norm above this, persistently (or
    on every measurement before the gradients turned non-finite): exploding through time."""
    through_time_min_measurements: int = 3
    """Through-time findings need at least this many measured steps (detail steps on which
    the module ran with gradients); the last this many decide whether it still holds."""
    through_time_learning_loss: float = 0.5
    """A loss that fell to this fraction of its start or less (medians of the first and last
    ``baseline_steps`` steps): the model learns from the timesteps the gradient reaches, so
    vanishing through time is info, not a problem (the task may not need longer memory)."""
    forget_bias_low: float = 0.5
    """LSTM forget-gate / GRU update-gate bias (bias_ih + bias_hh, mean over units) below
    this at the first forward: the gate starts near or below one half and the state decays
    fast (cause ``forget_gate_bias_low``; the usual fix is 1). A higher bias is still named
    as the cause when the measured effective memory is shorter than the sequence."""

    # --- preflight: one forward/backward at init (gradwatch.preflight, gradwatch check) ----
    # Dead units and saturation at init are judged with dying_fraction(_error),
    # saturation_margin and saturation_fraction(_error) above; these are its own.
    preflight_dead_min_values: int = 8
    """A ReLU unit is judged dead at init only with at least this many values in the example
    batch (samples x positions): a healthy unit is 0 on all of n values with probability
    about 2^-n."""
    preflight_forward_growth: float = 1e3
    """Largest layer-output RMS / model-input RMS at init above this: the forward signal
    explodes (exploding_gradient; error above this times ``exploding_error_factor``)."""
    preflight_bias_revive_fraction: float = 0.5
    """A negative bias is the cause of a site's dead units at init (``large_negative_bias``)
    only if a zero bias would revive at least this fraction of the dead units, or of the
    units that would then be active, on the same batch (and the bias on the dead units is
    more negative than both the pre-activation spread and PyTorch's default bias init,
    1/sqrt(fan_in))."""

    def replace(self, **overrides: float) -> Thresholds:
        """Return a copy with some fields changed; unknown names raise a clear error."""
        return resolve_thresholds(self, overrides)

    def as_dict(self) -> dict[str, float]:
        """All thresholds by name."""
        return dataclasses.asdict(self)


def _field_docs() -> dict[str, str]:
    """Field name -> its docstring (the string literal under it in the class body)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Thresholds))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in itertools.pairwise(body):
        if (isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())  # type: ignore[union-attr]
    return docs


def resolve_thresholds(base: Thresholds | None,
                       overrides: Thresholds | Mapping[str, Any] | None) -> Thresholds:
    """Merge user overrides into ``base``, validating names and values."""
    base = base or Thresholds()
    if overrides is None:
        return base
    if isinstance(overrides, Thresholds):
        return overrides
    if not isinstance(overrides, Mapping):
        raise TypeError(f"thresholds must be a Thresholds or a dict of name -> number, "
                        f"got {type(overrides).__name__}")
    fields = {f.name: f for f in dataclasses.fields(Thresholds)}
    clean: dict[str, Any] = {}
    for name, value in overrides.items():
        if name not in fields:
            raise ValueError(f"unknown threshold {name!r}; known thresholds: "
                             f"{', '.join(sorted(fields))}")
        kind = int if fields[name].type in ("int", int) else float
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"threshold {name!r} must be a number, got {value!r}")
        if not value == value or value < 0 or value in (float("inf"),):
            raise ValueError(f"threshold {name!r} must be a finite number >= 0, got {value!r}")
        clean[name] = kind(value)
    return dataclasses.replace(base, **clean)
