"""Causes, each checked against the measured model and optimizer; one that does not hold
for this model returns ``None`` and is never listed.

Every check returns a :class:`~gradwatch.findings.Cause` whose text carries the numbers
that made it hold.
"""

from __future__ import annotations

import math

import numpy as np

from ..findings import Cause
from .context import Context, Group, fmt

__all__ = [
    "CAUSE_IDS",
    "batchnorm_stats_updated_by_eval",
    "clipping_to_zero",
    "dead_at_init",
    "dead_units_block",
    "deep_plain_stack",
    "dropout_active_in_eval",
    "eval_share",
    "forward_overflow",
    "gate_bias_low",
    "grad_growth",
    "init_scale",
    "input_stats",
    "large_preactivations",
    "learning_rate_spike",
    "learning_rate_too_high",
    "negative_bias",
    "no_grad_forward_inside_training_step",
    "preactivation_offset",
    "recurrent_weights",
    "saturating_activation",
    "signal_shrinks_forward",
    "sudden_nonfinite",
    "training_mode_code_in_eval",
    "unscaled_inputs",
    "vanilla_rnn_long_sequence",
    "weights_grew",
]

CAUSE_IDS = ("sigmoid_in_deep_stack", "tanh_in_deep_stack", "init_too_small", "init_too_large",
             "deep_plain_stack", "learning_rate_too_high", "unscaled_inputs",
             "forward_overflow", "clipping_on_infinite_norm", "gradient_zeroed_before_step",
             "signal_shrinks_forward", "nonfinite_input", "invalid_forward_op",
             "invalid_backward_op",
             # signs of a stuck model (loss_plateau): measured facts that explain the stall
             "constant_output", "weights_frozen", "gradient_vanishes",
             # activation sites (dying_relu, saturated_activation)
             "large_negative_bias", "learning_rate_spike", "dead_at_init",
             "large_preactivations", "preactivation_offset", "weights_grew",
             "dead_units_block_gradient",
             # eval mode (no-grad forwards with Dropout/BatchNorm in training mode)
             "dropout_active_in_eval", "batchnorm_stats_updated_by_eval",
             "training_mode_code_in_eval", "no_grad_forward_inside_training_step",
             # gradient flow through time (nn.RNN, nn.LSTM, nn.GRU)
             "vanilla_rnn_long_sequence", "recurrent_weights_small", "recurrent_weights_large",
             "forget_gate_bias_low")
"""Every cause id any detector can emit (a test checks the detectors against it)."""


