"""One entry per remedy: its id, why it helps, and runnable code built from measurements.

Detectors ask for remedies by id with :func:`remedy`, passing the numbers measured on
this run (a clipping threshold, a learning rate, the input statistics); a test checks that
every id a detector names is here and that no entry is orphaned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..findings import Remedy

__all__ = ["CATALOGUE", "RemedyEntry", "remedy"]

_LAYERS = "(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)"


@dataclasses.dataclass(frozen=True)
class RemedyEntry:
    """A remedy: ``text`` and ``code`` are templates filled with measured parameters."""

    id: str
    text: Callable[[dict[str, Any]], str]
    code: Callable[[dict[str, Any]], str]

    def describe(self, **params: Any) -> Remedy:
        return Remedy(self.id, self.text(params), self.code(params), params=dict(params))


def _kaiming_code(p: dict[str, Any]) -> str:
    act = p.get("nonlinearity", "relu")
    return ("for m in model.modules():\n"
            f"    if isinstance(m, {_LAYERS}):\n"
            f"        nn.init.kaiming_normal_(m.weight, nonlinearity=\"{act}\")\n"
            "        if m.bias is not None:\n"
            "            nn.init.zeros_(m.bias)")


def _xavier_code(p: dict[str, Any]) -> str:
    act = p.get("nonlinearity", "tanh")
    return ("for m in model.modules():\n"
            f"    if isinstance(m, {_LAYERS}):\n"
            f"        nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain(\"{act}\"))\n"
            "        if m.bias is not None:\n"
            "            nn.init.zeros_(m.bias)")


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



def _bias_layers(p: dict[str, Any]) -> list[str]:
    """The layers whose bias a positive_bias_init resets: ``layers``, else ``layer``."""
    layers = p.get("layers")
    return [str(x) for x in layers] if isinstance(layers, list) and layers else \
        [str(p.get("layer"))]


def _model_var(p: dict[str, Any]) -> str:
    """The model's variable name in the user's code when known, else ``model``."""
    name = str(p.get("model", "model"))
    return name if name.isidentifier() else "model"


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

CATALOGUE: dict[str, RemedyEntry] = {e.id: e for e in [
    RemedyEntry(
        "kaiming_init",
        lambda p: ("re-initialise weights with Kaiming/He init (std = gain/sqrt(fan_in)), "
                   "which keeps the signal's variance constant through ReLU-family layers"
                   + (f"; measured init is {p['ratio']}x that scale" if "ratio" in p else "")),
        _kaiming_code),
    RemedyEntry(
        "xavier_init",
        lambda p: ("re-initialise weights with Xavier/Glorot init, which balances forward "
                   "and backward variance for sigmoid/tanh layers"),
        _xavier_code),
    RemedyEntry(
        "leaky_relu",
        lambda p: (f"replace ReLU with LeakyReLU (or PReLU/ELU) throughout the model (the dead "
                   f"units are at {p['site']}): a unit pushed below zero keeps a slope of 0.01, "
                   "still gets gradient and can recover"
                   if p.get("site") else
                   "replace saturating activations with LeakyReLU: its derivative is 1 for "
                   "positive inputs and 0.01 (never 0) for negative ones"),
        _swap_code),
    RemedyEntry(
        "positive_bias_init",
        lambda p: (f"re-initialise the bias of {', '.join(_bias_layers(p))} at a small "
                   f"positive value (0.01) instead of {p['bias']}, so that every unit starts "
                   f"active and receives gradient"),
        lambda p: ("with torch.no_grad():\n" + "".join(
            f"    model.get_submodule(\"{layer}\").bias.fill_(0.01)\n"
            for layer in _bias_layers(p)) + f"    # was {p['bias']} on the dead units; before "
            "training, or to revive them")),
    RemedyEntry(
        "batch_norm",
        lambda p: ("normalise each layer's output (BatchNorm1d for MLPs, BatchNorm2d for "
                   "convolutions, LayerNorm for sequence models) so that its scale cannot "
                   "compound with depth"),
        lambda p: ("layers = []\n"
                   "for m in model:  # an nn.Sequential\n"
                   "    layers.append(m)\n"
                   "    if isinstance(m, nn.Linear) and m is not model[-1]:\n"
                   + ("        layers.append(nn.LayerNorm(m.out_features))\n"
                      if p.get("norm") == "layer" else
                      "        layers.append(nn.BatchNorm1d(m.out_features))  # or "
                      "nn.LayerNorm for (batch, time, features) inputs\n") +
                   "model = nn.Sequential(*layers)  # re-create the optimizer afterwards")),
    RemedyEntry(
        "residual_connections",
        lambda p: ("add skip connections (x + f(x)) so that gradients reach early layers "
                   "through an identity path whatever the depth"),
        lambda p: ("class Residual(nn.Module):\n"
                   "    def __init__(self, width):\n"
                   "        super().__init__()\n"
                   "        self.f = nn.Sequential(nn.Linear(width, width), nn.ReLU())\n"
                   "    def forward(self, x):\n"
                   "        return x + self.f(x)\n"
                   f"model = nn.Sequential(nn.Linear(n_in, {p.get('width', 'width')}), "
                   f"*[Residual({p.get('width', 'width')}) for _ in range({p.get('depth', 8)})], "
                   f"nn.Linear({p.get('width', 'width')}, n_out))")),
    RemedyEntry(
        "clip_grad_norm",
        lambda p: (f"clip the total gradient norm at {p['max_norm']}, the median norm of this "
                   f"run's healthy early steps, between backward() and step()"),
        lambda p: (f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={p['max_norm']})"
                   "  # after loss.backward(), before optimizer.step()")),
    RemedyEntry(
        "lower_learning_rate",
        lambda p: (f"lower the learning rate from {p['old_lr']} to {p['lr']}"
                   + (f" ({p['factor']}x: the updates measured while the gradients blew up, "
                      f"{p['measured']} of the weights, are sized by the gradients, so the "
                      f"rate is cut by a fixed step, not to match them)" if p.get("capped")
                      else f": that brings the measured update size ({p['measured']} of the "
                      f"weights) near {p['target']} per step")),
        lambda p: ("for group in optimizer.param_groups:\n"
                   f"    group[\"lr\"] *= {p['factor']}  # {p['old_lr']} -> {p['lr']}")),
    RemedyEntry(
        "standardize_inputs",
        lambda p: (f"standardise the inputs (measured mean {p['mean']}, std {p['std']}) so that "
                   f"the first layer sees unit-scale features"),
        lambda p: (f"x = (x - {p['mean']}) / {p['std']}  # better: per-feature statistics "
                   "of the training set, x = (x - x_train.mean(0)) / x_train.std(0)")),
    RemedyEntry(
        "adaptive_optimizer",
        lambda p: ("use Adam, whose per-parameter step size does not shrink with the "
                   "gradient's scale, so starved layers still move"),
        lambda p: "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)"),
    RemedyEntry(
        "detect_anomaly",
        lambda p: ("run a few steps with anomaly detection to get the traceback of the "
                   "operation that first produced NaN/Inf"),
        lambda p: ("with torch.autograd.detect_anomaly():\n"
                   "    loss = loss_fn(model(x), y)\n"
                   "    loss.backward()")),
    RemedyEntry(
        "assert_finite_inputs",
        lambda p: ("check every batch before the forward pass and fix the data pipeline "
                   "(missing values, division by a zero std in preprocessing, bad records)"),
        lambda p: ("assert torch.isfinite(x).all(), "
                   "f\"non-finite input batch: {(~torch.isfinite(x)).sum()} bad values\"")),
    RemedyEntry(
        "guard_nonfinite_loss",
        lambda p: ("skip the update when the loss is not finite, so that one bad batch "
                   "cannot turn every weight into NaN"),
        lambda p: ("if torch.isfinite(loss):\n"
                   "    optimizer.step()\n"
                   "optimizer.zero_grad()")),
    RemedyEntry(
        "call_model_eval",
        lambda p: (f"call {_model_var(p)}.eval() before evaluating and {_model_var(p)}.train() "
                   "after: eval mode makes Dropout keep every unit and BatchNorm use (and stop "
                   "updating) its running statistics; torch.no_grad() only stops gradient "
                   "tracking, so evaluation needs both"),
        lambda p: (f"{_model_var(p)}.eval()  # Dropout keeps every unit; BatchNorm uses its "
                   "running statistics\n"
                   "with torch.no_grad():\n"
                   f"    val_out = {_model_var(p)}(x)  # your evaluation loop\n"
                   f"{_model_var(p)}.train()  # back to training mode before the next "
                   "training step")),
    RemedyEntry(
        "recompute_bn_statistics",
        lambda p: ("the BatchNorm running statistics now hold evaluation batches: once the "
                   "loop calls eval(), re-estimate them on training data before the model is "
                   "saved or used (or train long enough for their momentum to wash those "
                   "batches out)"),
        lambda p: ("# re-estimate the BatchNorm running statistics on training batches\n"
                   f"torch.optim.swa_utils.update_bn([x], {_model_var(p)})  "
                   "# your training DataLoader instead of [x]")),
    RemedyEntry(
        "use_lstm_gru",
        lambda p: (f"replace the plain nn.RNN {p['module']!r} by an nn.LSTM: its cell state is "
                   f"updated additively, so the gradient through time is scaled by the forget "
                   f"gate (learnable, near 1) instead of weight_hh times the activation's "
                   f"slope (measured x{p['decay']} per step); its forget gates chrono-"
                   f"initialised for {p['length']} steps, since at that length even a forget "
                   f"bias of 1 loses most of the gradient at the start"),
        _lstm_code),
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
                   "  # sum 1")),
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
                   "                b[: 2 * h] = 0.0")),
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
                   "                nn.init.orthogonal_(p[k: k + p.shape[1]])")),
]}


def remedy(remedy_id: str, **params: Any) -> Remedy:
    """Build the catalogue's remedy ``remedy_id`` with this run's measured parameters."""
    try:
        entry = CATALOGUE[remedy_id]
    except KeyError:
        raise KeyError(f"unknown remedy {remedy_id!r}; known: {', '.join(CATALOGUE)}") from None
    return entry.describe(**params)
