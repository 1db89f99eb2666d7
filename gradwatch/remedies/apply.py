"""Remedies that apply themselves to a live model and optimizer, before the first step.

Each catalogue remedy has an :class:`Applier`: ``to_model`` changes the model in place
(re-initialisation, module swaps, hooks that stay on the model), ``to_optimizer`` changes
the optimizer (learning rate, step pre-hooks, parameters after a module swap). Both append
one human sentence per change. A remedy that cannot apply itself here raises
:class:`NotApplicable` saying why and what to do instead. ``gradwatch run --verify`` calls
``to_model`` when the script's model first runs and ``to_optimizer`` at its optimizer's
first step; :func:`apply` does both at once for library use.

Hooks are registered first among the model's forward pre-hooks (``prepend=True``) so that
gradwatch's own hooks see what the remedy changed (standardised inputs, eval-mode layers).
A caller that runs ``to_model`` from inside a forward pre-hook of that same call runs the
pre-hooks it added for that call with :func:`run_added_pre_hooks` (PyTorch fixed the call's
hook list before the caller's hook ran).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..measure.extensions.activations import ActivationMode
from ..measure.structure import recommended_init
from .catalogue import CATALOGUE

__all__ = ["APPLIERS", "Application", "Applier", "NotApplicable", "apply",
           "following_activations", "run_added_pre_hooks"]

ModelFn = Callable[[nn.Module, dict[str, Any], list[str]], None]
OptimizerFn = Callable[[torch.optim.Optimizer, "nn.Module | None", dict[str, Any], list[str]],
                       None]


class NotApplicable(Exception):
    """A remedy that cannot apply itself to this model or optimizer; the message says why
    and what to do instead."""


@dataclasses.dataclass(frozen=True)
class Applier:
    """How one catalogue remedy changes a live model (``to_model``) and optimizer
    (``to_optimizer``); ``needs_optimizer``: :func:`apply` refuses to run without one."""

    id: str
    to_model: ModelFn | None
    to_optimizer: OptimizerFn | None
    needs_optimizer: bool = False
    #: The change replaces what an optimizer's step() runs (its class): inside a script,
    #: where the first step is already running when the optimizer is first seen, it takes
    #: effect from the second step on.
    after_first_step: bool = False


@dataclasses.dataclass
class Application:
    """What applying one remedy changed: one sentence per change."""

    remedy: str
    changes: list[str]


# ----------------------------------------------------------------------------- helpers
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                  nn.ConvTranspose2d, nn.ConvTranspose3d)
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.PReLU: "prelu", nn.Mish: "mish",
    nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SELU: "selu",
    nn.Softplus: "softplus", nn.Hardtanh: "tanh", nn.Softsign: "tanh",
    nn.Hardsigmoid: "sigmoid", nn.RReLU: "leaky_relu", nn.CELU: "elu"}
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm,
                   nn.modules.instancenorm._InstanceNorm, nn.RReLU)
_SWAPS: weakref.WeakKeyDictionary[nn.Module, list[tuple[list[nn.Parameter],
                                                          list[nn.Parameter]]]] = \
    weakref.WeakKeyDictionary()
"""Per model: (old parameters, new parameters) of each module swap not yet given to an
optimizer; ``to_optimizer`` moves them."""


def _number(params: dict[str, Any], key: str, default: float | None = None) -> float:
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


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _span(names: list[str]) -> str:
    """``a`` / ``a, b`` / ``a .. z`` for a list of module names."""
    if len(names) <= 2:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]}"


def _submodule(model: nn.Module, path: str) -> nn.Module:
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


def _all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
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


# --------------------------------------------------------------------- initialisation
def following_activations(model: nn.Module, activations: dict[str, str] | None = None,
                          default: str | None = None) -> dict[str, str]:
    """The activation that follows each weight layer, by name, read without running the model.

    ``activations`` (from a report's ``facts.layers[name].activation``, measured on the
    autograd graph, which also sees functional calls) wins. Otherwise module order: the
    first activation module after a layer and before the next weight layer; ``"none"`` when
    another weight layer (or the end) comes first. A model without any activation module
    calls its activations functionally: every layer but the last gets ``default``.
    """
    activations = dict(activations or {})
    layers: list[str] = []
    found: dict[str, str] = {}
    pending: str | None = None
    any_module = False
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHT_LAYERS):
            layers.append(name)
            pending = name
        elif type(m) in _ACT_MODULES or isinstance(m, tuple(_ACT_MODULES)):
            any_module = True
            if pending is not None:
                kind = next(v for k, v in _ACT_MODULES.items() if isinstance(m, k))
                found[pending] = kind
                pending = None
    out: dict[str, str] = {}
    for i, name in enumerate(layers):
        measured = activations.get(name) or next(
            (v for k, v in activations.items() if k.endswith("." + name)), None)
        if measured and measured != "unknown":
            out[name] = measured
        elif name in found:
            out[name] = found[name]
        elif any_module or default is None or i == len(layers) - 1:
            out[name] = "none"
        else:
            out[name] = default
    return out


def _reinit(model: nn.Module, params: dict[str, Any], changes: list[str], family: str) -> None:
    """Kaiming for ReLU-family activations, Xavier for the others, per following activation;
    layers followed by no activation get the remedy's own family with gain 1."""
    default = params.get("nonlinearity")
    if default is not None and not isinstance(default, str):
        raise TypeError("remedy parameter 'nonlinearity' must be a string")
    acts_param = params.get("activations")
    if acts_param is not None and not isinstance(acts_param, dict):
        raise TypeError("remedy parameter 'activations' must be a dict {layer name: "
                        "activation}")
    acts = following_activations(model, acts_param, default)
    if not acts:
        raise NotApplicable("the model has no Linear or convolution layer to re-initialise; "
                            "re-initialise its weight tensors by hand with the remedy's code")
    groups: dict[tuple[str, str], list[str]] = {}
    with torch.no_grad():
        for name, act in acts.items():
            m = model.get_submodule(name)
            fam = recommended_init(act) if act not in ("none", None) else family
            if act in ("relu", "gelu", "silu", "elu", "mish", "hardswish"):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif act in ("leaky_relu", "prelu"):
                slope = 0.25 if act == "prelu" else 0.01
                nn.init.kaiming_normal_(m.weight, a=slope, nonlinearity="leaky_relu")
            elif fam == "kaiming":  # a linear output: std 1 / sqrt(fan_in)
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            else:
                gain_name = act if act in ("sigmoid", "tanh", "selu") else "linear"
                nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain(gain_name))
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            label = "Kaiming normal" if fam == "kaiming" else "Xavier normal"
            groups.setdefault((label, act), []).append(name)
    for (label, act), names in groups.items():
        kinds = {type(model.get_submodule(n)).__name__ for n in names}
        what = "a linear output (gain 1)" if act == "none" else act
        changes.append(f"re-initialised {_span(names)} ({len(names)} "
                       f"{'/'.join(sorted(kinds))}) with {label} for {what}, biases zero")