def saturating_activation(ctx: Context, group: Group) -> Cause | None:
    """Sigmoid/tanh after most layers of a deep stack."""
    acts = [ctx.act_after(i) for i in group.layers]
    for act in ("sigmoid", "tanh"):
        n = sum(a == act for a in acts)
        if n >= max(2, ctx.t.deep_stack_layers - 1) or (n >= 2 and n >= len(acts) // 2):
            bound = "0.25" if act == "sigmoid" else "1 (and far less off-centre)"
            return Cause(f"{act}_in_deep_stack",
                         f"{n} of the {len(acts)} layers feed a {act}; its derivative is at "
                         f"most {bound}, so every layer multiplies the backward signal by "
                         f"that factor times its weights")
    return None


def init_scale(ctx: Context, group: Group,
               directions: tuple[str, ...] = ("small", "large")) -> Cause | None:
    """Initial weight std far from the Kaiming/Xavier std for the activation that follows.

    ``directions`` says which deviation can explain the finding at hand: a too-small init
    never makes values explode or overflow. A single layer has nothing to compound, so
    its init scale is never a cause.
    """
    if len(group.layers) < 2:
        return None
    scales = [(i, ctx.init_scale(i)) for i in group.layers]
    scales = [(i, s) for i, s in scales if s]
    if not scales:
        return None
    ratios = np.array([s["ratio"] for _, s in scales])
    for kind, mask in (("small", ratios < ctx.t.init_scale_low),
                       ("large", ratios > ctx.t.init_scale_high)):
        if kind not in directions or mask.sum() * 2 < len(scales):
            continue
        picked = [scales[k] for k in np.nonzero(mask)[0]]
        # One phrase per activation: the output layer (no activation) reads apart from
        # the ReLU layers before it.
        by_act: dict[str, list[tuple[int, dict]]] = {}
        for i, sc in picked:
            by_act.setdefault(sc["activation"], []).append((i, sc))
        parts = []
        for act, items in sorted(by_act.items(), key=lambda kv: -len(kv[1])):
            med = float(np.median([sc["ratio"] for _, sc in items]))
            fam = items[0][1]["family"].capitalize()
            after = "a layer without activation" if act in ("none", "unknown") else \
                f"the {act} that follows"
            parts.append(f"{fmt(med)}x the {fam} std for {after} "
                         f"({_span([ctx.label(i) for i, _ in items])})")
        text = f"weights start at {'; and '.join(parts)}: "
        text += ("each layer shrinks the signal, forward and backward" if kind == "small"
                 else "each layer multiplies the signal, forward and backward")
        return Cause(f"init_too_{kind}", text)
    return None


def signal_shrinks_forward(ctx: Context, group: Group) -> Cause | None:
    """Activation RMS falls layer after layer at initialisation (measured, forward)."""
    if len(group.layers) < ctx.t.min_layers:
        return None
    act = ctx.detail("act_rms")
    rows = [r for r in range(act.shape[0]) if np.isfinite(act[r, group.layers]).all()]
    if not rows:
        return None
    rms = act[rows[0], group.layers]  # the model's first measured forward
    if rms[0] <= 0 or rms[-2] <= 0:
        return None
    factor = (rms[-2] / rms[0]) ** (1 / max(1, len(rms) - 2))
    if factor > ctx.t.forward_shrink_per_layer:
        return None
    return Cause("signal_shrinks_forward",
                 f"the forward signal shrinks {fmt(1 / factor)}x per layer at the first step "
                 f"(activation RMS {fmt(rms[0])} after {ctx.label(group.layers[0])}, "
                 f"{fmt(rms[-2])} after {ctx.label(group.layers[-2])}): the backward "
                 f"signal shrinks with it")


def deep_plain_stack(ctx: Context, group: Group) -> Cause | None:
    """Many layers with no skip connection and no normalisation in the graph."""
    n = len(group.layers)
    facts = ctx.structure(group.root)
    has_norm = bool(facts.get("norm_ops")) or bool(facts.get("norm_modules"))
    if n < ctx.t.deep_stack_layers or has_norm or facts.get("branch_merges", 1):
        return None
    return Cause("deep_plain_stack",
                 f"{n} layers in a plain chain: the autograd graph has no skip connection "
                 f"and no normalisation layer to keep the gradient scale from compounding")


def learning_rate_too_high(ctx: Context, since: int | None = None,
                           until: int | None = None) -> Cause | None:
    """Updates that are, typically (median over the sampled steps of ``[since, until]``), a
    large fraction of the weights they change.

    The median, not the peak: the first update of weights initialised near zero is large
    relative to them whatever the learning rate.
    """
    window = ctx.detail_window(since, until)
    per_step = ctx.step_update_ratio[window]
    ok = np.isfinite(per_step)
    if not ok.any():
        return None
    typical = float(np.median(per_step[ok]))
    if typical < ctx.t.large_update_ratio:
        return None
    r = np.where(np.isfinite(ctx.update_ratio[window]), ctx.update_ratio[window], -1)
    k = np.unravel_index(int(np.argmax(r)), r.shape)
    lrs = ", ".join(fmt(lr) for lr in ctx.learning_rates_between(since, until)) or "n/a"
    steps = ctx.detail_steps[window]
    return Cause("learning_rate_too_high",
                 f"each update changes the weights by {fmt(100 * typical)}% of their norm "
                 f"(median of {int(ok.sum())} measured steps from step {int(steps[ok][0])}; "
                 f"up to {fmt(100 * float(r[k]))}% in {ctx.label(int(k[1]))} at step "
                 f"{int(steps[k[0]])}; learning rate {lrs}); healthy updates are around "
                 f"{fmt(100 * ctx.t.target_update_ratio)}%")


def input_stats(ctx: Context, since: int | None = None) -> tuple[float, float, float] | None:
    """Median RMS, mean and std of the model's (finite) inputs on sampled steps from ``since``."""
    window = ctx.detail_window(since, None)
    rms, mean, std = (ctx.io(k)[window] for k in ("input_rms", "input_mean", "input_std"))
    ok = np.isfinite(rms)
    if not ok.any():
        return None
    return float(np.median(rms[ok])), float(np.median(mean[ok])), float(np.median(std[ok]))


def unscaled_inputs(ctx: Context, since: int | None = None) -> Cause | None:
    """Model inputs far from unit scale (on the sampled steps from ``since`` on)."""
    stats = input_stats(ctx, since)
    if stats is None:
        return None
    value, mean, std = stats
    hi = ctx.t.input_scale_high
    if 1 / hi <= value <= hi:
        return None
    whole = input_stats(ctx)
    changed = ""
    if since is not None and whole is not None and 1 / hi <= whole[0] <= hi:
        changed = f" from step {since} on (over the whole run: RMS {fmt(whole[0])})"
    return Cause("unscaled_inputs",
                 f"the model's inputs have RMS {fmt(value)} (mean {fmt(mean)}, std "
                 f"{fmt(std)}){changed}, far from the unit scale initialisations assume")


def forward_overflow(ctx: Context) -> Cause | None:
    """The very first forward pass, before any update, already produces astronomical values.

    Only then can one say that gradient clipping cannot help: a forward pass that
    overflows later, after updates made the weights huge, is the consequence of those
    updates (which clipping or a lower learning rate would have kept small).
    """
    if not len(ctx.steps):
        return None
    lim = ctx.t.forward_overflow
    first_step = int(ctx.steps[0])
    first = float(ctx.loss[0])  # +inf encodes a NaN/Inf loss
    out = ctx.io("output_rms")
    at_start = ctx.detail_steps == first_step
    out0 = float(out[at_start][0]) if at_start.any() else math.nan
    if math.isfinite(first) and first >= lim:
        what = f"the very first loss is {fmt(first)}"
    elif not math.isnan(out0) and out0 >= lim:
        what = f"the model's first output has RMS {fmt(out0)}"
    else:
        return None
    return Cause("forward_overflow",
                 f"{what} (step {first_step}, before any update): the initial weights make "
                 f"the forward pass blow up, and its gradients are too large to square in "
                 f"float32. Clipping limits the size of a step, not the scale of the weights, "
                 f"so it cannot help (in float32, clip_grad_norm_ even zeroes every "
                 f"gradient); the weights must be re-initialised")


def clipping_to_zero(ctx: Context) -> Cause | None:
    """Gradients applied by the optimizer are zero although backward produced non-zero ones."""
    raw = ctx.detail("grad_norm_applied")
    if raw.size == 0:
        return None
    applied = np.sqrt(np.nansum(raw ** 2, axis=1))
    measured = np.isfinite(raw).any(axis=1)
    idx = np.searchsorted(ctx.steps, ctx.detail_steps)
    idx = np.clip(idx, 0, len(ctx.steps) - 1)
    before = ctx.total_grad[idx] if len(ctx.steps) else np.array([])
    zeroed = measured & (applied == 0) & (before > 0)
    if not zeroed.any():
        return None
    k = int(np.nonzero(zeroed)[0][0])
    raw_total = float(before[k])
    f32_max = math.sqrt(np.finfo(np.float32).max)
    if raw_total > f32_max or not math.isfinite(raw_total):
        return Cause("clipping_on_infinite_norm",
                     f"the raw gradient norm is {fmt(raw_total)}; its square overflows "
                     f"float32, so clip_grad_norm_ computes an infinite total norm and "
                     f"multiplies every gradient by max_norm/inf = 0: no weight moves "
                     f"(from step {int(ctx.detail_steps[k])})")
    return Cause("gradient_zeroed_before_step",
                 f"backward() produced a gradient of norm {fmt(raw_total)} but the optimizer "
                 f"received all-zero gradients (step {int(ctx.detail_steps[k])}): something "
                 f"between backward() and step() zeroes them")


def grad_growth(ctx: Context, until: int) -> tuple[float, int] | None:
    """Largest finite total gradient norm before step ``until`` / its early baseline, and the
    step its rise began (the step after it was last within ``onset_factor`` of baseline).

    None with too few measured steps to have a baseline (``baseline_steps``).
    """
    before = ctx.steps < until
    total = ctx.total_grad[before]
    ok = np.isfinite(total) & (total > 0)
    total, steps = total[ok], ctx.steps[before][ok]
    if total.size <= ctx.t.baseline_steps:
        return None
    growth = total / float(np.median(total[: ctx.t.baseline_steps]))
    peak = int(np.argmax(growth))
    near = np.nonzero(growth[: peak + 1] <= ctx.t.onset_factor)[0]
    onset = int(near[-1]) + 1 if near.size else 0
    return float(growth[peak]), int(steps[min(onset, peak)])


def sudden_nonfinite(ctx: Context, step: int, origin: str) -> Cause | None:
    """A NaN/Inf that appeared in one step from a normal-sized run: data or an invalid op.

    Holds when, before ``step``, the loss stayed below the overflow level, the gradient
    norm was measured on more than ``baseline_steps`` steps and never grew
    ``exploding_growth``-fold over its baseline, and the weights were still finite at
    ``step``: nothing grew towards the overflow, so the value came from this step's batch
    or from an operation that is undefined at this input.
    """
    if origin not in ("forward", "backward"):
        return None
    ev = ctx.h.events
    if ev.first_nonfinite_weight is not None and ev.first_nonfinite_weight <= step:
        return None
    before = ctx.steps < step
    loss = ctx.loss[before]
    loss = loss[np.isfinite(loss)]
    if loss.size and float(np.max(np.abs(loss))) >= ctx.t.forward_overflow:
        return None
    growth = grad_growth(ctx, step)
    if growth is None or growth[0] > ctx.t.exploding_growth:
        return None  # too short a history to call it normal, or the gradient grew
    last = f"the loss was {fmt(float(loss[-1]))} the step before and " if loss.size else ""
    if origin == "backward":
        return Cause("invalid_backward_op",
                     f"the loss was finite at step {step} but backward() produced NaN/Inf "
                     f"while no gradient had grown before: an operation whose derivative is "
                     f"infinite at this input (sqrt or norm at 0, log of 0, pow with a "
                     f"fractional exponent at 0, division by a zero std); clipping cannot "
                     f"repair a NaN gradient")
    rows = ctx.detail_steps == step
    x = ctx.io("input_rms")[rows]
    if x.size and not np.isfinite(x).all():
        return Cause("nonfinite_input",
                     f"the model's input at step {step} already contains NaN/Inf (input RMS "
                     f"{fmt(float(x[0]))}); {last}every weight was finite: the batch is bad, "
                     f"not the model")
    return Cause("invalid_forward_op",
                 f"{last}every weight was finite and no gradient had grown, yet the forward "
                 f"pass of step {step} produced NaN/Inf: a NaN/Inf in this batch's data or an "
                 f"operation undefined at this input (log or sqrt of a negative number, "
                 f"division by zero); clipping cannot help, skipping the step can")


# --- activation sites ---------------------------------------------------------------
def _site_first_last(ctx: Context, i: int, stat: str) -> tuple[float, float] | None:
    """A site's statistic at its first and last measurement in this view."""
    v = ctx.site_stat(stat)[:, i]
    v = v[np.isfinite(v)]
    return (float(v[0]), float(v[-1])) if v.size else None


def negative_bias(ctx: Context, i: int) -> Cause | None:
    """The bias feeding a ReLU site's dead units is more negative than the pre-activation
    spread: no input of the batch lifts those units above zero."""
    site = ctx.site(i)
    b_dead = site.final.get("bias_dead_mean")
    spread = _site_first_last(ctx, i, "pre_std")
    if b_dead is None or spread is None or site.layer is None or b_dead >= 0:
        return None
    fan_in = ctx.layer(site.layer).fan_in
    default = 1 / math.sqrt(fan_in) if fan_in else 0.0
    # Both beyond the spread of the pre-activations and beyond anything PyTorch's default
    # init draws (U(-1/sqrt(fan_in), 1/sqrt(fan_in))): a bias someone or something set.
    if -b_dead < spread[0] or -b_dead <= default:
        return None
    alive = site.final.get("bias_alive_mean")
    origin = ("it was set so at initialisation" if site.bias_init is not None
              and site.bias_init <= b_dead / 2 else
              f"updates drove it there (mean bias {fmt(site.bias_init)} when first seen)")
    return Cause("large_negative_bias",
                 f"the bias of {ctx.label(site.layer)} on the dead units is {fmt(b_dead)} "
                 f"(mean; {fmt(alive)} on the live ones), larger in magnitude than the "
                 f"pre-activation spread at the first measurement (std {fmt(spread[0])}): no "
                 f"input lifts them above 0; {origin}")


def learning_rate_spike(ctx: Context, since: int, layer: int | None) -> Cause | None:
    """Units died right after the learning rate rose, or after an update far larger than
    the weights' own scale (measured at the layer feeding them)."""
    lr = ctx.h.steps.block("lr")[:, 0]
    steps = ctx.h.steps.steps
    # The units died between the measurement before ``since`` and ``since``.
    earlier = ctx.site_steps[ctx.site_steps < since]
    prev = int(earlier[-1]) if earlier.size else since - 1
    ok = np.isfinite(lr)
    before = ok & (steps <= prev)
    near = ok & (steps > prev) & (steps <= since)
    if before.any() and near.any():
        base, peak = float(np.median(lr[before])), float(np.max(lr[near]))
        if base > 0 and peak >= 2 * base:
            k = int(steps[near][int(np.argmax(lr[near]))])
            return Cause("learning_rate_spike",
                         f"the learning rate rose to {fmt(peak)} at step {k} (from "
                         f"{fmt(base)} before), and the units died from step {since} on: one "
                         f"large update pushed their pre-activations below 0 for every input")
    if layer is None:
        return None
    ratio = ctx.update_ratio[:, layer] if ctx.update_ratio.shape[1] > layer else None
    if ratio is None:
        return None
    window = ctx.detail_window(prev, since)
    r = ratio[window]
    r = r[np.isfinite(r)]
    if r.size and float(r.max()) >= ctx.t.large_update_ratio:
        return Cause("learning_rate_spike",
                     f"an update around step {since}, when the units died, changed "
                     f"{ctx.label(layer)} by {fmt(100 * float(r.max()))}% of its norm "
                     f"(healthy: about {fmt(100 * ctx.t.target_update_ratio)}%): such a step "
                     f"can push a unit's pre-activation below 0 for every input")
    return None


def dead_at_init(ctx: Context, i: int) -> Cause | None:
    """A ReLU site was already mostly dead at the first measurement, before updates mattered."""
    first = _site_first_last(ctx, i, "fraction")
    steps = ctx.site_steps[np.isfinite(ctx.site_stat("fraction")[:, i])]
    if first is None or not steps.size or steps[0] > 0 or first[0] < ctx.t.dying_fraction:
        return None
    site = ctx.site(i)
    scale = ctx.init_scale(site.layer) if site.layer is not None else None
    how = (f"; {ctx.label(site.layer)} starts at {fmt(scale['ratio'])}x the "
           f"{scale['family'].capitalize()} std" if scale and
           not ctx.t.init_scale_low <= scale["ratio"] <= ctx.t.init_scale_high else "")
    return Cause("dead_at_init",
                 f"{fmt(100 * first[0])}% of the units were already dead at the first forward "
                 f"pass (step 0), before any update: the initialisation put them there{how}")


_SATURATES_AT = {"sigmoid": 4.6, "tanh": 2.3, "softsign": 49.0, "hardsigmoid": 3.0}
"""|pre-activation| beyond which the activation is within 1% of its range from a bound."""


def large_preactivations(ctx: Context, i: int) -> Cause | None:
    """Pre-activations whose typical size is beyond the activation's saturation point."""
    site = ctx.site(i)
    rms = ctx.site_stat("pre_rms")[:, i]
    rms = rms[np.isfinite(rms)]
    if not rms.size:
        return None
    typical = float(np.median(rms))
    edge = _SATURATES_AT.get(site.kind)
    if site.kind == "hardtanh" and site.bounds:
        edge = max(abs(site.bounds[0]), abs(site.bounds[1]))
    if edge is None or typical < edge:
        return None
    feed = f" from {ctx.label(site.layer)}" if site.layer is not None else ""
    return Cause("large_preactivations",
                 f"the pre-activations{feed} have RMS {fmt(typical)} (median over "
                 f"{rms.size} measurements; {fmt(float(rms[0]))} at the first), while "
                 f"{site.kind} is within 1% of its bounds beyond |x| = {fmt(edge)}")


def preactivation_offset(ctx: Context, i: int) -> Cause | None:
    """Pre-activations centred far from zero: most inputs sit on one side of the activation."""
    mean = ctx.site_stat("pre_mean")[:, i]
    std = ctx.site_stat("pre_std")[:, i]
    ok = np.isfinite(mean) & np.isfinite(std)
    if not ok.any():
        return None
    m, sd = float(np.median(mean[ok])), float(np.median(std[ok]))
    if abs(m) < max(sd, 1.0):
        return None
    site = ctx.site(i)
    return Cause("preactivation_offset",
                 f"the pre-activations of {ctx.site_name(i)} are centred at {fmt(m)} with a "
                 f"spread of only {fmt(sd)}: most inputs sit on the flat "
                 f"{'upper' if m > 0 else 'lower'} side of the {site.kind}")


def weights_grew(ctx: Context, layer: int | None) -> Cause | None:
    """The feeding layer's weight norm grew several-fold during the run."""
    if layer is None:
        return None
    w = ctx.detail("weight_norm")
    if w.shape[1] <= layer:
        return None
    col = w[:, layer]
    ok = np.isfinite(col) & (col > 0)
    if ok.sum() < 2:
        return None
    first, last = float(col[ok][0]), float(col[ok][-1])
    if last < 3 * first:
        return None
    return Cause("weights_grew",
                 f"the weights of {ctx.label(layer)} grew from norm {fmt(first)} to "
                 f"{fmt(last)} ({fmt(last / first)}x) during the run, scaling the "
                 f"pre-activations up with them")


def dead_units_block(ctx: Context, group: Group) -> tuple[Cause, str, str] | None:
    """A ReLU site inside the stack whose units are (nearly) all dead: no gradient passes it.

    Returns the cause, the site's name and a phrase saying how many of its units are dead.
    """
    for i in ctx.sites:
        site = ctx.site(i)
        units, dead = site.final.get("units"), site.final.get("dead_units", 0)
        if site.kind not in ("relu", "relu6") or not units or site.layer not in group.layers:
            continue
        if dead / units < ctx.t.dying_fraction_error:
            continue
        name = ctx.site_name(i)
        return (Cause("dead_units_block_gradient",
                      f"{dead} of {units} units at {name} (after {ctx.label(site.layer)}) "
                      f"output 0 for every sample: they pass no gradient back, so the "
                      f"layers before them get {'none' if dead == units else 'little'}"),
                name, f"{name}, where {'all ' if dead == units else ''}{dead} of {units} "
                f"units are dead")
    return None


def _span(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]}, {len(names)} layers"


