"""Remedies for recurrent layers: an LSTM for a plain RNN, gate biases, chrono and
orthogonal init."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import (
    SWAPS,
    NotApplicable,
    RemedyEntry,
    number,
    submodule,
    swap_optimizer,
)

__all__ = ["ENTRIES"]


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
        m = submodule(model, path)
        return [(path, m)] if isinstance(m, kinds) else []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _lstm_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    length = number(params, "length", 100)
    if type(model) is nn.RNN:
        raise NotApplicable("the model is the nn.RNN itself and cannot be replaced in place; "
                            "build an nn.LSTM (the remedy's code) and re-create the optimizer")
    found = [(n, m) for n, m in _recurrent(model, params, (nn.RNN,)) if type(m) is nn.RNN]
    if not found:
        raise NotApplicable(f"no nn.RNN at {params.get('module', 'any path')!r} to replace")
    swaps = SWAPS.setdefault(model, [])
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
    length = number(params, "length", 100)
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


def _lstm_code(p: dict[str, Any]) -> str:
    module, length = p.get("module", "rnn"), p.get("length", 100)
    return ("def as_lstm(rnn, T):\n"
            "    lstm = nn.LSTM(rnn.input_size, rnn.hidden_size, rnn.num_layers, bias=rnn.bias,\n"
            "                   batch_first=rnn.batch_first, dropout=rnn.dropout,\n"
            "                   bidirectional=rnn.bidirectional)\n"
            "    h = rnn.hidden_size\n"
            "    with torch.no_grad():  # chrono init: forget-gate memories from 1 to T steps\n"
            "        for name, b in lstm.named_parameters():\n"
            "            if name.startswith(\"bias_ih\"):  # gates: input, forget, cell, output\n"
            "                forget = torch.log(torch.empty(h).uniform_(1, max(T - 1, 2)))\n"
            "                b[h: 2 * h] = forget\n"
            "                b[:h] = -forget\n"
            "            elif name.startswith(\"bias_hh\"):\n"
            "                b[: 2 * h] = 0.0\n"
            "    return lstm\n"
            f"T = {length}  # the longest dependency to learn: the sequence length\n"
            f"parent, _, attr = {module!r}.rpartition(\".\")\n"
            "owner = model.get_submodule(parent)\n"
            "if isinstance(model, nn.RNN):  # the model is the RNN itself\n"
            "    model = as_lstm(model, T)\n"
            "elif isinstance(getattr(owner, attr, None), nn.RNN):\n"
            "    setattr(owner, attr, as_lstm(getattr(owner, attr), T))\n"
            "# an LSTM returns (output, (h_n, c_n)) where the RNN returned (output, h_n): unpack\n"
            "# h_n accordingly in forward(), then re-create the optimizer")


ENTRIES = [
    RemedyEntry(
        "use_lstm_gru",
        lambda p: (f"replace the plain nn.RNN {p['module']!r} by an nn.LSTM: its cell state is "
                   f"updated additively, so the gradient through time is scaled by the forget "
                   f"gate (learnable, near 1) instead of weight_hh times the activation's "
                   f"slope (measured x{p['decay']} per step); its forget gates chrono-"
                   f"initialised for {p['length']} steps, since at that length even a forget "
                   f"bias of 1 loses most of the gradient at the start"),
        _lstm_code,
        to_model=_lstm_model,
        to_optimizer=swap_optimizer),
    RemedyEntry(
        "forget_gate_bias",
        lambda p: (f"set the {p['gate']}-gate bias of {p['module']!r} to 1 (now {p['bias']}): "
                   f"the gate then starts at sigmoid(1) = 73%, so the state, and the gradient "
                   f"along it, decays much more slowly from the first step on"),
        lambda p: (f"rnn = model.get_submodule({p['module']!r})  # an nn.LSTM or nn.GRU\n"
                   "with torch.no_grad():\n"
                   "    for name, p in rnn.named_parameters():\n"
                   "        if name.startswith(\"bias_\"):\n"
                   "            # 2nd gate block: LSTM (input, forget, cell, output), GRU "
                   "(reset, update, new)\n"
                   "            h = p.shape[0] // (4 if isinstance(rnn, nn.LSTM) else 3)\n"
                   "            p[h: 2 * h] = 1.0 if name.startswith(\"bias_ih\") else 0.0"
                   "  # sum 1"),
        to_model=_forget_model),
    RemedyEntry(
        "chrono_init",
        lambda p: (f"chrono-initialise the gates of the LSTM {p['module']!r} for dependencies "
                   f"up to {p['length']} steps (Tallec & Ollivier 2018): forget-gate biases "
                   f"log(U(1, {p['length']} - 1)), input-gate biases their negative, so the "
                   f"cells start with memories spread from 1 to {p['length']} steps instead of "
                   f"all forgetting at the same rate"),
        lambda p: (f"rnn = model.get_submodule({p['module']!r})\n"
                   f"T = {p['length']}  # the longest dependency to learn: the sequence length\n"
                   "if isinstance(rnn, nn.LSTM):\n"
                   "    h = rnn.hidden_size\n"
                   "    with torch.no_grad():\n"
                   "        for name, b in rnn.named_parameters():\n"
                   "            if name.startswith(\"bias_ih\"):  # gates: input, forget, ...\n"
                   "                forget = torch.log(torch.empty(h).uniform_(1, max(T - 1, 2)))\n"
                   "                b[h: 2 * h] = forget\n"
                   "                b[:h] = -forget\n"
                   "            elif name.startswith(\"bias_hh\"):\n"
                   "                b[: 2 * h] = 0.0"),
        to_model=_chrono_model),
    RemedyEntry(
        "orthogonal_recurrent_init",
        lambda p: (f"initialise the recurrent weights of {p['module']!r} orthogonally: "
                   f"spectral radius 1 (measured {p['radius']}), so repeated multiplication by "
                   f"weight_hh neither shrinks nor grows the gradient through time"),
        lambda p: (f"rnn = model.get_submodule({p['module']!r})\n"
                   "with torch.no_grad():\n"
                   "    for name, p in rnn.named_parameters():\n"
                   "        if name.startswith(\"weight_hh\"):\n"
                   "            for k in range(0, p.shape[0], p.shape[1]):  # each gate's block\n"
                   "                nn.init.orthogonal_(p[k: k + p.shape[1]])"),
        to_model=_orthogonal_model),
]
