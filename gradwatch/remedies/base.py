"""What every remedy is: one :class:`RemedyEntry` object, and the helpers remedies share.

A remedy says why it helps (``text``) and what to run (``code``), both filled with the
parameters a detector measured on the run; it changes a live model (``to_model``, before its
first forward) and optimizer (``to_optimizer``, before its first step) itself, appending one
sentence per change, or the whole script's process (``to_process``, before the script
starts: only a re-run can apply that); and it declares what ``--verify`` must know about it
(``loss_neutral``, ``hides``, ``diagnostic``, ``needs``). A remedy that cannot apply itself raises
:class:`NotApplicable` saying why and what to do instead.

Hooks a remedy registers go first among the model's forward pre-hooks (``prepend=True``),
so that gradwatch's own hooks see what the remedy changed (standardised inputs, eval-mode
layers). A caller that runs ``to_model`` from inside a forward pre-hook of that same call
runs the pre-hooks it added for that call with :func:`run_added_pre_hooks` (PyTorch fixed
the call's hook list before the caller's hook ran).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..findings import Remedy

__all__ = ["ACT_MODULES", "LAYERS_CODE", "MODE_DEPENDENT", "SWAPS", "WEIGHT_LAYERS",
           "Application", "NotApplicable", "ProcessChange", "RemedyEntry", "all_params",
           "check_optimizer", "fmt", "model_var", "number", "run_added_pre_hooks", "span",
           "submodule",
           "swap_optimizer"]

class ProcessChange:
    """What a ``to_process`` remedy changed in the script's process: what it did, said
    once the script has run (its changes happen while it runs), and how to undo it."""

    def changes(self) -> list[str]:
        """One sentence per change made so far; none: the remedy found nothing to change."""
        raise NotImplementedError

    def remove(self) -> None:
        """Undo the change (the script has ended)."""
        raise NotImplementedError


Params = dict[str, Any]
Template = Callable[[Params], str]
ModelFn = Callable[[nn.Module, Params, list[str]], None]
OptimizerFn = Callable[[torch.optim.Optimizer, "nn.Module | None", Params, list[str]], None]
ProcessFn = Callable[[Params], ProcessChange]


@dataclasses.dataclass(frozen=True)
class RemedyEntry:
    """One remedy: what it says, how it changes a live model and optimizer, and what it
    declares about itself.

    >>> entry = RemedyEntry("x", text=lambda p: f"set x to {p['x']}", code=lambda p: "x = 1")
    >>> entry.describe(x=1).text
    'set x to 1'
    """

    id: str
    text: Template
    """Why it helps, a sentence filled with the measured parameters."""
    code: Template
    """Code that runs as written once the user's names (``model``, ``optimizer``) exist."""
    to_model: ModelFn | None = None
    """Changes the live model in place before its first forward."""
    to_optimizer: OptimizerFn | None = None
    """Changes the live optimizer in place before its first step."""
    to_process: ProcessFn | None = None
    """Changes the script's whole process before it starts (a function mode around every
    torch call, a DataLoader option); only a re-run of the script can apply it."""
    needs_optimizer: bool = False
    """:func:`gradwatch.remedies.apply` refuses to run it without an optimizer."""
    after_first_step: bool = False
    """It replaces what an optimizer's step() runs (its class): inside a script, where the
    first step is already running when the optimizer is first seen, it takes effect from
    the second step on."""
    loss_neutral: bool = False
    """It fixes what the training loss does not show (an evaluation in training mode): a
    re-run in which its finding is gone counts as fixed whatever the loss did."""
    hides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Finding kind -> why a re-run with this remedy cannot show whether that finding is
    gone (the remedy removes what the detector measures)."""
    diagnostic: bool = False
    """It finds where values go bad rather than fixing them: its re-run is expected to stop
    with an error that names the operation."""
    applies: tuple[str, ...] | None = None
    """The parameters the change reads (None: all of them); the others say what was
    measured. Two candidates that differ only in those are one re-run's worth."""
    needs: str | None = None
    """Something only the user's code has (the training data): gradwatch never applies it,
    and this says what to do instead."""

    def describe(self, **params: Any) -> Remedy:
        """This remedy with its text and code filled from the measured ``params``."""
        return Remedy(self.id, self.text(params), self.code(params), params=dict(params))


WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                 nn.ConvTranspose2d, nn.ConvTranspose3d)
ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.PReLU: "prelu", nn.Mish: "mish",
    nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SELU: "selu",
    nn.Softplus: "softplus", nn.Hardtanh: "tanh", nn.Softsign: "tanh",
    nn.Hardsigmoid: "sigmoid", nn.RReLU: "leaky_relu", nn.CELU: "elu"}
MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm,
                  nn.modules.instancenorm._InstanceNorm, nn.RReLU)
SWAPS: weakref.WeakKeyDictionary[nn.Module, list[tuple[list[nn.Parameter],
                                                         list[nn.Parameter]]]] = \
    weakref.WeakKeyDictionary()
"""Per model: (old parameters, new parameters) of each module swap not yet given to an
optimizer; :func:`swap_optimizer` moves them."""
LAYERS_CODE = "(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)"
"""The weight layers, as remedy code names them."""


class NotApplicable(Exception):
    """A remedy that cannot apply itself to this model or optimizer; the message says why
    and what to do instead."""


@dataclasses.dataclass
class Application:
    """What applying one remedy changed: one sentence per change."""

    remedy: str
    changes: list[str]


def number(params: dict[str, Any], key: str, default: float | None = None) -> float:
    """A numeric parameter, also from the report's formatted strings ("0.25", "1.5e+03")."""
    value = params.get(key, default)
    if value is None:
        raise TypeError(f"remedy parameter {key!r} is required")
    if isinstance(value, bool):
        raise TypeError(f"remedy parameter {key!r} must be a number, not a bool")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise TypeError(f"remedy parameter {key!r} must be a number, got {value!r}") \
                from None
    raise TypeError(f"remedy parameter {key!r} must be a number, got {type(value).__name__}")


def fmt(x: float) -> str:
    return f"{x:.3g}"


def span(names: list[str]) -> str:
    """``a`` / ``a, b`` / ``a .. z`` for a list of module names."""
    if len(names) <= 2:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]}"


def submodule(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path``; also accepts a report name prefixed by the model's name."""
    if path in ("", None):
        return model
    candidates = [path]
    parts = path.split(".")
    candidates += [".".join(parts[i:]) for i in range(1, len(parts))]
    for candidate in candidates:
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    if len(parts) == 1:  # the report names a root layer by the model's variable name
        return model
    raise NotApplicable(f"the model has no submodule {path!r}; apply the remedy's code to "
                        "the layer by hand")


def all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    return optimizer


def run_added_pre_hooks(module: nn.Module, before: set[int], args: tuple[Any, ...],
                        kwargs: dict[str, Any] | None = None
                        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Run the forward pre-hooks registered on ``module`` since ``before`` (its hook ids
    then) on this call's ``args``: for a ``to_model`` run inside the call's own pre-hook,
    whose added hooks PyTorch only runs from the next call on."""
    kwargs = dict(kwargs or {})
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in before:
            continue
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def swap_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                    params: dict[str, Any], changes: list[str]) -> None:
    """Give the optimizer the parameters of modules ``to_model`` created, in place of the
    replaced ones (kept in the first group that held any of them)."""
    swaps = SWAPS.pop(model, []) if model is not None else []
    moved = 0
    for old, new in swaps:
        old_ids = {id(p) for p in old}
        have = {id(p) for p in all_params(optimizer)}
        target = None
        for group in optimizer.param_groups:
            if any(id(p) in old_ids for p in group["params"]):
                target = target if target is not None else group
                group["params"] = [p for p in group["params"] if id(p) not in old_ids]
        for p in old:
            optimizer.state.pop(p, None)
        if target is None and old:
            continue  # the optimizer never held the old parameters: not this model's
        fresh = [p for p in new if id(p) not in have]
        if target is None:
            target = optimizer.param_groups[0]
        target["params"].extend(fresh)
        moved += len(fresh)
    if moved:
        changes.append(f"gave {type(optimizer).__name__} the {moved} new parameter tensor(s) "
                       "of the swapped or inserted modules, in place of the replaced ones")


def model_var(p: dict[str, Any]) -> str:
    """The model's variable name in the user's code when known, else ``model``."""
    name = str(p.get("model", "model"))
    return name if name.isidentifier() else "model"
