"""Remedies that change the activation function: ReLU (or sigmoid/tanh) -> LeakyReLU."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..measure.extensions.activations import ActivationMode
from .base import NotApplicable, RemedyEntry, fmt, number, span

__all__ = ["ENTRIES"]


class _LeakyMode(ActivationMode):
    """Turns functional ReLU calls (``F.relu``, ``torch.relu``, ``x.relu_()``...) into
    ``leaky_relu`` with the same slope as the swapped modules."""

    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = slope

    def activation(self, func: Any, kind: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        if kind != "relu" or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        inplace = bool(kwargs.get("inplace", args[1] if len(args) > 1 else False)) or \
            getattr(func, "__name__", "").endswith("_")
        return F.leaky_relu(args[0], self.slope, inplace=inplace)


class _LeakyForward:
    """The model's ``forward``, run inside :class:`_LeakyMode`.

    Set as the instance's ``forward`` (not a pre-hook), so the mode is entered after every
    forward pre-hook: innermost, gradwatch's own activation mode then sees ``leaky_relu``
    rather than a ReLU. Holds the module itself, so a deep copy of the model gets its own;
    ``del model.forward`` removes it."""

    def __init__(self, module: nn.Module, slope: float) -> None:
        self.module, self.slope = module, slope

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _LeakyMode(self.slope):
            return type(self.module).forward(self.module, *args, **kwargs)


def _leaky_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    slope = number(params, "slope", 0.01)
    old = str(params.get("old", "(nn.ReLU, nn.ReLU6)"))
    kinds: tuple[type, ...] = (nn.ReLU, nn.ReLU6)
    if "Sigmoid" in old or "Tanh" in old:
        kinds = (nn.Sigmoid, nn.Tanh) + (kinds if "ReLU" in old else ())
    leaves = [n for n, m in model.named_modules() if not list(m.children())]
    last = leaves[-1] if leaves else None
    swapped: dict[str, list[str]] = {}
    kept: list[str] = []

    def swap(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            path = f"{prefix}{name}"
            if type(child) in kinds:
                if path == last and isinstance(child, (nn.Sigmoid, nn.Tanh)):
                    kept.append(path)  # the model's output activation: its range matters
                    continue
                setattr(module, name, nn.LeakyReLU(slope, inplace=getattr(child, "inplace",
                                                                          False)))
                swapped.setdefault(type(child).__name__, []).append(path)
            else:
                swap(child, path + ".")

    if type(model) in kinds:
        raise NotApplicable("the model is itself an activation module; build it with "
                            "nn.LeakyReLU")
    swap(model, "")
    for kind, names in swapped.items():
        changes.append(f"replaced {len(names)} nn.{kind} ({span(names)}) by "
                       f"nn.LeakyReLU({fmt(slope)})")
    if kept:
        changes.append(f"kept the output activation {kept[0]}: its range is the model's "
                       "output")
    if "ReLU" in old or not swapped:
        current = model.__dict__.get("forward")
        if isinstance(current, _LeakyForward):
            current.slope = slope
        elif current is not None:
            raise NotApplicable("the model's forward is already replaced on the instance; "
                                "use F.leaky_relu in its code instead of F.relu")
        else:
            model.forward = _LeakyForward(model, slope)  # type: ignore[method-assign]
            changes.append(f"functional ReLU calls in {type(model).__name__}.forward "
                           f"(F.relu, torch.relu, x.relu()) now run as "
                           f"F.leaky_relu(x, {fmt(slope)}) (remove: del model.forward)")
    if not changes:
        raise NotApplicable("no activation module of the kinds " + old + " to replace")


def _swap_code(p: dict[str, Any]) -> str:
    old = p.get("old", "nn.Sigmoid")
    return ("def swap_activations(module):\n"
            "    for name, child in module.named_children():\n"
            f"        if isinstance(child, {old}):\n"
            "            setattr(module, name, nn.LeakyReLU(0.01))\n"
            "        else:\n"
            "            swap_activations(child)\n"
            "swap_activations(model)  # functional calls: use F.leaky_relu(x, 0.01)\n"
            "# then re-initialise with Kaiming (nonlinearity=\"leaky_relu\")")


def _drop_output(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    path = str(params.get("module") or "")
    names = path.split(".")
    try:
        parent = model.get_submodule(".".join(names[:-1])) if len(names) > 1 else model
        old = getattr(parent, names[-1])
    except AttributeError:
        old = None
    if not path or not isinstance(old, _SATURATING):
        raise NotApplicable(f"the output activation is no module gradwatch can reach "
                            f"({path or 'a functional call'}); remove it in the model's code")
    setattr(parent, names[-1], nn.Identity())
    changes.append(f"replaced the output activation {path} ({type(old).__name__}) with "
                   "nn.Identity: the model's output is no longer bounded")


_SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Hardsigmoid)

ENTRIES = [
    RemedyEntry(
        "drop_output_activation",
        lambda p: (f"remove the {p.get('activation', 'sigmoid')} at the model's output "
                   f"({p.get('module') or 'its last operation'}): its outputs sit at its bounds, "
                   "where targets outside its range push them (standardised targets under a "
                   "[0, 1] output); predict the targets unbounded, or keep them in its range, "
                   "or use a loss on the logits (BCEWithLogitsLoss)"),
        lambda p: (f"# best in the model's definition: drop the last "
                   f"{p.get('activation', 'sigmoid')}; on a built model:\n"
                   f"parent, _, name = {str(p.get('module') or 'output_activation')!r}"
                   ".rpartition('.')\n"
                   "setattr(model.get_submodule(parent), name, nn.Identity())"),
        to_model=_drop_output),
    RemedyEntry(
        "leaky_relu",
        lambda p: (f"replace ReLU with LeakyReLU (or PReLU/ELU) throughout the model (the dead "
                   f"units are at {p['site']}): a unit pushed below zero keeps a slope of 0.01, "
                   "still gets gradient and can recover"
                   if p.get("site") else
                   "replace saturating activations with LeakyReLU: its derivative is 1 for "
                   "positive inputs and 0.01 (never 0) for negative ones"),
        _swap_code,
        to_model=_leaky_model,
        hides={"dying_relu": "whether the units still sit below zero is not measured once "
                             "they are LeakyReLUs (finding_gone: unknown)"}),
]
