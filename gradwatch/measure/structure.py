"""What the model is made of, measured once: the autograd graph of the first loss and the modules.

The graph walk sees what module scans cannot: functional activations (``F.relu``,
``torch.sigmoid``), which activation follows which parameterised op, normalisation and
branch merges (skip connections), and bare parameter tensors used without any module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .distributed import local

__all__ = ["GraphFacts", "activation_gain", "init_scale", "module_facts", "walk_graph"]

# autograd node name -> activation name (functional calls and modules alike)
_ACTIVATIONS = {
    "SigmoidBackward0": "sigmoid", "TanhBackward0": "tanh", "ReluBackward0": "relu",
    "ThresholdBackward0": "relu", "LeakyReluBackward0": "leaky_relu",
    "EluBackward0": "elu", "GeluBackward0": "gelu", "SiluBackward0": "silu",
    "HardtanhBackward0": "hardtanh", "SoftplusBackward0": "softplus",
    "PreluKernelBackward0": "prelu", "PreluBackward0": "prelu", "MishBackward0": "mish",
    "LogSigmoidBackward0": "logsigmoid", "HardsigmoidBackward0": "hardsigmoid",
    "HardswishBackward0": "hardswish", "SoftshrinkBackward0": "softshrink",
}
# ops that only change the view/dtype of a weight between it and the op using it
_VIEW_LIKE = ("TBackward", "ViewBackward", "PermuteBackward", "ExpandBackward",
              "UnsafeViewBackward", "ReshapeAliasBackward", "TransposeBackward",
              "SqueezeBackward", "UnsqueezeBackward", "ToCopyBackward", "CloneBackward",
              "AliasBackward", "SelectBackward", "SliceBackward", "SplitBackward",
              "UnbindBackward")
_RECURRENT = ("Rnn", "Lstm", "Gru", "RNN", "LSTM", "GRU")


@dataclasses.dataclass
class GraphFacts:
    """Structure read from one loss's autograd graph."""

    leaves: list[torch.Tensor]  # parameters reached, output side first
    act_after: dict[int, str]  # id(param) -> activation applied to its op's output
    activations: dict[str, int]  # activation name -> number of call sites
    norm_ops: int
    branch_merges: int  # additions of two computed tensors: skip connections or alike
    recurrent_ops: int
    nodes: int
    in_out_weights: set[int] = dataclasses.field(default_factory=set)
    """ids of 2-D weights used as ``x @ W`` (shape in x out, unlike nn.Linear's out x in)."""


def _node_name(node: Any) -> str:
    return type(node).__name__


def _params_of(node: Any) -> list[tuple[torch.Tensor, bool]]:
    """Leaf tensors a node consumes directly or through view-like ops (e.g. ``W.t()``),
    each with whether a transpose lay in between."""
    found = []
    for child, _ in node.next_functions:
        transposed = False
        while child is not None and _node_name(child).startswith(_VIEW_LIKE):
            transposed |= _node_name(child).startswith(("TBackward", "TransposeBackward"))
            nxt = [c for c, _ in child.next_functions if c is not None]
            child = nxt[0] if len(nxt) == 1 else None
        if child is not None and _node_name(child) == "AccumulateGrad":
            found.append((child.variable, transposed))
    return found