def _kaiming_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    _reinit(model, params, changes, "kaiming")


def _xavier_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    _reinit(model, params, changes, "xavier")


# ------------------------------------------------------------------------- activations
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
    slope = _number(params, "slope", 0.01)
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
        changes.append(f"replaced {len(names)} nn.{kind} ({_span(names)}) by "
                       f"nn.LeakyReLU({_fmt(slope)})")
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
                           f"F.leaky_relu(x, {_fmt(slope)}) (remove: del model.forward)")
    if not changes:
        raise NotApplicable("no activation module of the kinds " + old + " to replace")


# ------------------------------------------------------------------------------ biases
def _bias_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    layers = params.get("layers") or [params.get("layer")]
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise TypeError("remedy parameter 'layer' (the layer's path) must be a string, or "
                        "'layers' a list of them")
    value = _number(params, "value", 0.01)
    biases = []
    for layer in layers:
        bias = getattr(_submodule(model, layer), "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise NotApplicable(f"{layer} has no bias to re-initialise; revive its units "
                                "with LeakyReLU instead")
        biases.append((layer, bias))
    for layer, bias in biases:
        with torch.no_grad():
            before = float(bias.mean())
            bias.fill_(value)
        changes.append(f"set the bias of {layer} ({bias.numel()} units, mean {_fmt(before)}) "
                       f"to {_fmt(value)}")


