"""Remedies that re-initialise weights and biases: Kaiming, Xavier, a positive bias."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..measure.structure import recommended_init
from .base import (
    ACT_MODULES,
    LAYERS_CODE,
    WEIGHT_LAYERS,
    NotApplicable,
    RemedyEntry,
    fmt,
    number,
    span,
    submodule,
)

__all__ = ["ENTRIES", "following_activations"]


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
        if isinstance(m, WEIGHT_LAYERS):
            layers.append(name)
            pending = name
        elif type(m) in ACT_MODULES or isinstance(m, tuple(ACT_MODULES)):
            any_module = True
            if pending is not None:
                kind = next(v for k, v in ACT_MODULES.items() if isinstance(m, k))
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
        changes.append(f"re-initialised {span(names)} ({len(names)} "
                       f"{'/'.join(sorted(kinds))}) with {label} for {what}, biases zero")


def _kaiming_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    _reinit(model, params, changes, "kaiming")


def _xavier_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    _reinit(model, params, changes, "xavier")


def _bias_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    layers = params.get("layers") or [params.get("layer")]
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise TypeError("remedy parameter 'layer' (the layer's path) must be a string, or "
                        "'layers' a list of them")
    value = number(params, "value", 0.01)
    biases = []
    for layer in layers:
        bias = getattr(submodule(model, layer), "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise NotApplicable(f"{layer} has no bias to re-initialise; revive its units "
                                "with LeakyReLU instead")
        biases.append((layer, bias))
    for layer, bias in biases:
        with torch.no_grad():
            before = float(bias.mean())
            bias.fill_(value)
        changes.append(f"set the bias of {layer} ({bias.numel()} units, mean {fmt(before)}) "
                       f"to {fmt(value)}")


def _init_code(call: str) -> str:
    """Code that re-initialises every weight layer's weight with ``call`` (on ``m.weight``)
    and zeroes its bias."""
    return ("for m in model.modules():\n"
            f"    if isinstance(m, {LAYERS_CODE}):\n"
            f"        {call}\n"
            "        if m.bias is not None:\n"
            "            nn.init.zeros_(m.bias)")


def _kaiming_code(p: dict[str, Any]) -> str:
    act = p.get("nonlinearity", "relu")
    return _init_code(f"nn.init.kaiming_normal_(m.weight, nonlinearity=\"{act}\")")


def _xavier_code(p: dict[str, Any]) -> str:
    act = p.get("nonlinearity", "tanh")
    return _init_code(f"nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain(\"{act}\"))")


def _bias_layers(p: dict[str, Any]) -> list[str]:
    """The layers whose bias a positive_bias_init resets: ``layers``, else ``layer``."""
    layers = p.get("layers")
    return [str(x) for x in layers] if isinstance(layers, list) and layers else \
        [str(p.get("layer"))]


ENTRIES = [
    RemedyEntry(
        "kaiming_init",
        lambda p: ("re-initialise weights with Kaiming/He init (std = gain/sqrt(fan_in)), "
                   "which keeps the signal's variance constant through ReLU-family layers"
                   + (f"; measured init is {p['ratio']}x that scale" if "ratio" in p else "")),
        _kaiming_code,
        to_model=_kaiming_model),
    RemedyEntry(
        "xavier_init",
        lambda p: ("re-initialise weights with Xavier/Glorot init, which balances forward "
                   "and backward variance for sigmoid/tanh layers"),
        _xavier_code,
        to_model=_xavier_model),
    RemedyEntry(
        "positive_bias_init",
        lambda p: (f"re-initialise the bias of {', '.join(_bias_layers(p))} at a small "
                   f"positive value (0.01) instead of {p['bias']}, so that every unit starts "
                   f"active and receives gradient"),
        lambda p: ("with torch.no_grad():\n" + "".join(
            f"    model.get_submodule(\"{layer}\").bias.fill_(0.01)\n"
            for layer in _bias_layers(p)) + f"    # was {p['bias']} on the dead units; before "
            "training, or to revive them"),
        to_model=_bias_model),
]
