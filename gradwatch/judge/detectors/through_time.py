"""vanishing_gradient / exploding_gradient *through time*, for nn.RNN, nn.LSTM and nn.GRU.

The measure (``measure/extensions/recurrent.py``): on detail steps, the L2 norm of the gradient of
the loss with respect to each timestep's input, at 16 evenly spaced timesteps that include
the first and the last. The ratio ``||dL/dx_0|| / ||dL/dx_{T-1}||`` says how much of the
gradient that reaches the last timestep survives the trip back to the first.

* Vanishing: the ratio below ``through_time_vanishing_ratio`` on ``persistence`` of the
  measured steps and still at the end of the run. The model cannot learn dependencies
  longer than the *effective memory*: the number of timesteps back from the last at which
  the gradient falls below that ratio. If the loss nevertheless fell well (to
  ``through_time_learning_loss`` of its start or less), the model learns from the
  timesteps the gradient does reach: the finding is info, not a problem (the task may not
  need longer memory: a healthy LSTM summing the last few inputs forgets on purpose).
* Exploding: the ratio above ``through_time_exploding_ratio`` on ``persistence`` of the
  measured steps, or on every finite measurement before the gradients turned non-finite.

With a loss on every timestep each input also gets its own direct gradient, so a ratio
near 1 does not prove that long-range gradients survive: it is never reported as healthy,
only not as vanishing. Bidirectional modules are measured but not judged.

Wired in by decorating the ``detect`` of ``vanishing.py`` and ``exploding.py`` with
:func:`also`, so that each kind stays one registry entry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ...findings import Cause, Finding, Remedy
from ..advice import clip_threshold, remedy
from ..context import Context, fmt
from ..timesteps import Measured, measurements

CAUSES = ("vanilla_rnn_long_sequence", "recurrent_weights_small", "recurrent_weights_large",
          "forget_gate_bias_low")
"""The ids of the causes this detector names besides the shared ones of ``causes.py``."""

__all__ = ["Measured", "also", "detect", "effective_memory", "measurements"]

VANISHING, EXPLODING = "vanishing_gradient", "exploding_gradient"


def detect(ctx: Context, kind: str) -> list[Finding]:
    """Through-time findings of ``kind`` (vanishing_gradient or exploding_gradient)."""
    judge = _vanishing if kind == VANISHING else _exploding
    findings = []
    for m in measurements(ctx):
        if m.rnn.get("bidirectional"):
            continue  # the reverse direction reaches the first timestep directly
        finding = judge(ctx, m)
        if finding is not None:
            findings.append(finding)
    return findings


def also(kind: str) -> Callable[[Callable[[Context], list[Finding]]],
                                Callable[[Context], list[Finding]]]:
    """Decorate a detector of ``kind`` so that it also returns the through-time findings."""

    def decorate(detector: Callable[[Context], list[Finding]]
                 ) -> Callable[[Context], list[Finding]]:
        @functools.wraps(detector)
        def wrapper(ctx: Context) -> list[Finding]:
            return [*detector(ctx), *detect(ctx, kind)]

        return wrapper

    return decorate


# --------------------------------------------------------------------------- judging
def _active(m: Measured, ctx: Context) -> np.ndarray:
    """Steps whose last-timestep gradient is finite, > 0 and not negligible against its
    run maximum (a settled model's tiny gradients say nothing about the path)."""
    last = m.last()
    ok = np.isfinite(last) & (last > 0) & ~np.isnan(m.profile[:, 0])
    # After the run blew up, saturated units give ratios of 0 that say nothing about the
    # path the gradient takes while training works: only steps before the first NaN/Inf.
    ev = ctx.h.events
    blown = [s for s in (ev.first_nonfinite_loss, ev.first_nonfinite_grad) if s is not None]
    if blown:
        ok &= m.steps < min(blown)
    if ok.any():
        ok &= last >= ctx.t.active_grad_fraction * float(np.max(last[ok]))
    return ok


def _evidence(ctx: Context, m: Measured, rows: np.ndarray, ratio: np.ndarray,
              limit: float) -> dict[str, Any]:
    median = float(np.median(ratio[rows]))
    evidence: dict[str, Any] = {
        "axis": "time",
        "module": m.name, "module_type": m.rnn["type"],
        "grad_norm_ratio_first_to_last_timestep": median,
        "grad_norm_ratio_at_first_step": float(ratio[rows][0]),
        "sequence_length": int(np.median(m.lengths[rows])),  # the most common, below
        "steps_checked": int(rows.sum()),
        "threshold": limit,
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        first_to_mean = m.profile[rows, 0] / m.mean[rows]
    if np.isfinite(first_to_mean).any():
        evidence["grad_norm_ratio_first_to_mean"] = float(np.nanmedian(first_to_mean))
    decay = m.decay(rows)
    if decay is not None:
        evidence["decay_per_timestep"] = decay
    prof = m.relative_profile(rows)
    if prof is not None:
        length, ts, rel = prof
        evidence["sequence_length"] = length
        lengths = m.lengths[rows]
        if lengths.min() != lengths.max():
            evidence["sequence_lengths"] = [int(lengths.min()), int(lengths.max())]
        sel = rows & (m.lengths == length)
        evidence["per_timestep_grad_norm"] = {
            int(t): float(v) for t, v in zip(ts, np.nanmedian(m.profile[sel, : len(ts)], axis=0),
                                             strict=True)}
        evidence["per_timestep_ratio_to_last"] = {int(t): float(v)
                                                  for t, v in zip(ts, rel, strict=True)}
    return evidence


def effective_memory(ts: np.ndarray, rel: np.ndarray, limit: float) -> int | None:
    """Timesteps back from the last at which the (median) gradient falls below ``limit`` of
    the last one's, interpolated in log scale between sampled timesteps; None if never."""
    below = np.nonzero(rel[:-1] < limit)[0]
    if not below.size or not np.isfinite(rel[below[-1]:]).all():
        return None
    j = int(below[-1])  # the latest sampled timestep below the limit
    hi = max(float(rel[j + 1]), limit)
    lo = max(float(rel[j]), 1e-300)
    frac = (math.log(hi) - math.log(limit)) / max(math.log(hi) - math.log(lo), 1e-12)
    return round(float(ts[-1] - ts[j + 1]) + frac * float(ts[j + 1] - ts[j]))


def _loss_fell(ctx: Context) -> tuple[float, float] | None:
    """(first, last) loss, medians of ``baseline_steps`` steps each (the best loss for a run
    that ended NaN/Inf), if the loss fell to at most ``through_time_learning_loss`` of its
    start; else None."""
    _, loss = ctx.finite_loss()
    n = ctx.t.baseline_steps
    if loss.size < 2 * n:
        return None
    first, last = float(np.median(loss[:n])), float(np.median(loss[-n:]))
    ev = ctx.h.events
    if ev.first_nonfinite_loss is not None or ev.first_nonfinite_grad is not None:
        # A run that learned and then blew up did learn: its best loss, not its last.
        last = float(np.min(loss))
    if first > 0 and 0 <= last <= ctx.t.through_time_learning_loss * first:
        return first, last
    return None


def _outgrown(ctx: Context, ratio: np.ndarray) -> tuple[float, float, float] | None:
    """(start, end, end / start) of the ratio when it rose ``through_time_outgrow``-fold over
    the run (medians of ``through_time_min_measurements`` measurements) to within that
    factor of the limit, while the loss fell (median of the last ``baseline_steps`` below
    the first's); else None. A ratio that rose 150x from 1e-8 is still far from carrying
    anything: the run is not outgrowing it."""
    k = ctx.t.through_time_min_measurements
    _, loss = ctx.finite_loss()
    n = ctx.t.baseline_steps
    if ratio.size < 2 * k or loss.size < 2 * n:
        return None
    start, end = float(np.median(ratio[:k])), float(np.median(ratio[-k:]))
    grow, limit = ctx.t.through_time_outgrow, ctx.t.through_time_vanishing_ratio
    if not (start > 0 and end >= grow * start and end >= limit / grow):
        return None
    if not float(np.median(loss[-n:])) < float(np.median(loss[:n])):
        return None
    return start, end, end / start


def _vanishing(ctx: Context, m: Measured) -> Finding | None:
    t = ctx.t
    rows = _active(m, ctx)
    ratio = m.ratio()
    n = int(rows.sum())
    if n < t.through_time_min_measurements:
        return None
    limit = t.through_time_vanishing_ratio
    below = ratio[rows] < limit
    tail = ratio[rows][-t.through_time_min_measurements:]
    if below.mean() < t.persistence or float(np.median(tail)) >= limit:
        return None
    evidence = _evidence(ctx, m, rows, ratio, limit)
    evidence["persistent_fraction"] = float(below.mean())
    median = evidence["grad_norm_ratio_first_to_last_timestep"]
    length = evidence["sequence_length"]
    decay = evidence.get("decay_per_timestep")
    prof = m.relative_profile(rows)
    memory = effective_memory(prof[1], prof[2], limit) if prof is not None else None
    if memory is None and decay is not None and 0 < decay < 1:
        memory = round(math.log(limit) / math.log(decay))
    if memory is not None:
        evidence["effective_memory_timesteps"] = memory
    fell = _loss_fell(ctx)
    _, loss = ctx.finite_loss()
    if loss.size:
        evidence.update(loss_first=float(loss[0]), loss_last=float(loss[-1]))
    grew = _outgrown(ctx, ratio[rows])
    if grew is not None:
        evidence["ratio_growth_over_run"] = grew[2]
    severity = "info" if fell or grew else \
        "error" if median < t.through_time_vanishing_ratio_error else "warning"
    per_step = f" (x{fmt(decay)} per step)" if decay is not None else ""
    gets = (f"gets {fmt(median)} of the last one's gradient" if median > 0 else
            "gets a gradient so small that it underflows to 0")
    reach = f"longer than ~{memory} steps" if memory is not None else "across the sequence"
    if fell:
        tail_text = (f": the model learns only from about the last {memory or 'few'} steps; "
                     f"the loss fell from {fmt(fell[0])} to {fmt(fell[1])}, so the task may "
                     f"not need a longer memory")
    elif grew:
        tail_text = (f"; the run is outgrowing it: the ratio rose {fmt(grew[2])}x, from "
                     f"{fmt(grew[0])} at the start to {fmt(grew[1])} at the end, while the loss "
                     f"fell: the model is learning to carry the gradient further back")
    else:
        tail_text = f", so the model cannot learn dependencies {reach}"
    summary = (f"{ctx.subject}Gradients vanish through time in {m.name}: the first of "
               f"{length} timesteps {gets}{per_step}{tail_text}.")
    rnn = m.rnn
    causes = [c for c in (vanilla_rnn_long_sequence(ctx, rnn, length, decay),
                          recurrent_weights(ctx, rnn, "small"),
                          gate_bias_low(ctx, rnn, length, memory)) if c]
    remedies = _remedies(ctx, m, causes, decay, length)
    k = np.nonzero(rows)[0]
    return Finding(VANISHING, severity, int(m.steps[k[0]]), int(m.steps[k[-1]]), [m.name],
                   summary, evidence, causes, remedies)


def _exploding(ctx: Context, m: Measured) -> Finding | None:
    t = ctx.t
    ratio = m.ratio()
    last = m.last()
    rows = np.isfinite(last) & (last > 0) & ~np.isnan(ratio)
    n = int(rows.sum())
    if n == 0:
        return None
    limit = t.through_time_exploding_ratio
    above = ratio[rows] > limit
    bad = ctx.h.events.first_nonfinite_grad
    # An explosion through time that ends the run in NaN/Inf leaves few finite measurements.
    ended = bad is not None and above.all() and int(m.steps[rows][-1]) < bad
    if not ended and (n < t.through_time_min_measurements or above.mean() < t.persistence):
        return None
    evidence = _evidence(ctx, m, rows, ratio, limit)
    evidence["persistent_fraction"] = float(above.mean())
    if bad is not None:
        evidence["first_nonfinite_grad_step"] = bad
    median = evidence["grad_norm_ratio_first_to_last_timestep"]
    length = evidence["sequence_length"]
    decay = evidence.get("decay_per_timestep")
    _, loss = ctx.finite_loss()
    if loss.size:
        evidence.update(loss_first=float(loss[0]), loss_last=float(loss[-1]),
                        loss_max=float(loss.max()))
    severity = "error" if median >= limit * t.exploding_error_factor or bad is not None \
        else "warning"
    per_step = f" (x{fmt(decay)} per step)" if decay is not None else ""
    tail_text = (f"; the gradients turned NaN/Inf at step {bad}" if bad is not None else
                 "; the longer the sequence, the larger and less stable each update")
    summary = (f"{ctx.subject}Gradients explode through time in {m.name}: the first of "
               f"{length} timesteps gets {fmt(median)}x the last one's gradient{per_step}"
               f"{tail_text}.")
    causes = [c for c in (recurrent_weights(ctx, m.rnn, "large"),) if c]
    remedies = _remedies(ctx, m, causes, decay, length)
    threshold = clip_threshold(ctx)
    if threshold:
        remedies.append(remedy("clip_grad_norm", max_norm=threshold))
    k = np.nonzero(rows)[0]
    return Finding(EXPLODING, severity, int(m.steps[k[0]]), int(m.steps[k[-1]]), [m.name],
                   summary, evidence, causes, remedies)


def _remedies(ctx: Context, m: Measured, causes: list[Any], decay: float | None,
              length: int) -> list[Remedy]:
    """Recurrent remedies that fit the causes found, with this module's numbers: a gated
    module for a plain RNN, then the init of the recurrent weights or of the gate biases."""
    ids = {c.id for c in causes}
    rnn = m.rnn
    path = rnn["name"]
    out: list[Remedy] = []
    initial = rnn.get("initial") or {}
    if rnn["type"] == "RNN" and "recurrent_weights_large" not in ids:
        out.append(remedy("use_lstm_gru", module=path,
                          decay=fmt(decay) if decay is not None else "n/a",
                          length=length))
    if "recurrent_weights_small" in ids or "recurrent_weights_large" in ids:
        radius = (initial.get("spectral_radius") or [None])[0]
        out.append(remedy("orthogonal_recurrent_init", module=path,
                          radius=fmt(radius) if radius is not None else "n/a"))
    if rnn["type"] == "RNN" and "recurrent_weights_large" in ids:
        out.append(remedy("use_lstm_gru", module=path,
                          decay=fmt(decay) if decay is not None else "n/a",
                          length=length))
    if "forget_gate_bias_low" in ids:
        gate = initial.get("forget_gate_bias") or initial.get("update_gate_bias") or [0.0]
        bias = float(np.min(gate))
        if bias < 1:
            out.append(remedy("forget_gate_bias", module=path, bias=fmt(bias),
                              gate="forget" if rnn["type"] == "LSTM" else "update"))
        if rnn["type"] == "LSTM":
            out.append(remedy("chrono_init", module=path, length=length))
    return out


# ------------------------------------------------------------ this kind's causes
def _rnn_name(rnn: dict) -> str:
    return rnn.get("name") or rnn.get("type", "the recurrent module")


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