# ------------------------------------------------------------------------- optimizer
def _clip_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                    params: dict[str, Any], changes: list[str]) -> None:
    max_norm = _number(params, "max_norm")
    if not max_norm > 0 or not math.isfinite(max_norm):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")

    def clip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p for p in _all_params(opt) if p.grad is not None]
        if grads:
            torch.nn.utils.clip_grad_norm_(grads, max_norm)

    optimizer.register_step_pre_hook(clip)
    changes.append(f"clip the total gradient norm of {type(optimizer).__name__}'s "
                   f"{len(_all_params(optimizer))} parameters at {_fmt(max_norm)} before "
                   "each step")


def _schedulers(optimizer: torch.optim.Optimizer) -> list[Any]:
    """Learning-rate schedulers attached to ``optimizer`` (found through the objects that
    refer to it: the optimizer does not know its schedulers)."""
    from torch.optim.lr_scheduler import LRScheduler

    found: list[Any] = []
    for ref in gc.get_referrers(optimizer):
        owners = [ref] if isinstance(ref, LRScheduler) else \
            [o for o in gc.get_referrers(ref) if isinstance(o, LRScheduler)] \
            if isinstance(ref, dict) else []
        for owner in owners:
            if getattr(owner, "optimizer", None) is optimizer and \
                    all(owner is not f for f in found):
                found.append(owner)
    return found


def _lr_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                  params: dict[str, Any], changes: list[str]) -> None:
    factor = _number(params, "factor")
    if not 0 < factor < math.inf:
        raise ValueError(f"factor must be a positive number, got {factor}")
    old = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    new = [group["lr"] for group in optimizer.param_groups]
    if isinstance(optimizer.defaults.get("lr"), (int, float)):
        optimizer.defaults["lr"] *= factor
    said = (f"{_fmt(old[0])} -> {_fmt(new[0])}" if len(set(old)) == 1 else
            ", ".join(f"{_fmt(a)} -> {_fmt(b)}" for a, b in zip(old, new, strict=True)))
    changes.append(f"scaled the learning rate of {len(old)} param group(s) by {_fmt(factor)}: "
                   f"{said}")
    for sched in _schedulers(optimizer):
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [b * factor for b in sched.base_lrs]
            changes.append(f"scaled the base rates of the {type(sched).__name__} schedule "
                           f"by {_fmt(factor)}")


def _adam_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                    params: dict[str, Any], changes: list[str]) -> None:
    adaptive = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                torch.optim.RAdam, torch.optim.Adagrad, torch.optim.Adadelta,
                torch.optim.RMSprop)
    if isinstance(optimizer, adaptive):
        raise NotApplicable(f"the optimizer is already adaptive ({type(optimizer).__name__})")
    if type(optimizer) is not torch.optim.SGD:
        raise NotApplicable(f"only an SGD optimizer is turned into Adam in place, not "
                            f"{type(optimizer).__name__}; create torch.optim.Adam instead")
    lr = _number(params, "lr", 1e-3)
    old = optimizer.param_groups[0]["lr"]
    # Building one Adam installs the step wrapper that runs step hooks on the class.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    defaults = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                    maximize=False, foreach=None, capturable=False, differentiable=False,
                    fused=None, decoupled_weight_decay=False)
    for group in optimizer.param_groups:
        for key in ("momentum", "dampening", "nesterov"):
            group.pop(key, None)
        decay = group.get("weight_decay", 0.0)
        group.update({k: v for k, v in defaults.items() if k != "weight_decay"})
        group["weight_decay"] = decay
        if "initial_lr" in group:
            group["initial_lr"] = lr
    optimizer.defaults = dict(defaults)
    optimizer.state.clear()  # SGD's momentum buffers mean nothing to Adam
    optimizer.__class__ = torch.optim.Adam
    changes.append(f"turned the SGD optimizer (lr {_fmt(old)}) into torch.optim.Adam with lr "
                   f"{_fmt(lr)} in place: same object and param groups, momentum discarded")


