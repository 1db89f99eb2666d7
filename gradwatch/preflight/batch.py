"""The model and example batch preflight is given: checked, described, and called."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

_ALLOWED = ("a tensor (model(x)), a tuple or list (model(*batch)) or a dict "
            "(model(**batch))")


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested tuple/list/dict, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors(v)


def first_float(obj: Any) -> torch.Tensor | None:
    """The first floating-point tensor in ``obj``, if any."""
    return next((t for t in tensors(obj) if t.is_floating_point()), None)


def check_model(model: Any) -> nn.Module:
    """The module to measure (a ``torch.compile`` wrapper's own module); clear errors else."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"preflight(model, example_batch) expects a torch.nn.Module as model, "
                        f"got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its module
    params = list(model.parameters())
    if not params:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters: there is no "
                         f"gradient to predict; pass the network whose weights will train")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
        raise ValueError("the model has uninitialised lazy parameters (nn.LazyLinear...): run "
                         "one forward pass before preflight so that they get their shapes")
    if not any(p.requires_grad for p in params):
        raise ValueError(f"all {len(params)} parameters of the model have requires_grad=False: "
                         f"nothing would train")
    return model


def split_batch(batch: Any, loss_fn: Callable[..., Any] | None) -> tuple[Any, Any]:
    """``(inputs, target)``; target is None without a loss function."""
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got "
                            f"{type(loss_fn).__name__}")
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"with loss_fn, example_batch must be a pair (inputs, target), got "
                            f"{describe(batch)}; inputs may be {_ALLOWED}")
        inputs, target = batch
    else:
        inputs, target = batch, None
    if not isinstance(inputs, (torch.Tensor, tuple, list, Mapping)) or \
            next(tensors(inputs), None) is None:
        raise TypeError(f"example_batch must hold at least one tensor: {_ALLOWED}; got "
                        f"{describe(inputs)}")
    for where, part in (("inputs", inputs), ("target", target)):
        for t in tensors(part):
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"the example batch's {where} hold {bad} non-finite value(s) "
                                 f"(NaN/Inf) in a tensor of shape {tuple(t.shape)}: preflight "
                                 f"needs finite data; fix the data pipeline first")
    return usable(inputs), usable(target)


def describe(obj: Any) -> str:
    """A short description of a batch for messages: ``tensor (32, 5) float32``."""
    if isinstance(obj, torch.Tensor):
        return f"tensor {tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, Mapping):
        return "dict(" + ", ".join(f"{k}={describe(v)}" for k, v in obj.items()) + ")"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}(" + ", ".join(describe(v) for v in obj) + ")"
    return type(obj).__name__


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*batch)`` or ``model(**batch)``, as the batch's type says."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def usable(obj: Any) -> Any:
    """Inference-mode tensors cannot be saved for backward: plain copies of them."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, Mapping):
        return {k: usable(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(usable(v) for v in obj) if isinstance(obj, list) else \
            tuple(usable(v) for v in obj)
    return obj
