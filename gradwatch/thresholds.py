"""Every threshold gradwatch judges by, in one documented, overridable table.

Override per run with ``gradwatch.watch(model, opt, thresholds={"vanishing_ratio": 1e-4})``
or a :class:`Thresholds` instance; ``gradwatch run --threshold NAME=VALUE`` does the same on
the command line. ``docs/thresholds.md`` is the same table in prose and a test keeps the two
in step.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["Range", "Thresholds", "resolve_thresholds"]


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a threshold may take, written as an interval: ``(0, 1]``, ``[1, inf)``."""

    text: str

    def __post_init__(self) -> None:
        m = re.fullmatch(r"([\[(])(-?[\w.]+), (-?[\w.]+)([\])])", self.text)
        if m is None:
            raise ValueError(f"not an interval: {self.text!r}")
        float(m.group(2)), float(m.group(3))  # both ends must be numbers (or +-inf)

    def _parts(self) -> tuple[bool, float, float, bool]:
        m = re.fullmatch(r"([\[(])(-?[\w.]+), (-?[\w.]+)([\])])", self.text)
        assert m is not None  # checked in __post_init__
        return m.group(1) == "[", float(m.group(2)), float(m.group(3)), m.group(4) == "]"

    def __contains__(self, value: float) -> bool:
        closed_low, low, high, closed_high = self._parts()
        above = value >= low if closed_low else value > low
        below = value <= high if closed_high else value < high
        return above and below and math.isfinite(value)

    def __str__(self) -> str:
        return self.text