def _guard_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                     params: dict[str, Any], changes: list[str]) -> None:
    def guard(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for p in _all_params(opt) if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if not bool(finite):
            for p in _all_params(opt):
                p.grad = None  # every optimizer skips a parameter without a gradient

    optimizer.register_step_pre_hook(guard)
    changes.append(f"skip {type(optimizer).__name__}.step() when any gradient is not finite "
                   "(the step's gradients are dropped: no update, no momentum or Adam state "
                   "change)")


# ------------------------------------------------------------------------- forward hooks
def _standardize_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    mean, std = _number(params, "mean"), _number(params, "std")
    if not std > 0 or not math.isfinite(std) or not math.isfinite(mean):
        raise NotApplicable(f"the measured input std ({params.get('std')}) cannot scale the "
                            "inputs; standardise them in the data pipeline")

    def standardize(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return ((args[0] - mean) / std, *args[1:])
        return None

    model.register_forward_pre_hook(standardize, prepend=True)
    changes.append(f"standardise the model's first input before each forward: "
                   f"x -> (x - {_fmt(mean)}) / {_fmt(std)}")


class _EvalForNoGrad:
    """Forward pre/post hooks: mode-dependent layers in eval mode for no-grad forwards."""

    def __init__(self) -> None:
        self.switched: list[list[nn.Module]] = []

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            return
        layers = [m for m in module.modules() if isinstance(m, _MODE_DEPENDENT) and m.training]
        for m in layers:
            m.training = False
        self.switched.append(layers)

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled() and not self.switched:
            return
        if self.switched:
            for m in self.switched.pop():
                m.training = True


def _eval_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    layers = [n for n, m in model.named_modules() if isinstance(m, _MODE_DEPENDENT)]
    if not layers:
        raise NotApplicable("the model has no Dropout or BatchNorm layer; custom "
                            "self.training logic needs model.eval() in the script")
    hooks = _EvalForNoGrad()
    model.register_forward_pre_hook(hooks.pre, prepend=True)
    model.register_forward_hook(hooks.post, always_call=True)
    changes.append(f"forwards without gradients (torch.no_grad, inference_mode) run "
                   f"{len(layers)} mode-dependent layer(s) ({_span(layers)}) in eval mode, "
                   "restored afterwards")


def _assert_inputs_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                bad = int((~torch.isfinite(a)).sum())
                if bad:
                    raise ValueError(f"non-finite input batch: argument {i} of "
                                     f"{type(module).__name__} has {bad} NaN/Inf value(s) "
                                     f"of {a.numel()}; fix the data pipeline")

    model.register_forward_pre_hook(check, prepend=True)
    changes.append("check every floating-point input of the model before its forward; a "
                   "non-finite batch raises ValueError")


def _anomaly_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    torch.autograd.set_detect_anomaly(True)
    changes.append("turned on torch.autograd anomaly detection for this process (slow: the "
                   "backward that first makes NaN/Inf raises with the forward's traceback); "
                   "torch.autograd.set_detect_anomaly(False) turns it off")


# ------------------------------------------------------------------------- recurrent
class _LSTMAsRNN(nn.LSTM):
    """An LSTM with an ``nn.RNN``'s interface: ``hx`` is ``h_0`` only (``c_0`` zero) and
    it returns ``(output, h_n)``, so it drops into a forward written for an RNN."""

    def forward(self, input: Any, hx: Any = None) -> Any:  # type: ignore[override]
        if isinstance(hx, torch.Tensor):
            hx = (hx, torch.zeros_like(hx) if self.proj_size == 0 else
                  hx.new_zeros(*hx.shape[:-1], self.hidden_size))
        output, (h_n, _) = super().forward(input, hx)
        return output, h_n


def _chrono(lstm: nn.LSTM, length: float) -> None:
    h = lstm.hidden_size
    with torch.no_grad():
        for name, b in lstm.named_parameters():
            if name.startswith("bias_ih"):  # gates: input, forget, cell, output
                forget = torch.log(torch.empty(h).uniform_(1, max(length - 1, 2)))
                b[h: 2 * h] = forget
                b[:h] = -forget
            elif name.startswith("bias_hh"):
                b[: 2 * h] = 0.0


def _recurrent(model: nn.Module, params: dict[str, Any], kinds: tuple[type, ...]
               ) -> list[tuple[str, nn.Module]]:
    """The recurrent modules the remedy names (``module``), else all of the given kinds."""
    path = params.get("module")
    if path is not None and not isinstance(path, str):
        raise TypeError("remedy parameter 'module' must be a string (the module's path)")
    if path is not None:
        m = _submodule(model, path)
        return [(path, m)] if isinstance(m, kinds) else []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _lstm_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    length = _number(params, "length", 100)
    if type(model) is nn.RNN:
        raise NotApplicable("the model is the nn.RNN itself and cannot be replaced in place; "
                            "build an nn.LSTM (the remedy's code) and re-create the optimizer")
    found = [(n, m) for n, m in _recurrent(model, params, (nn.RNN,)) if type(m) is nn.RNN]
    if not found:
        raise NotApplicable(f"no nn.RNN at {params.get('module', 'any path')!r} to replace")
    swaps = _SWAPS.setdefault(model, [])
    for path, rnn in found:
        if rnn.proj_size if hasattr(rnn, "proj_size") else 0:
            raise NotApplicable(f"{path} uses a projection; replace it by hand")
        p0 = next(rnn.parameters())
        lstm = _LSTMAsRNN(rnn.input_size, rnn.hidden_size, rnn.num_layers, bias=rnn.bias,
                          batch_first=rnn.batch_first, dropout=rnn.dropout,
                          bidirectional=rnn.bidirectional, device=p0.device, dtype=p0.dtype)
        lstm.train(rnn.training)
        if rnn.bias:
            _chrono(lstm, length)
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, lstm)
        swaps.append((list(rnn.parameters()), list(lstm.parameters())))
        changes.append(f"replaced nn.RNN {path} ({rnn.input_size} -> {rnn.hidden_size}, "
                       f"{rnn.num_layers} layer(s)) by an nn.LSTM with the RNN's interface "
                       f"(returns output, h_n), forget gates chrono-initialised for "
                       f"{int(length)} steps")


def _swap_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module | None,
                    params: dict[str, Any], changes: list[str]) -> None:
    """Give the optimizer the parameters of modules ``to_model`` created, in place of the
    replaced ones (kept in the first group that held any of them)."""
    swaps = _SWAPS.pop(model, []) if model is not None else []
    moved = 0
    for old, new in swaps:
        old_ids = {id(p) for p in old}
        have = {id(p) for p in _all_params(optimizer)}
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


