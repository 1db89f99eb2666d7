"""Preflight: predict vanishing/exploding gradients, dead ReLUs and saturation before training.

``gradwatch.preflight(model, example_batch)`` runs ONE forward and ONE backward pass on the
model as it is now (at init) and measures, per layer with parameters (forward order): the
RMS of its output and the gain from layer to layer, the gradient norm of its parameters,
and the gradient norm at its output, so the backward gain through each layer is known.
Every ReLU / sigmoid / tanh call of the forward (modules and functional calls alike,
``nn.ReLU``, ``F.relu``, ``x.relu_()``...) is measured as an activation site: its dead
units and saturated outputs. From these it predicts ``vanishing_gradient``,
``exploding_gradient``, ``dying_relu``, ``saturated_activation`` (and ``nonfinite``), with
the init that would fix them, in the report contract of DESIGN.md (``run.mode`` is
``"preflight"``, ``run.steps`` 0, and ``preflight`` holds the per-layer and per-site tables).
Its limits are fields of :class:`~gradwatch.thresholds.Thresholds` (the training-time ones
where the meaning is the same, ``preflight_*`` for its own).

What runs, exactly:

* the model runs in the mode it is in (a fresh model is in training mode, which is what
  the first training step sees: Dropout active, BatchNorm on batch statistics);
* without ``loss_fn`` the backward pass starts from a random unit-variance gradient
  (``N(0, 1)``, fixed seed) on every floating output that requires grad, so the per-layer
  gains say what the architecture and init do to any gradient; with ``loss_fn``,
  ``example_batch`` is ``(inputs, target)`` and the gradient is that of
  ``loss_fn(output, target)``;
* gradients come from ``torch.autograd.grad``: no ``.grad`` of the model is written.

Nothing of the model changes: buffers (BatchNorm running statistics) are restored from a
copy, every module's training flag and every ``requires_grad`` flag are put back, the
torch (CPU and CUDA), Python and numpy random states are restored, and every hook is
removed, also when the forward raises. Parameters are never written; a forward that
modifies them in place is an error. Plain Python attributes a forward sets on modules
(caches) cannot be restored.

The package: :mod:`.batch` (arguments), :mod:`.measure` (the passes, on device),
:mod:`.preserve` (state given back), :mod:`.tables` (host tables), :mod:`.judge`,
:mod:`.flow` and :mod:`.units` (the predictions), :mod:`.report`, :mod:`.factory`
(``gradwatch check``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from ..thresholds import Thresholds, resolve_thresholds
from . import flow, units
from .batch import check_model, describe, split_batch, tensors
from .factory import load_factory, resolve_factory_result
from .judge import SEVERITY_RANK, Measured
from .measure import Probe, forward_backward, to_host
from .preserve import Preserved, random_state
from .report import PreflightReport, build_report
from .tables import layer_rows, site_rows

__all__ = ["PreflightReport", "load_factory", "preflight", "resolve_factory_result"]

def preflight(model: nn.Module, example_batch: Any,
              loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, *,
              thresholds: Thresholds | Mapping[str, float] | None = None,
              seed: int = 0) -> PreflightReport:
    """Predict, from one forward/backward at init, which layers' gradients will go wrong.

    ``example_batch`` is what the model is called with: a tensor (``model(x)``), a tuple or
    list (``model(*batch)``) or a dict (``model(**batch)``); with ``loss_fn`` it is
    ``(inputs, target)`` and the backward pass starts from ``loss_fn(output, target)``,
    without it from a random unit-variance gradient on the output (seed ``seed``). The
    model runs in the mode it is in and is left exactly as it was (see the module doc).

    >>> import torch
    >>> from torch import nn
    >>> layers = [m for _ in range(10) for m in (nn.Linear(10, 10), nn.Sigmoid())]
    >>> model = nn.Sequential(*layers, nn.Linear(10, 1))
    >>> report = preflight(model, torch.randn(64, 10))
    >>> "vanishing_gradient" in report.kinds()
    True
    """
    start = time.perf_counter()
    t = resolve_thresholds(None, thresholds)
    model = check_model(model)
    inputs, target = split_batch(example_batch, loss_fn)
    if torch.is_inference_mode_enabled():
        raise ValueError("preflight needs autograd: call it outside torch.inference_mode()")
    devices = sorted({x.device.index or 0 for x in [*model.parameters(), *tensors(inputs)]
                      if x.device.type == "cuda"})
    probe = Probe(model, t.saturation_margin)
    kept = Preserved(model)
    modes = {m.training for m in model.modules()}
    with ExitStack() as stack:
        stack.callback(kept.restore)  # runs last: after the hooks are gone
        stack.enter_context(random_state(devices, seed))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(probe.attached())
        raw = forward_backward(model, inputs, target, loss_fn, probe, seed)
    changed = kept.changed_in_place()
    if changed:
        raise RuntimeError(f"the model's forward (or loss_fn) modified parameters in place "
                           f"({', '.join(changed[:5])}); preflight cannot undo that and its "
                           f"measurements would not describe the model's init")
    probe.finish_names()
    graph = raw.pop("graph")
    host = to_host(raw)
    inp, out = host["input"], host["output"]
    numel = sum(out["numel"])
    out_rms = math.sqrt(sum(r ** 2 * n for r, n in zip(out["rms"], out["numel"], strict=True))
                        / numel) if numel else None
    m = Measured(t, layer_rows(probe, host["layers"], graph, inp),
                 site_rows(probe, host["sites"], t.preflight_dead_min_values), inp, out_rms,
                 int(sum(out["nonfinite"])), host["loss"], graph)
    exploding = flow.exploding(m)
    found = [f for f in (flow.nonfinite(m, exploding), exploding, flow.vanishing(m),
                         *units.dying(m), units.saturated(m)) if f]
    found.sort(key=lambda f: SEVERITY_RANK[f.severity])
    mode = "train" if modes == {True} else "eval" if modes == {False} else "mixed"
    batch = describe(inputs) + ("" if loss_fn is None else f", target {describe(target)}")
    return build_report(m, found, duration_s=time.perf_counter() - start, model_mode=mode,
                        seed=seed, batch=batch, with_loss=loss_fn is not None)