# --- eval mode: no-grad forwards with mode-dependent layers in training mode ---------------
def _rates(rows: list[dict], key: str) -> str:
    values = sorted({r.get(key) for r in rows if r.get(key) is not None})
    if not values:
        return ""
    return f" ({key}={', '.join(fmt(v) for v in values[:4])})"


def _quoted(rows: list[dict]) -> str:
    """Module paths of layers without parameters, quoted: '3', 'encoder.dropout'."""
    return _span([f"'{r['name']}'" for r in rows])


def dropout_active_in_eval(ctx: Context, facts: dict) -> Cause | None:
    """Dropout layers in training mode during forwards without gradient."""
    rows = facts.get("dropout_layers") or []
    if not rows:
        return None
    measured = facts.get("measured") or {}
    rel = measured.get("output_rel_diff")
    tail = ""
    if isinstance(rel, float) and not math.isnan(rel):
        tail = (f"; the first one's output differs from the eval-mode output by "
                f"{fmt(100 * rel)}% of the latter's norm")
    n = facts["forwards"]
    return Cause("dropout_active_in_eval",
                 f"the Dropout layer{'s' if len(rows) > 1 else ''} {_quoted(rows)}"
                 f"{_rates(rows, 'p')} stayed in training mode during {n} forward"
                 f"{'s' if n > 1 else ''} without gradient: dropout zeroes a random fraction "
                 f"p of the units and scales the rest by 1/(1-p), so every evaluation runs "
                 f"another random sub-network{tail}")