def _forget_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    found = _recurrent(model, params, (nn.LSTM, nn.GRU))
    if not found:
        raise NotApplicable("no nn.LSTM or nn.GRU to set the forget-gate bias of; for a plain "
                            "nn.RNN apply use_lstm_gru")
    for path, rnn in found:
        if not rnn.bias:
            raise NotApplicable(f"{path} has no biases (bias=False)")
        with torch.no_grad():
            for name, p in rnn.named_parameters():
                if name.startswith("bias_"):
                    h = p.shape[0] // (4 if isinstance(rnn, nn.LSTM) else 3)
                    p[h: 2 * h] = 1.0 if name.startswith("bias_ih") else 0.0
        gate = "forget" if isinstance(rnn, nn.LSTM) else "update"
        changes.append(f"set the {gate}-gate bias of {path} to 1 (sum of bias_ih and bias_hh)")


def _chrono_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    length = _number(params, "length", 100)
    found = [(n, m) for n, m in _recurrent(model, params, (nn.LSTM,)) if m.bias]
    if not found:
        raise NotApplicable("chrono init needs an nn.LSTM with biases; for a GRU apply "
                            "forget_gate_bias, for a plain nn.RNN use_lstm_gru")
    for path, lstm in found:
        _chrono(lstm, length)
        changes.append(f"chrono-initialised the gates of {path} for dependencies up to "
                       f"{int(length)} steps")


def _orthogonal_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    found = _recurrent(model, params, (nn.RNNBase,))
    if not found:
        raise NotApplicable("no recurrent module (nn.RNN, nn.LSTM, nn.GRU) to initialise")
    with torch.no_grad():
        for path, rnn in found:
            n = 0
            for name, p in rnn.named_parameters():
                if name.startswith("weight_hh"):
                    for k in range(0, p.shape[0], p.shape[1]):
                        nn.init.orthogonal_(p[k: k + p.shape[1]])
                    n += 1
            changes.append(f"initialised the {n} recurrent weight matrice(s) of {path} "
                           "orthogonally (each gate's block)")