def walk_graph(loss: torch.Tensor, max_nodes: int = 200_000) -> GraphFacts | None:
    """Walk the graph behind ``loss`` once (before backward frees it)."""
    root = loss.grad_fn
    if root is None:
        return None
    facts = GraphFacts([], {}, {}, 0, 0, 0, 0)
    seen: set[int] = set()
    seen_leaves: set[int] = set()
    stack: list[tuple[Any, str | None]] = [(root, None)]
    while stack and facts.nodes < max_nodes:
        node, pending = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        facts.nodes += 1
        name = _node_name(node)
        act = _ACTIVATIONS.get(name)
        if act:
            facts.activations[act] = facts.activations.get(act, 0) + 1
            pending = act
        if "Norm" in name:
            facts.norm_ops += 1
        if name.startswith(_RECURRENT) or any(r in name for r in _RECURRENT):
            facts.recurrent_ops += 1
        children = [c for c, _ in node.next_functions if c is not None]
        if name.startswith("AddBackward") and len(children) == 2 and all(
                _node_name(c) != "AccumulateGrad" for c in children):
            facts.branch_merges += 1
        params = [] if name == "AccumulateGrad" else _params_of(node)
        if params:
            matmul = name.startswith(("MmBackward", "AddmmBackward", "BmmBackward",
                                      "MatmulBackward"))
            for p, transposed in params:
                if id(p) not in seen_leaves:
                    seen_leaves.add(id(p))
                    facts.leaves.append(p)
                    facts.act_after.setdefault(id(p), pending or "none")
                if matmul and p.dim() == 2 and not transposed:
                    facts.in_out_weights.add(id(p))
            # A bias or norm scale (1-D) does not end the layer: the activation after
            # ``x @ W + b`` or after ``BatchNorm(Linear(x))`` belongs to the weight too.
            if any(p.dim() >= 2 for p, _ in params):
                pending = None
        if name == "AccumulateGrad":
            var = node.variable
            if id(var) not in seen_leaves:
                seen_leaves.add(id(var))
                facts.leaves.append(var)
            continue
        # Reverse so the first input is explored first (DFS follows the main path).
        for child in reversed(children):
            if id(child) not in seen:
                stack.append((child, pending))
    return facts


def activation_gain(act: str | None) -> float:
    """``nn.init.calculate_gain`` for the activation that follows a layer."""
    table = {"relu": math.sqrt(2.0), "leaky_relu": math.sqrt(2.0 / (1 + 0.01 ** 2)),
             "tanh": 5.0 / 3, "selu": 0.75, "sigmoid": 1.0, "none": 1.0, None: 1.0,
             "elu": math.sqrt(2.0), "gelu": math.sqrt(2.0), "silu": math.sqrt(2.0),
             "prelu": math.sqrt(2.0 / (1 + 0.25 ** 2))}
    return table.get(act, 1.0)


def recommended_init(act: str | None) -> str:
    """The init family that matches an activation: Kaiming for ReLU-like, Xavier otherwise."""
    return "kaiming" if act in ("relu", "leaky_relu", "elu", "gelu", "silu", "prelu",
                                "mish", "hardswish") else "xavier"


def init_scale(weight: torch.Tensor, act: str | None) -> dict[str, float] | None:
    """Weight std against the std Kaiming (ReLU-like) or Xavier (others) would give it."""
    if weight.dim() < 2:
        return None
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    if fan_in == 0:
        return None
    part = local(weight)  # an FSDP2 shard: its own std, no communication
    if part.numel() == 0:
        return None  # this rank holds no part of it
    std = float(part.detach().float().std()) if part.numel() > 1 else 0.0
    gain = activation_gain(act)
    family = recommended_init(act)
    target = gain / math.sqrt(fan_in) if family == "kaiming" else \
        gain * math.sqrt(2.0 / (fan_in + fan_out))
    return {"std": std, "recommended_std": target, "ratio": std / target if target else math.nan,
            "family": family, "fan_in": fan_in, "fan_out": fan_out}


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
               nn.LocalResponseNorm)


def module_facts(roots: list[nn.Module]) -> dict[str, Any]:
    """Facts from module types: normalisation layers, recurrent layers, activation modules."""
    norms, recurrent, acts, dropout = [], [], {}, []
    for root in roots:
        for name, m in root.named_modules():
            if isinstance(m, _NORM_TYPES) or type(m).__name__ in ("RMSNorm",):
                norms.append(name)
            if isinstance(m, nn.RNNBase):
                kind = m.mode if isinstance(m, nn.RNN) is False else \
                    f"RNN_{m.nonlinearity.upper()}"
                recurrent.append({"name": name, "kind": kind})
            if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                              nn.AlphaDropout)):
                dropout.append(name)
            cls = type(m).__name__
            if cls in ("Sigmoid", "Tanh", "ReLU", "ReLU6", "LeakyReLU", "ELU", "GELU",
                       "SiLU", "PReLU", "Softplus", "Hardtanh", "Softsign", "Mish"):
                acts[cls] = acts.get(cls, 0) + 1
    return {"norm_modules": norms, "recurrent_modules": recurrent,
            "activation_modules": acts, "dropout_modules": dropout}