def batchnorm_stats_updated_by_eval(ctx: Context, facts: dict) -> Cause | None:
    """BatchNorm layers normalised no-grad batches with their own statistics and updated
    their running statistics with them."""
    rows = facts.get("batchnorm_layers") or []
    if not rows:
        return None
    bn = facts.get("batchnorm") or {}
    change = bn.get("first_pass_change", bn.get("first_forward_change"))
    parts = []
    if isinstance(change, float) and not math.isnan(change):
        n = bn.get("first_pass_forwards")
        over = f" over the first pass of {n} forward{'s' if n != 1 else ''}" if n else ""
        parts.append(f"the running statistics changed by {fmt(100 * change)}%{over}")
    before, after = bn.get("num_batches_tracked_before"), bn.get("num_batches_tracked_after")
    if before is not None and after is not None:
        parts.append(f"num_batches_tracked went from {before} to {after}")
    share = eval_share(facts)
    if share is not None:
        parts.append(f"with momentum {fmt(bn.get('momentum'))}, after a pass of "
                     f"{facts['longest_pass']} batches {fmt(100 * share)}% of the running "
                     f"statistics come from these batches")
    measured = "; ".join(parts)
    one = len(rows) == 1
    return Cause("batchnorm_stats_updated_by_eval",
                 f"the BatchNorm layer{'' if one else 's'} {_quoted(rows)} stayed in training "
                 f"mode: {'it' if one else 'they'} normalised each of these batches with the "
                 f"batch's own mean and variance instead of the running statistics, and "
                 f"updated the running statistics with it"
                 + (f" ({measured})" if measured else "")
                 + "; eval mode, and the saved model, use those statistics")