# ------------------------------------------------------------------------ architecture
def _plain_sequentials(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """``nn.Sequential`` modules (the model or its descendants) of weight layers and
    activations/dropout only, with at least two weight layers and no normalisation."""
    allowed = _WEIGHT_LAYERS + tuple(_ACT_MODULES) + (nn.Dropout, nn.Flatten, nn.Identity)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential) and all(isinstance(c, allowed) for c in m) and \
                sum(isinstance(c, _WEIGHT_LAYERS) for c in m) >= 2:
            out.append((name, m))
    return out


def _norm_for(layer: nn.Module, kind: str = "batch") -> nn.Module | None:
    """The normalisation inserted after ``layer``: BatchNorm over the batch, or (``kind``
    "layer") over each sample's features: LayerNorm after a Linear, GroupNorm with one group
    after a convolution."""
    p = layer.weight
    kw = {"device": p.device, "dtype": p.dtype}
    if kind == "layer":
        if isinstance(layer, nn.Linear):
            return nn.LayerNorm(layer.out_features, **kw)
        if isinstance(layer, _WEIGHT_LAYERS):
            return nn.GroupNorm(1, layer.out_channels, **kw)
        return None
    if isinstance(layer, nn.Linear):
        return nn.BatchNorm1d(layer.out_features, **kw)
    if isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)):
        return nn.BatchNorm1d(layer.out_channels, **kw)
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        return nn.BatchNorm2d(layer.out_channels, **kw)
    if isinstance(layer, (nn.Conv3d, nn.ConvTranspose3d)):
        return nn.BatchNorm3d(layer.out_channels, **kw)
    return None


def _batchnorm_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    seqs = _plain_sequentials(model)
    if not seqs:
        raise NotApplicable("no plain nn.Sequential of Linear/convolution layers and "
                            "activations: add nn.BatchNorm1d/2d (or nn.LayerNorm) after each "
                            "hidden layer in the model's __init__")
    kind = str(params.get("norm", "auto"))
    if kind not in ("auto", "batch", "layer"):
        raise ValueError(f"norm must be 'auto', 'batch' or 'layer', got {kind!r}")
    shape = params.get("input_shape")
    if kind == "auto":
        # BatchNorm1d reads dim 1 as the features: a Linear stack fed (batch, time,
        # features) needs LayerNorm, and so does training on single samples.
        first = next((c for _, seq in seqs for c in seq if isinstance(c, _WEIGHT_LAYERS)), None)
        kind = "layer" if isinstance(shape, list) and (
            (len(shape) > 2 and isinstance(first, nn.Linear)) or (shape and shape[0] == 1)) \
            else "batch"
    label = {"batch": "BatchNorm", "layer": "LayerNorm/GroupNorm"}[kind]
    new: list[nn.Parameter] = []
    for name, seq in seqs:
        children = list(seq)
        last = max(i for i, c in enumerate(children) if isinstance(c, _WEIGHT_LAYERS))
        layers: list[nn.Module] = []
        added = 0
        for i, c in enumerate(children):
            layers.append(c)
            norm = _norm_for(c, kind) if isinstance(c, _WEIGHT_LAYERS) and i < last else None
            if norm is not None:
                norm.train(seq.training)
                layers.append(norm)
                new += list(norm.parameters())
                added += 1
        seq._modules = OrderedDict((str(i), m) for i, m in enumerate(layers))
        changes.append(f"inserted {added} {label} layer(s) after the hidden layers of "
                       f"{name or 'the model'} (nn.Sequential, re-indexed: now "
                       f"{len(layers)} modules)")
    _SWAPS.setdefault(model, []).append(([], new))


class _Residual(nn.Module):
    """``x + f(x)``: a skip connection around a block that keeps the width."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def _residual_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    done = 0
    for name, seq in _plain_sequentials(model):
        children = list(seq)
        layers: list[nn.Module] = []
        i = wrapped = 0
        while i < len(children):
            c = children[i]
            nxt = children[i + 1] if i + 1 < len(children) else None
            square = isinstance(c, nn.Linear) and c.in_features == c.out_features
            if square and nxt is not None and type(nxt) in _ACT_MODULES:
                layers.append(_Residual(nn.Sequential(c, nxt)))
                wrapped += 1
                i += 2
            else:
                layers.append(c)
                i += 1
        if wrapped:
            seq._modules = OrderedDict((str(k), m) for k, m in enumerate(layers))
            changes.append(f"wrapped {wrapped} width-preserving Linear+activation block(s) of "
                           f"{name or 'the model'} in skip connections (x + f(x)); same "
                           "parameters")
            done += wrapped
    if not done:
        raise NotApplicable("no plain nn.Sequential with width-preserving Linear+activation "
                            "blocks; add skip connections in the model's code")


# --------------------------------------------------------------------------- not applicable
def _never(why: str) -> ModelFn:
    def refuse(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
        raise NotApplicable(why)
    refuse.refuses = why  # type: ignore[attr-defined]
    return refuse


def refuses(remedy_id: str) -> str | None:
    """Why gradwatch can never apply ``remedy_id`` to a live model (None when it can try):
    such a remedy needs something only the user's code has, like the training data."""
    applier = APPLIERS.get(remedy_id)
    return getattr(applier.to_model, "refuses", None) if applier is not None else None


