"""What a monitor measures: models (roots), their layers, parameter slots and optimizers.

Everything the user created is held *weakly*: a sweep that builds, trains and drops one
model after another under ``gradwatch run`` must free each model when the script drops it,
as it would without gradwatch. A root's parameters are held strongly only while the root
is alive (parameters do not reference their module, so this never keeps a model alive),
so that when the root dies its extensions can still read them once, for the facts they
report at the end (a dead unit's bias). Parameters no module owns (bare tensors found in
the graph or in an optimizer) are held only weakly.

Objects are looked up by ``id`` on the hot path (a dict lookup per hook call). An ``id``
can be reused once its object is gone, so every death is noted by a weakref callback and
the stale entries are removed by :meth:`Watched.reap`, which the monitor calls before any
lookup of a hook: no new object can be mistaken for a dead one.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..history import History, LayerInfo
from . import structure
from .distributed import local

__all__ = ["ModelFinder", "Watched"]

ModelFinder = Callable[[set[int]], list[tuple[str, nn.Module]]]
"""Finds the models that own parameters (by id): ``gradwatch run`` looks in the script."""


class Watched:
    """The roots, layers, parameters and optimizers of one monitor, weakly held."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.namer: Callable[[Any], str | None] = lambda obj: None
        self.device: torch.device | None = None  # where the first watched parameter lives
        # parameter slots: one per tracked parameter, in registration order
        self._slots: list[weakref.ref[torch.Tensor] | None] = []  # None: dead or dropped
        self.slot_layer: list[int] = []
        self.slot_name: list[str] = []
        self._slot_of: dict[int, int] = {}  # id(parameter) -> slot
        self._slot_id: list[int] = []  # the id each slot was registered under
        # roots: top-level models
        self._roots: list[weakref.ref[nn.Module] | None] = []
        self._root_of: dict[int, int] = {}  # id(root module) -> root index
        self._root_id: list[int] = []
        self._root_params: list[list[torch.Tensor]] = []  # strong, while the root lives
        self._root_modules: list[list[int]] = []  # ids registered by each root
        self._module_layer: dict[int, int] = {}  # id(module) -> layer index
        self._module_name: dict[int, str] = {}  # id(module) -> path inside its root
        # optimizers
        self._optimizers: list[weakref.ref[torch.optim.Optimizer] | None] = []
        self._optimizer_of: dict[int, int] = {}
        self._optimizer_id: list[int] = []
        self._optimizer_roots: list[list[int] | None] = []
        # deaths noted by weakref callbacks, handled by reap(); the callbacks close over
        # this list only (never over self), so they keep nothing alive
        self._dead: list[tuple[str, int]] = []
        #: Called with a root's index when it has died, while its parameters can still
        #: be read (extensions turn what they kept about it into facts and drop it).
        self.root_gone: list[Callable[[int], None]] = []
        self.dead_slots = 0

    # ------------------------------------------------------------------ registration
    def add_root(self, module: nn.Module, name: str, prefix: str = "") -> int | None:
        """Track a top-level model; its parameter-owning modules become layers, named by
        their path inside it, after ``prefix`` (the model's own path inside the module
        that holds it, for a submodule a LightningModule calls: ``net`` -> ``net.3``).

        Returns the root's index, or None when it was tracked already.
        """
        if id(module) in self._root_of:
            return None
        root = len(self._roots)
        self._roots.append(weakref.ref(module, _noting(self._dead, "root", root)))
        self._root_of[id(module)] = root
        self._root_id.append(id(module))
        self._root_params.append([])
        self._root_modules.append([id(module)])
        self.history.roots.append(name)
        for path, mod in module.named_modules():
            path = f"{prefix}.{path}" if prefix and path else (prefix or path)
            if id(mod) not in self._module_name:
                self._module_name[id(mod)] = path
                self._root_modules[root].append(id(mod))
            # Lazy modules' parameters have no shape until their first forward: not tracked.
            own = [(n, p) for n, p in mod.named_parameters(recurse=False)
                   if p.requires_grad and not nn.parameter.is_lazy(p)
                   and id(p) not in self._slot_of]
            if own:
                layer = self._add_layer(path, type(mod).__name__, root, own)
                self._module_layer[id(mod)] = layer
                self._root_params[root].extend(p for _, p in own)
        self.history.facts.setdefault("module", {})[str(root)] = \
            structure.module_facts([module])
        return root

    def add_tensors(self, tensors: Iterable[torch.Tensor], skip: set[int],
                    models_of: ModelFinder = lambda ids: []) -> None:
        """Track parameters that no tracked module owns: those of a model ``models_of``
        finds (the script's global models, under ``gradwatch run``) with their model, the
        rest as bare tensors; ``skip`` holds ids of tensors gradwatch made itself."""
        tensors = list(tensors)
        skip = skip | self._fsdp_views() if tensors else skip
        untracked = {id(t) for t in tensors if t.requires_grad and
                     id(t) not in self._slot_of and id(t) not in skip}
        for name, module in models_of(untracked) if untracked else ():
            # Its forward was not seen, or it would be a root already: it runs compiled
            # (``model.compile()``) or only through its submodules.
            if self.add_root(module, name) is not None:
                compiled = getattr(module, "_compiled_call_impl", None) is not None
                self.note_root(module, "compiled_roots" if compiled else "forward_unseen")
        for t in tensors:
            if not t.requires_grad or id(t) in self._slot_of or id(t) in skip or \
                    nn.parameter.is_lazy(t) or _freed(t):
                continue
            name = self.namer(t) or f"tensor{len(self._slots)}"
            self._add_layer(name, "Tensor", -1, [("", t)])

    def _fsdp_views(self) -> set[int]:
        """Ids of the parameters FSDP2 modules of the watched roots hold right now: between
        forward and backward those are unsharded copies of the sharded parameters the layers
        track (their storage is freed later: reading them then would crash)."""
        ids: set[int] = set()
        for _, root in self.live_roots():
            for mod in root.modules():
                if any(c.__name__ == "FSDPModule" for c in type(mod).__mro__):
                    ids.update(id(p) for p in mod.parameters())
        return ids

    def _add_layer(self, name: str, type_name: str, root: int,
                   params: list[tuple[str, torch.Tensor]]) -> int:
        weight = next((p for _, p in params if p.dim() >= 2), None)
        names = [f"{name}.{n}" if name and n else (name or n) for n, _ in params]
        info = LayerInfo(name=name, type=type_name, root=root,
                         params=sum(p.numel() for _, p in params), param_names=names)
        if weight is not None:
            info.fan_in, info.fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
            # One host read per layer, when it is first seen.
            with torch.no_grad():
                part = local(weight)  # a shard's std (FSDP2), read without communication
                info.init_weight_std = float(part.detach().float().std()) \
                    if part.numel() > 1 else None
        layer = self.history.add_layer(info)
        for (_, p), param_name in zip(params, names, strict=True):
            slot = len(self._slots)
            self._slots.append(weakref.ref(p, _noting(self._dead, "slot", slot)))
            self._slot_of[id(p)] = slot
            self._slot_id.append(id(p))
            self.slot_layer.append(layer)
            self.slot_name.append(param_name)
            if self.device is None:
                self.device = p.device
        return layer

    def note_root(self, module: nn.Module, fact: str) -> None:
        """Name this root in ``facts[fact]`` (``compiled_roots``, ``forward_unseen``)."""
        index = self._root_of.get(id(module))
        if index is not None:
            names = self.history.facts.setdefault(fact, [])
            if self.history.roots[index] not in names:
                names.append(self.history.roots[index])

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Track an optimizer's settings; True if it was not tracked before."""
        if id(optimizer) in self._optimizer_of:
            return False
        k = len(self._optimizers)
        self._optimizers.append(weakref.ref(optimizer, _noting(self._dead, "optimizer", k)))
        self._optimizer_of[id(optimizer)] = k
        self._optimizer_id.append(id(optimizer))
        self._optimizer_roots.append(None)
        self.history.facts.setdefault("optimizers", []).append(_optimizer_facts(optimizer))
        return True

    def optimizer_roots_unknown(self, optimizer: torch.optim.Optimizer) -> bool:
        k = self._optimizer_of.get(id(optimizer))
        return k is not None and self._optimizer_roots[k] is None

    def note_optimizer_roots(self, optimizer: torch.optim.Optimizer) -> None:
        """Which roots an optimizer trains (once its first step has shown its models)."""
        k = self._optimizer_of.get(id(optimizer))
        if k is None:
            return
        roots = sorted({self.history.layers[self.slot_layer[s]].root
                        for g in optimizer.param_groups for p in g["params"]
                        if (s := self._slot_of.get(id(p))) is not None})
        self._optimizer_roots[k] = roots

    # ------------------------------------------------------------------ lookups
    def optimizer_index(self, optimizer: torch.optim.Optimizer) -> int:
        """The optimizer's index in ``facts.optimizers``, -1 if it is not tracked."""
        return self._optimizer_of.get(id(optimizer), -1)

    @property
    def optimizers(self) -> int:
        """How many optimizers were seen (alive or not)."""
        return len(self._optimizers)

    def module_name(self, module: nn.Module) -> str | None:
        """The module's path inside its root ("" for the root itself, unless the root was
        added with a prefix), None if not watched."""
        return self._module_name.get(id(module))

    def layer_of_module(self, module: nn.Module) -> int | None:
        return self._module_layer.get(id(module))

    def root_of_module(self, module: nn.Module) -> int | None:
        return self._root_of.get(id(module))

    def is_root(self, module: nn.Module) -> bool:
        return id(module) in self._root_of

    def tracks(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._slot_of

    def owns_params_of(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self._slot_of for g in optimizer.param_groups for p in g["params"])

    def slot(self, tensor: torch.Tensor) -> int | None:
        return self._slot_of.get(id(tensor))

    @property
    def slots(self) -> int:
        return len(self._slots)

    def params(self) -> list[torch.Tensor | None]:
        """The tracked parameter of every slot (None where it is gone)."""
        return [None if ref is None else ref() for ref in self._slots]

    def param(self, slot: int) -> torch.Tensor | None:
        """The parameter of one slot, None where it is gone."""
        ref = self._slots[slot] if slot < len(self._slots) else None
        return None if ref is None else ref()

    def layer_params(self, layer: int) -> list[torch.Tensor]:
        """The live parameters of one layer, in the order of its ``param_names``."""
        return [p for ref, owner in zip(self._slots, self.slot_layer, strict=True)
                if owner == layer and ref is not None and (p := ref()) is not None]

    def live_roots(self) -> list[tuple[int, nn.Module]]:
        return [(r, m) for r, ref in enumerate(self._roots)
                if ref is not None and (m := ref()) is not None]

    # ------------------------------------------------------------------ deaths
    def reap(self) -> None:
        """Forget what died since the last call, so that its ``id`` can be reused."""
        while self._dead:
            what, index = self._dead.pop()
            if what == "root":
                self._forget_root(index)
            elif what == "slot":
                self._forget_slot(index)
            elif self._optimizers[index] is not None:
                self._optimizers[index] = None
                _drop(self._optimizer_of, self._optimizer_id[index], index)

    def _forget_root(self, root: int) -> None:
        if self._roots[root] is None:
            return
        for listener in self.root_gone:
            listener(root)
        self._roots[root] = None
        _drop(self._root_of, self._root_id[root], root)
        for mid in self._root_modules[root]:
            self._module_layer.pop(mid, None)
            self._module_name.pop(mid, None)
        self._root_modules[root] = []
        for p in self._root_params[root]:
            slot = self._slot_of.get(id(p))
            if slot is not None:
                self._forget_slot(slot)
        self._root_params[root] = []

    def _forget_slot(self, slot: int) -> None:
        if self._slots[slot] is None:
            return
        self._slots[slot] = None
        self.dead_slots += 1
        _drop(self._slot_of, self._slot_id[slot], slot)

    def compact(self) -> list[int] | None:
        """Drop dead slots once they are many; returns the kept slots' old indices, or
        None when nothing changed (the device buffers are then sized as before)."""
        if self.dead_slots < max(64, len(self._slots) // 2):
            return None
        params = self.params()  # strong references for the duration: none dies midway
        kept = [s for s, p in enumerate(params) if p is not None]
        self.slot_layer = [self.slot_layer[s] for s in kept]
        self.slot_name = [self.slot_name[s] for s in kept]
        live = [params[s] for s in kept]
        self._slot_id = [id(p) for p in live]
        self._slot_of = {id(p): s for s, p in enumerate(live)}
        # New weakrefs: the callbacks of the old ones name the old slot indices.
        self._dead[:] = [d for d in self._dead if d[0] != "slot"]
        self._slots = [weakref.ref(p, _noting(self._dead, "slot", s))
                       for s, p in enumerate(live)]
        self.dead_slots = 0
        return kept

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """Facts that need the live objects, then drop every reference."""
        self.reap()
        for r, module in self.live_roots():
            self.history.facts.setdefault("module", {})[str(r)] = \
                structure.module_facts([module])
        for ref in self._optimizers:
            optimizer = ref() if ref is not None else None
            if optimizer is not None:
                self.note_optimizer_roots(optimizer)
        self.history.facts["optimizer_roots"] = [r or [] for r in self._optimizer_roots]
        for root in range(len(self._roots)):
            if self._roots[root] is not None:
                for listener in self.root_gone:
                    listener(root)
        self._slots, self._roots, self._optimizers = [], [], []
        self._slot_of, self._root_of, self._optimizer_of = {}, {}, {}
        self._slot_id, self._root_id, self._optimizer_id = [], [], []
        self._root_params, self._root_modules = [], []
        self._module_layer, self._module_name = {}, {}
        self._dead.clear()
        self.root_gone = []

    def init_scales(self) -> None:
        """Each layer's initial weight std against the init its activation calls for."""
        for layer in self.history.layers:
            if layer.init_weight_std is None or not layer.fan_in:
                continue
            act = layer.activation
            family = structure.recommended_init(act)
            gain = structure.activation_gain(act)
            target = gain / math.sqrt(layer.fan_in) if family == "kaiming" else \
                gain * math.sqrt(2.0 / (layer.fan_in + (layer.fan_out or 0)))
            layer.init_scale = {"std": layer.init_weight_std, "recommended_std": target,
                                "ratio": layer.init_weight_std / target, "family": family,
                                "activation": act or "unknown"}


def _freed(t: torch.Tensor) -> bool:
    """A tensor whose storage was released (FSDP2's unsharded parameters between forwards):
    reading it would crash; it is the sharded parameter the layer already tracks."""
    try:
        return t.numel() > 0 and t.untyped_storage().nbytes() == 0
    except Exception:  # no storage at all (a DTensor or tensor subclass): read its parts
        return False


def _drop(index: dict[int, int], key: int, value: int) -> None:
    """Remove ``key`` unless its id already belongs to a newer object."""
    if index.get(key) == value:
        del index[key]


def _noting(dead: list[tuple[str, int]], what: str, index: int) -> Callable[[Any], None]:
    """A weakref callback that notes a death; it runs wherever the object dies (even
    inside the garbage collector), so it only appends."""

    def note(_: Any) -> None:
        dead.append((what, index))

    return note


def _optimizer_facts(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    groups = []
    for g in optimizer.param_groups:
        lr = g.get("lr")
        groups.append({"lr": float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None,
                       "momentum": g.get("momentum", g.get("betas")),
                       "weight_decay": g.get("weight_decay"),
                       "params": sum(p.numel() for p in g["params"])})
    return {"type": type(optimizer).__name__, "groups": groups}