def eval_share(facts: dict) -> float | None:
    """Fraction of the BatchNorm running statistics that the longest no-grad pass wrote."""
    bn = facts.get("batchnorm") or {}
    momentum, n = bn.get("momentum"), facts.get("longest_pass", 0)
    if not n:
        return None
    if momentum is None:  # cumulative average: each batch weighs 1 / num_batches_tracked
        after = bn.get("num_batches_tracked_after")
        return min(1.0, n / after) if after else None
    return 1.0 - (1.0 - float(momentum)) ** n


def training_mode_code_in_eval(ctx: Context, facts: dict) -> Cause | None:
    """The output depends on the mode through code that is not a Dropout/BatchNorm module."""
    rows = facts.get("other_layers") or []
    rel = (facts.get("measured") or {}).get("output_rel_diff")
    if facts.get("generic") and isinstance(rel, float):
        return Cause("training_mode_code_in_eval",
                     f"the model has no Dropout or BatchNorm module, yet its output in "
                     f"training mode differs from eval mode by {fmt(100 * rel)}%: code "
                     f"in its forward depends on self.training (F.dropout(x, p, "
                     f"training=self.training), a DropPath, a custom module)")
    if rows:
        return Cause("training_mode_code_in_eval",
                     f"{_quoted(rows)} ({', '.join(sorted({r['type'] for r in rows}))}) "
                     f"stayed in training mode, where it is random (RReLU samples its "
                     f"negative slope per element)")
    return None