APPLIERS: dict[str, Applier] = {a.id: a for a in [
    Applier("kaiming_init", _kaiming_model, None),
    Applier("xavier_init", _xavier_model, None),
    Applier("leaky_relu", _leaky_model, None),
    Applier("positive_bias_init", _bias_model, None),
    Applier("batch_norm", _batchnorm_model, _swap_optimizer),
    Applier("residual_connections", _residual_model, None),
    Applier("clip_grad_norm", None, _clip_optimizer, needs_optimizer=True),
    Applier("lower_learning_rate", None, _lr_optimizer, needs_optimizer=True),
    Applier("standardize_inputs", _standardize_model, None),
    Applier("adaptive_optimizer", None, _adam_optimizer, needs_optimizer=True,
            after_first_step=True),
    Applier("detect_anomaly", _anomaly_model, None),
    Applier("assert_finite_inputs", _assert_inputs_model, None),
    Applier("guard_nonfinite_loss", None, _guard_optimizer, needs_optimizer=True),
    Applier("call_model_eval", _eval_model, None),
    Applier("recompute_bn_statistics", _never(
        "re-estimating BatchNorm statistics needs the training data; apply call_model_eval, "
        "which keeps evaluation batches out of the running statistics, or call "
        "torch.optim.swa_utils.update_bn(train_loader, model) after training"), None),
    Applier("use_lstm_gru", _lstm_model, _swap_optimizer),
    Applier("forget_gate_bias", _forget_model, None),
    Applier("chrono_init", _chrono_model, None),
    Applier("orthogonal_recurrent_init", _orthogonal_model, None),
]}
assert set(APPLIERS) == set(CATALOGUE), set(APPLIERS) ^ set(CATALOGUE)


def apply(model: nn.Module, optimizer: torch.optim.Optimizer | None, remedy_id: str, /,
          **params: Any) -> Application:
    """Apply the catalogue remedy ``remedy_id`` to a live model (and optimizer) in place,
    before training, with the run's measured ``params``; returns what changed.

    Raises KeyError for an unknown id, TypeError for arguments of the wrong type,
    ValueError when the remedy needs an optimizer and none is given, and
    :class:`NotApplicable` when the remedy cannot apply itself to this model.
    """
    if not isinstance(remedy_id, str):
        raise TypeError(f"remedy_id must be a string, got {type(remedy_id).__name__}")
    if "+" in remedy_id and isinstance(params.get("parts"), list):
        # A combination ``--verify`` proved together: each part in order.
        done: list[str] = []
        for part in params["parts"]:
            done += apply(model, optimizer, part["id"], **dict(part.get("params") or {})).changes
        return Application(remedy_id, done)
    if remedy_id not in APPLIERS:
        raise KeyError(f"unknown remedy {remedy_id!r}; known: {', '.join(APPLIERS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None:
        _check_optimizer(optimizer)
    applier = APPLIERS[remedy_id]
    if applier.needs_optimizer and optimizer is None:
        raise ValueError(f"remedy {remedy_id!r} changes the optimizer: pass the optimizer "
                         "(apply(model, optimizer, ...))")
    changes: list[str] = []
    if applier.to_model is not None:
        applier.to_model(model, params, changes)
    if applier.to_optimizer is not None:
        if optimizer is not None:
            applier.to_optimizer(optimizer, model, params, changes)
        elif _SWAPS.get(model):
            changes.append("create the optimizer after this call (or pass it): the new "
                           "modules' parameters are in no optimizer yet")
    return Application(remedy_id, changes)
