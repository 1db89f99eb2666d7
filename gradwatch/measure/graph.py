"""What a loss's autograd graph says about the watched layers, written into History."""

from __future__ import annotations

import torch

from ..history import History
from .layers import Watched
from .structure import GraphFacts, walk_graph

__all__ = ["GraphReader", "adopt_graph"]


def adopt_graph(history: History, watched: Watched, graph: GraphFacts,
                graphed: set[int]) -> set[int]:
    """The activation after each layer, bare tensors' order and layout, and the structure
    facts of each model the graph covers (once per model: ``graphed`` are those done).
    Returns the roots the graph covers."""
    n = len(graph.leaves)
    roots: set[int] = set()
    for k, p in enumerate(graph.leaves):
        i = watched.slot(p)
        if i is None:
            continue
        layer = history.layers[watched.slot_layer[i]]
        roots.add(layer.root)
        if p.dim() >= 2 or layer.activation is None:
            layer.activation = graph.act_after.get(id(p), "none")
        if layer.order is None and layer.type == "Tensor":
            layer.order = 10_000 + (n - k)  # graph order: output side first
        if layer.type == "Tensor" and id(p) in graph.in_out_weights:
            # Bare ``x @ W``: W is (in, out), the reverse of nn.Linear's layout.
            layer.fan_in, layer.fan_out = int(p.shape[0]), int(p.shape[1])
    facts = {"activations": dict(graph.activations), "norm_ops": graph.norm_ops,
             "branch_merges": graph.branch_merges, "recurrent_ops": graph.recurrent_ops,
             "graph_nodes": graph.nodes}
    per_root = history.facts.setdefault("graph", {})
    for r in roots - graphed:
        per_root[str(r)] = facts
    return roots


class GraphReader:
    """Reads a loss's autograd graph when it can tell something new: at the first backward,
    when a model has appeared since the last reading, and a few more times while a model is
    not yet covered (it may train later). Never every step: a model that is only evaluated
    (a teacher) would otherwise cost a graph walk per step."""

    RETRIES = 8
    """Readings, after a new model appeared, while some model is not yet covered."""

    def __init__(self, history: History, watched: Watched) -> None:
        self.history, self.watched = history, watched
        self.read = False  # a graph covering a watched model was read
        self.graphed: set[int] = set()  # the roots a read graph covered
        self._walks = (0, 0)  # (roots when last read, readings since a new root)

    def pending(self) -> bool:
        if not self.read:
            return True
        roots, walks = self._walks
        if len(self.history.roots) > roots:
            self._walks = (roots, 0)
            return True
        return len(self.history.roots) > len(self.graphed) and walks < self.RETRIES

    def walk(self, loss: torch.Tensor, discover: bool) -> GraphFacts | None:
        """The loss's graph if it is due and covers a watched model (any, under
        ``discover``); the caller adopts bare tensors, then calls :meth:`adopt`."""
        if not self.pending() or loss.grad_fn is None:
            return None
        self._walks = (len(self.history.roots), self._walks[1] + 1)
        graph = walk_graph(loss)
        # Another watched model's loss says nothing about this model's structure.
        if graph is None or not (discover or any(self.watched.tracks(p) for p in graph.leaves)):
            return None
        self.read = True
        return graph

    def adopt(self, graph: GraphFacts) -> None:
        self.graphed |= adopt_graph(self.history, self.watched, graph, self.graphed)