def no_grad_forward_inside_training_step(ctx: Context, facts: dict) -> Cause | None:
    """The no-grad forwards come one at a time, in most training steps."""
    total = ctx.h.total_steps
    steps = facts.get("steps_with_forwards", 0)
    if facts.get("longest_pass") != 1 or total < 4 or \
            steps < ctx.t.eval_mode_in_step_fraction * total:
        return None
    return Cause("no_grad_forward_inside_training_step",
                 f"the no-grad forwards come one at a time, in {steps} of the {total} "
                 f"training steps: they run inside the training loop (a target or teacher "
                 f"network, a training-metric pass, or a validation after every update). If "
                 f"training-mode behaviour is intended there, this is by design; otherwise "
                 f"the same remedies apply")


# --------------------------------------------------------------------------- through time
def vanilla_rnn_long_sequence(ctx: Context, rnn: dict, length: int,
                              decay: float | None) -> Cause | None:
    """A plain nn.RNN: every step back multiplies the gradient by the recurrent Jacobian,
    with no additive path (an LSTM's cell, a GRU's update gate) around it."""
    if rnn.get("type") != "RNN":
        return None
    act = rnn.get("nonlinearity") or "tanh"
    slope = ("tanh's slope (at most 1, less where units saturate)" if act == "tanh" else
             "relu's slope (1 for active units, 0 for the others)")
    measured = (f"; measured x{fmt(decay)} per step over {length} timesteps" if decay else
                f" over {length} timesteps")
    return Cause("vanilla_rnn_long_sequence",
                 f"{_rnn_name(rnn)} is a plain nn.RNN ({act}): each timestep back multiplies "
                 f"the gradient by weight_hh transposed and {slope}, and there is no additive "
                 f"path around that product{measured}")