def limit(default: float, valid: str) -> Any:
    """A threshold field: its default and the interval of values it accepts."""
    return dataclasses.field(default=default, metadata={"range": Range(valid)})


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Limits the detectors compare measurements against; each field documents its meaning.

    >>> Thresholds().replace(vanishing_ratio=1e-4).vanishing_ratio
    0.0001
    """

    # --- gradient flow through depth -------------------------------------------------
    vanishing_ratio: float = limit(1e-3, "(0, 1]")
    """Input-side layer's gradient norm / output-side layer's below this: vanishing (warning)."""
    vanishing_ratio_error: float = limit(1e-6, "(0, 1]")
    """... below this: vanishing (error). SEEDS.md: the stalled sigmoid net sits near 1e-9."""
    exploding_depth_ratio: float = limit(1e3, "[1, inf)")
    """Input-side / output-side gradient norm above this: exploding through depth."""
    persistence: float = limit(0.8, "(0, 1]")
    """Fraction of the sampled steps in which a condition must hold to count as persistent."""
    active_grad_fraction: float = limit(1e-3, "[0, 1)")
    """Depth ratios skip steps whose output-side gradient is below this fraction of its
    run maximum: once a model has settled (stalled or converged) every layer's gradient
    is tiny and their ratio says nothing about depth."""
    min_layers: int = limit(3, "[2, inf)")
    """Depth analyses need at least this many layers with parameters."""

    # --- gradient scale over time ----------------------------------------------------
    exploding_growth: float = limit(1e3, "(1, inf)")
    """Total gradient norm above this multiple of its early-run median: exploding."""
    exploding_grad_to_weight: float = limit(1e2, "(0, inf)")
    """Total gradient norm / total weight norm above this: one SGD step of lr 0.01 would
    move the weights by more than their own size."""
    grad_spike_factor: float = limit(100.0, "(1, inf)")
    """A raw (pre-clipping) gradient norm this many times the median of the ``spike_window``
    measured steps before it, and above ``onset_factor`` x the early level: an explosion
    even when the loss does not show it (clipping hides it from the update)."""
    exploding_error_factor: float = limit(1e4, "[1, inf)")
    """Either exploding ratio above this multiple of its limit: severity error."""
    baseline_steps: int = limit(5, "[1, inf)")
    """Sampled steps whose median is the early-run baseline of the gradient norm."""
    baseline_fraction: float = limit(0.1, "(0, 1]")
    """A clipping threshold is the median gradient norm over the first ``baseline_steps``
    sampled steps or this fraction of the run, whichever is longer."""

    # --- loss --------------------------------------------------------------------------
    min_steps: int = limit(20, "[2, inf)")
    """Loss-trend findings need at least this many steps with a finite loss."""
    plateau_window: float = limit(0.5, "(0, 1]")
    """Trailing fraction of the run examined for a plateau."""
    plateau_rel_change: float = limit(1e-2, "(0, 1)")
    """Relative loss change over the plateau window below this: the loss is flat."""
    plateau_noise_z: float = limit(2.0, "[0, inf)")
    """A loss whose fitted trend over the plateau window is within this many standard
    errors of zero is flat too (moving it by up to 5x plateau_rel_change); 0 turns the
    noise test off."""
    converged_loss: float = limit(1e-8, "[0, inf)")
    """A loss whose size stays at or below this is at its floor (the model fits exactly):
    a flat loss there is convergence, whatever else is measured."""
    collapsed_output_spread: float = limit(1e-3, "[0, 1)")
    """Between-sample std / RMS of the model output below this: the model predicts a
    constant, whatever its input."""
    lr_collapse: float = limit(1e-2, "(0, 1)")
    """Largest learning rate over the plateau window / the run's peak rate at or below
    this, with the gradient still sizeable: the schedule has taken the rate to almost
    nothing (cause learning_rate_collapsed)."""
    frozen_update_ratio: float = limit(1e-9, "[0, 1)")
    """Update / weight norm below this for every layer: the weights do not move."""
    divergence_factor: float = limit(10.0, "(1, inf)")
    """Loss above this multiple of its best value so far: divergence."""
    divergence_persistence: int = limit(3, "[1, inf)")
    """Consecutive sampled steps the loss must stay diverged."""
    spike_window: int = limit(50, "[5, inf)")
    """Finite losses before a step that its loss is compared with (loss_spike)."""
    spike_sigma: float = limit(6.0, "(0, inf)")
    """A loss this many standard deviations of that window above its mean is a spike (as
    OLMo-core's skip-step rule) ..."""
    spike_min_rise: float = limit(0.5, "[0, inf)")
    """... when it is also this fraction of the window's mean above it (a nearly constant
    loss has a tiny standard deviation)."""
    spike_min_steps: int = limit(4, "[1, inf)")
    """Steps a spike lasts before the loss is back near its window, for a warning: a loss
    back within fewer steps is an outlier batch (info), frequent near convergence."""
    spike_factor: float = limit(10.0, "(1, inf)")
    """A loss this many times the largest one seen so far is a spike whatever the window
    (Megatron-LM's check)."""
    onset_factor: float = limit(2.0, "(1, inf)")
    """A loss above this multiple of its best, or a gradient norm above this multiple of its
    early baseline, has left its normal level: divergence and explosion are dated from the
    first step of the rise past it, and large gradients count as an explosion only if the
    loss rose past it too (or fluctuates, stalls, or turns non-finite)."""
    divergence_error_factor: float = limit(1e3, "(1, inf)")
    """Loss above this multiple of its best: divergence of severity error."""

    # --- causes and remedies ---------------------------------------------------------------
    init_scale_low: float = limit(0.5, "(0, 1]")
    """Weight std below this multiple of the Kaiming/Xavier std: initialised too small."""
    init_scale_high: float = limit(2.0, "[1, inf)")
    """Weight std above this multiple of the Kaiming/Xavier std: initialised too large."""
    deep_stack_layers: int = limit(6, "[2, inf)")
    """A stack of at least this many layers without skips or normalisation counts as deep."""
    large_update_ratio: float = limit(1e-1, "(0, inf)")
    """Update / weight norm above this: the learning rate is too high for this layer."""
    target_update_ratio: float = limit(1e-3, "(0, inf)")
    """Update / weight norm a suggested learning rate aims at (a common rule of thumb)."""
    max_lr_reduction: float = limit(1e4, "[1, inf)")
    """A suggested learning rate is never below the current one divided by this."""
    explosion_lr_reduction: float = limit(10.0, "[1, inf)")
    """... and, against an explosion or divergence, never below the current one divided by
    this: updates measured while gradients explode are sized by the gradients, not by the
    rate (a 0.35 -> 1e-4 suggestion froze a run that learns at 0.05)."""
    blowup_window_steps: int = limit(8, "[0, inf)")
    """A lower learning rate against an explosion or divergence is sized by the largest
    update from the one before the onset to this many steps after it: later, dead or frozen
    weights barely move, and their tiny updates would hide the oversized ones."""
    consequence_window_steps: int = limit(50, "[0, inf)")
    """A finding that begins after an explosion or a NaN began, and this many steps or fewer
    after it was under way (its first step, or the step a growing gradient passed its
    limit), is linked to it as its consequence (dead or saturated units, a diverging,
    stalling or spiking loss; ``judge/links.py``); the root's severity rises to theirs."""
    forward_shrink_per_layer: float = limit(0.7, "(0, 1]")
    """Activation RMS falling by more than this factor per layer at the first step: the
    forward signal (and with it the backward one) shrinks with depth."""
    single_layer_drop: float = limit(10.0, "[1, inf)")
    """A gradient drop between two adjacent layers above this factor, and above twice the
    mean per-layer drop, is named as the place where the gradient is lost."""
    input_scale_high: float = limit(10.0, "(1, inf)")
    """Input RMS above this (or below its inverse): the inputs are not standardised."""
    forward_overflow: float = limit(1e15, "(0, inf)")
    """Loss or activation RMS above this: the forward pass has overflowed in practice
    (its square is out of float32 range, so norms and gradients reach inf)."""

    # --- activations: dead ReLU units, saturation ---------------------------------------
    dying_persist_measurements: int = limit(4, "[1, inf)")
    """A unit counts as dead once it has output 0 for every sample of the batch on this
    many consecutive detail measurements (transient zeros are not death)."""
    dying_fraction: float = limit(0.25, "(0, 1]")
    """Fraction of a ReLU site's units dead at the end of the run (and persistently)
    at or above this: dying ReLU (warning)."""
    dying_fraction_error: float = limit(0.5, "(0, 1]")
    """... at or above this, or every unit of a site dead: dying ReLU (error)."""
    still_learning_fall: float = limit(0.1, "(0, 1)")
    """A loss whose last steps sit this fraction or more below both its level when units
    died and its best before: the model still learns, so a partly dead ReLU site is a
    warning, not an error (capacity lost, training not stopped)."""
    saturation_margin: float = limit(0.01, "(0, 0.5)")
    """An output within this fraction of the activation's output range from a bound is
    saturated (sigmoid < 0.01 or > 0.99, |tanh| > 0.98): its slope is below ~4% of the
    maximum, so it passes almost no gradient."""
    saturation_fraction: float = limit(0.5, "(0, 1]")
    """Fraction of a site's outputs saturated, on the persistence fraction of the
    measurements, at or above this: saturated activation (warning)."""
    saturation_fraction_error: float = limit(0.9, "(0, 1]")
    """... at or above this: saturated activation (error)."""

    # --- eval mode: no-grad forwards with Dropout/BatchNorm in training mode -----------
    eval_mode_output_change: float = limit(1e-3, "[0, inf)")
    """Relative L2 difference between the training-mode output of a no-grad forward and
    the eval-mode output of the same forward above this: the mode changes the results
    (warning). For a model without Dropout/BatchNorm layers it is also the difference that
    reveals ``self.training`` logic elsewhere (``F.dropout(x, training=self.training)``)."""
    eval_mode_bn_change: float = limit(1e-3, "[0, inf)")
    """Relative change of the BatchNorm running statistics (mean and variance together)
    over the first pass of no-grad forwards above this: evaluation data was mixed into
    them (warning)."""
    eval_mode_in_step_fraction: float = limit(0.5, "(0, 1]")
    """No-grad forwards one at a time, in at least this fraction of the training steps:
    they run inside the training loop (a target/teacher network, a training-metric pass),
    which the finding then says."""

    # --- gradient flow through time (nn.RNN, nn.LSTM, nn.GRU) -----------------------------
    through_time_vanishing_ratio: float = limit(1e-3, "(0, 1]")
    """Gradient norm reaching the first timestep's input / the last timestep's below this,
    persistently and still at the end of the run: vanishing through time (warning). Also
    the level that defines the effective memory (timesteps back until the gradient is
    below this fraction of the last one's)."""
    through_time_vanishing_ratio_error: float = limit(1e-6, "(0, 1]")
    """... its median over the measured steps below this: vanishing through time (error)."""
    through_time_exploding_ratio: float = limit(1e3, "[1, inf)")
    """First timestep's / last timestep's input-gradient norm above this, persistently (or
    on every measurement before the gradients turned non-finite): exploding through time."""
    through_time_min_measurements: int = limit(3, "[1, inf)")
    """Through-time findings need at least this many measured steps (detail steps on which
    the module ran with gradients); the last this many decide whether it still holds."""
    through_time_learning_loss: float = limit(0.5, "(0, 1]")
    """A loss that fell to this fraction of its start or less (medians of the first and last
    ``baseline_steps`` steps): the model learns from the timesteps the gradient reaches, so
    vanishing through time is info, not a problem (the task may not need longer memory)."""
    through_time_outgrow: float = limit(10.0, "(1, inf)")
    """A first-to-last ratio that rose this many times from the start of the run to its end
    (medians of ``through_time_min_measurements`` measurements each), to within this factor
    of ``through_time_vanishing_ratio``, while the loss fell: the run is outgrowing its
    starting state, so vanishing through time is info."""
    forget_bias_low: float = limit(0.5, "(-inf, inf)")
    """LSTM forget-gate / GRU update-gate bias (bias_ih + bias_hh, mean over units) below
    this at the first forward: the gate starts near or below one half and the state decays
    fast (cause ``forget_gate_bias_low``; the usual fix is 1). A higher bias is still named
    as the cause when the measured effective memory is shorter than the sequence."""

    # --- preflight: one forward/backward at init (gradwatch.preflight, gradwatch check) ----
    # Dead units and saturation at init are judged with dying_fraction(_error),
    # saturation_margin and saturation_fraction(_error) above; these are its own.
    preflight_dead_min_values: int = limit(8, "[1, inf)")
    """A ReLU unit is judged dead at init only with at least this many values in the example
    batch (samples x positions): a healthy unit is 0 on all of n values with probability
    about 2^-n."""
    preflight_forward_growth: float = limit(1e3, "[1, inf)")
    """Largest layer-output RMS / model-input RMS at init above this: the forward signal
    explodes (exploding_gradient; error above this times ``exploding_error_factor``)."""
    preflight_bias_revive_fraction: float = limit(0.5, "(0, inf)")
    """A negative bias is the cause of a site's dead units at init (``large_negative_bias``)
    only if a zero bias would revive at least this fraction of the dead units, or of the
    units that would then be active, on the same batch (and the bias on the dead units is
    more negative than both the pre-activation spread and PyTorch's default bias init,
    1/sqrt(fan_in)). Above 1 the bias is never named as the cause."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _check(field, value)
            whole = field.type in ("int", int)
            object.__setattr__(self, field.name, int(value) if whole else float(value))

    def replace(self, **overrides: float) -> Thresholds:
        """Return a copy with some fields changed; unknown names raise a clear error."""
        return resolve_thresholds(self, overrides)

    def as_dict(self) -> dict[str, float]:
        """All thresholds by name."""
        return dataclasses.asdict(self)


def _field_docs() -> dict[str, str]:
    """Field name -> its docstring (the string literal under it in the class body)."""
    tree = ast.parse(inspect.getsource(Thresholds))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in itertools.pairwise(body):
        if (isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())  # type: ignore[union-attr]
    return docs


def valid_range(name: str) -> Range:
    """The interval of values threshold ``name`` accepts."""
    return _FIELDS[name].metadata["range"]


def _check(field: dataclasses.Field[Any], value: Any) -> None:
    """A value of the field's type inside its range, or a ValueError/TypeError that says
    which values are allowed."""
    whole = field.type in ("int", int)
    kind = "an integer" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"threshold {field.name!r} must be {kind} in "
                        f"{field.metadata['range']}, got {value!r}")
    if whole and not float(value).is_integer():
        raise ValueError(f"threshold {field.name!r} must be a whole number in "
                         f"{field.metadata['range']}, got {value!r}")
    if value not in field.metadata["range"]:
        raise ValueError(f"threshold {field.name!r} must be in {field.metadata['range']}, "
                         f"got {value!r}")


def resolve_thresholds(base: Thresholds | None,
                       overrides: Thresholds | Mapping[str, Any] | None) -> Thresholds:
    """Merge user overrides into ``base``, validating names, types and ranges."""
    base = base or Thresholds()
    if overrides is None:
        return base
    if isinstance(overrides, Thresholds):
        return overrides
    if not isinstance(overrides, Mapping):
        raise TypeError(f"thresholds must be a Thresholds or a dict of name -> number, "
                        f"got {type(overrides).__name__}")
    clean: dict[str, Any] = {}
    for name, value in overrides.items():
        field = _FIELDS.get(name) if isinstance(name, str) else None
        if field is None:
            raise ValueError(f"unknown threshold {name!r}; known thresholds: "
                             f"{', '.join(sorted(_FIELDS))}")
        _check(field, value)
        clean[name] = int(value) if field.type in ("int", int) else float(value)
    return dataclasses.replace(base, **clean)


_FIELDS = {f.name: f for f in dataclasses.fields(Thresholds)}
