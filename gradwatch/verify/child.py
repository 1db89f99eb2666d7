"""What runs inside a ``--verify`` re-run: the remedies applied to the script's live model
and optimizer, and the stop after the step budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.optim import optimizer as optimizer_hooks

from ..judge.registry import run_detectors
from ..measure.probes import compiling, unwrap_compiled
from ..remedies import CATALOGUE
from ..remedies.base import NotApplicable, run_added_pre_hooks
from ..runner import StopRun
from .settle import Settle, Settler

__all__ = ["ChildControl", "StopRun"]


class ChildControl:
    """Apply remedies to an unmodified script and stop it after ``max_steps`` steps.

    ``remedies`` are ``(id, params)`` pairs applied in order: usually one, two when a
    combination is verified (a re-initialisation and a lower learning rate). Global hooks,
    like :class:`~gradwatch.measure.probes.GlobalProbes`: :meth:`attach_first` is called before
    GlobalProbes registers (so that the model is changed before gradwatch adopts it, and the
    optimizer before gradwatch reads its learning rate), :meth:`attach_last` after (so that
    the stopping step is committed to the report first).
    """

    def __init__(self, remedies: Sequence[tuple[str, dict[str, Any]]],
                 max_steps: int | None, settle: Settle | None = None) -> None:
        self.remedies = [(rid, dict(params or {})) for rid, params in remedies]
        self.max_steps = max_steps
        self.settler = Settler(settle) if settle is not None else None
        self.changes: list[str] = []
        self.status = "not_reached" if self.remedies else "none"
        self.error: str | None = None
        self.steps = 0
        self._depth = 0
        self._monitor: Any = None
        self._model: nn.Module | None = None
        self._model_done = False
        self._optimizers: set[int] = set()
        self._deferred: list[tuple[Any, dict[str, Any], torch.optim.Optimizer]] = []
        self._appliers: list[tuple[Any, dict[str, Any]]] = []
        self._done: set[str] = set()  # ids of the remedies that changed something
        self._process: list[tuple[str, Any]] = []  # (id, ProcessChange) of to_process ones
        if self.remedies:
            for rid, params in self.remedies:
                applier = CATALOGUE.get(rid)
                if applier is None:
                    self.status, self.error = "not_applicable", \
                        f"gradwatch cannot apply {rid!r} itself"
                    self._appliers = []
                    break
                self._appliers.append((applier, params))

    @property
    def remedy_id(self) -> str | None:
        """The remedies' ids joined by "+" (None without a remedy)."""
        return "+".join(rid for rid, _ in self.remedies) or None

    def attach_first(self, handles: Any, monitor: Any = None) -> None:
        """Register the hooks that change the model and optimizer; ``monitor`` counts the
        steps of a script that updates its weights by hand."""
        self._monitor = monitor
        if monitor is not None:
            monitor.step_listeners.append(self._committed)
        handles.add(module_hooks.register_module_forward_pre_hook(self._pre))
        handles.add(module_hooks.register_module_forward_hook(self._post, always_call=True))
        handles.add(optimizer_hooks.register_optimizer_step_pre_hook(self._step_pre))
        for applier, params in self._appliers if self._live() else []:
            if applier.to_process is None:
                continue
            try:
                change = applier.to_process(params)
            except Exception as exc:
                self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
                return
            self._process.append((applier.id, change))
            handles.add(change)  # undone when the script has ended
            self.status = "applied"

    def attach_last(self, handles: Any) -> None:
        handles.add(optimizer_hooks.register_optimizer_step_post_hook(self._step_post))

    def _live(self) -> bool:
        return bool(self._appliers) and self.status in ("not_reached", "applied")

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, NotApplicable):
            self.status, self.error = "not_applicable", str(exc)
        else:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
        raise StopRun from exc

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if compiling():
            return None
        module = unwrap_compiled(module)
        depth, self._depth = self._depth, self._depth + 1
        if depth or self._model_done or not self._live():
            return None
        if not any(p.requires_grad for p in module.parameters()):
            return None
        # The script's first model with trainable parameters, called from outside any other
        # module: the one GlobalProbes adopts as a root right after this hook.
        self._model_done, self._model = True, module
        before = set(module._forward_pre_hooks)
        touched = False
        first = args[0] if args else None
        for applier, params in self._appliers:
            if applier.to_model is None:
                continue
            if isinstance(first, torch.Tensor):
                # What the first call feeds the model: some remedies choose by it (LayerNorm
                # rather than BatchNorm for (batch, time, features) inputs).
                params.setdefault("input_shape", list(first.shape))
            try:
                applier.to_model(module, params, self.changes)
            except Exception as exc:
                self._depth -= 1
                self._fail(exc)
            touched = True
            self._done.add(applier.id)
        if not touched:
            return None
        self.status = "applied"
        # Pre-hooks the remedy added (input standardisation, eval for no-grad forwards)
        # would only run from the next call on: run them on this first call too.
        return run_added_pre_hooks(module, before, args)[0]

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not compiling():
            self._depth = max(0, self._depth - 1)

    def _step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._optimizers or not self._live():
            return
        self._optimizers.add(id(optimizer))
        for applier, params in self._appliers:
            if applier.to_optimizer is None:
                continue
            if applier.after_first_step:
                self._deferred.append((applier, params, optimizer))
                continue
            try:
                applier.to_optimizer(optimizer, self._model, params, self.changes)
            except Exception as exc:
                self._fail(exc)
            self._done.add(applier.id)
        self.status = "applied"

    def _committed(self, monitor: Any) -> None:
        """After gradwatch closed a step: stop a re-run whose outcome is settled, and a
        script that updates its weights by hand at the budget (optimizer steps stop in
        :meth:`_step_post`)."""
        if self.settler is not None and self.status != "not_applicable" and \
                monitor.step % self.settler.rule.every == 0:
            monitor.flush()
            steps = monitor.history.steps
            losses = list(zip(steps.steps.tolist(),
                              [float(v) if v == v and abs(v) != float("inf") else None
                               for v in steps.block("loss")[:, 0].tolist()], strict=True))
            if self.settler.check(monitor.step, losses, lambda: self._problems(monitor)):
                raise StopRun
        if self.max_steps is not None and monitor.mode == "backward" and \
                monitor.step >= self.max_steps:
            raise StopRun

    @staticmethod
    def _problems(monitor: Any) -> set[str]:
        monitor.snapshot()
        findings, _ = run_detectors(monitor.history, monitor.thresholds)
        return {f.kind for f in findings if f.severity in ("warning", "error")}

    def _step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        deferred, self._deferred = self._deferred, []
        for applier, params, opt in deferred:
            try:
                applier.to_optimizer(opt, self._model, params, self.changes)
            except Exception as exc:
                self._fail(exc)
            self._done.add(applier.id)
            self.changes.append(f"({applier.id} took effect from step {self.steps} on: the "
                                "first step had already started)")
        if self.max_steps is not None and self.steps >= self.max_steps:
            raise StopRun

    def summary(self) -> dict[str, Any]:
        """What the child did, for the parent: the child's report's ``applied``."""
        steps = max(self.steps, int(getattr(self._monitor, "step", 0) or 0))
        for rid, change in self._process:
            made = change.changes()
            if made:
                self.changes += made
                self._done.add(rid)
            elif self.status == "applied":
                self.status, self.error = "not_applicable", \
                    f"{rid}: the script never ran an operation it has a safe form for"
        self._process = []
        applied = {
            "remedy": self.remedy_id,
            "remedies": [{"id": rid, "params": params} for rid, params in self.remedies],
            "status": self.status, "changes": list(self.changes), "error": self.error,
            "not_reached": [rid for rid, _ in self.remedies if rid not in self._done],
            "steps": steps, "max_steps": self.max_steps,
            "settled": self.settler.reason if self.settler is not None else None}
        return {"applied": applied}