def recurrent_weights(ctx: Context, rnn: dict, direction: str) -> Cause | None:
    """A vanilla RNN's recurrent matrix at the first forward: spectral radius below 1
    (``direction="small"``: the linearised recurrence shrinks the gradient every step) or
    above 1 (``"large"``: it can grow it)."""
    if rnn.get("type") != "RNN":
        return None
    initial = rnn.get("initial") or {}
    radius = [r for r in initial.get("spectral_radius") or [] if r is not None]
    sigma = [s for s in initial.get("largest_singular_value") or [] if s is not None]
    if not radius:
        return None
    final = [r for r in (rnn.get("final") or {}).get("spectral_radius") or [] if r is not None]
    at_end = f"; {fmt(max(final))} at the end" if final else ""
    if direction == "small" and max(radius) < 1:
        r = max(radius)
        return Cause(f"recurrent_weights_{direction}",
                     f"weight_hh of {_rnn_name(rnn)} starts with spectral radius {fmt(r)} "
                     f"(largest singular value {fmt(max(sigma)) if sigma else 'n/a'}"
                     f"{at_end}): repeated multiplication by it shrinks a gradient about "
                     f"{fmt(r)}x per timestep even before the activation's slope; an "
                     f"orthogonal init has radius 1")
    if direction == "large" and max(radius) > 1:
        r = max(radius)
        relu = (" and relu passes the gradient of active units unchanged, so nothing damps "
                "it" if rnn.get("nonlinearity") == "relu" else "")
        return Cause(f"recurrent_weights_{direction}",
                     f"weight_hh of {_rnn_name(rnn)} starts with spectral radius {fmt(r)} "
                     f"(largest singular value {fmt(max(sigma)) if sigma else 'n/a'}"
                     f"{at_end}): repeated multiplication by it can grow a gradient up to "
                     f"{fmt(r)}x per timestep{relu}")
    return None


def gate_bias_low(ctx: Context, rnn: dict, length: int, memory: int | None) -> Cause | None:
    """The gate that decides how much old state an LSTM (forget gate) or GRU (update gate)
    keeps starts too low: below ``forget_bias_low`` (summed bias, mean over units), or too
    low for the sequence: the measured gradient reach (``memory`` timesteps) is shorter
    than the ``length`` of the sequence."""
    initial = rnn.get("initial") or {}
    gate, name = ("forget", initial.get("forget_gate_bias")) if rnn.get("type") == "LSTM" \
        else ("update", initial.get("update_gate_bias"))
    values = [b for b in name or [] if b is not None]
    if not values:
        return None
    b = min(values)
    low = b < ctx.t.forget_bias_low
    short = memory is not None and memory < length
    if not (low or short):
        return None
    keep = 100 / (1 + math.exp(-b))
    what = "the cell keeps" if gate == "forget" else "each step keeps"
    text = (f"the {gate} gates of {_rnn_name(rnn)} start with bias {fmt(b)} (bias_ih + "
            f"bias_hh, mean over units): sigmoid({fmt(b)}) = {fmt(keep)}%, so {what} about "
            f"{fmt(keep)}% of its state per timestep at the start and the gradient along it "
            f"decays as fast")
    if low:
        text += "; a bias of 1 keeps 73%"
    else:
        long_keep = 100 / (1 + 1 / max(length - 1, 1))
        text += (f"; that is too short a memory for {length} timesteps (the gradient falls "
                 f"below {fmt(ctx.t.through_time_vanishing_ratio)} of the last one's after "
                 f"~{memory}): a bias of log({length - 1}) keeps {fmt(long_keep)}%")
    return Cause("forget_gate_bias_low", text)


def _rnn_name(rnn: dict) -> str:
    return rnn.get("name") or rnn.get("type", "the recurrent module")
