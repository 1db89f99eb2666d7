"""Which training framework drives the run: PyTorch Lightning or the Hugging Face Trainer.

Read from the call stack, never by importing either: only when one of their packages is
already loaded (``sys.modules``) are the frames above a hook searched for a ``self`` whose
class has a ``LightningModule`` (``lightning.pytorch`` / ``pytorch_lightning``) or a
``transformers`` ``Trainer`` in its MRO. What matters to a remedy is kept in
``history.facts["framework"]``: the framework's name, the LightningModule's class and the
Trainer settings it reads (clipping, accumulation, schedulers), or the ``TrainingArguments``
values (learning rate, clipping, warm-up, schedule, accumulation).

Under Lightning, ``training_step`` usually calls a submodule (``self.net(x)``), never the
LightningModule itself, so that submodule is the root gradwatch watches; :func:`lightning_owner`
gives its path inside the LightningModule, so that its layers are named by their module
path (``net.3``) as when the LightningModule's own forward runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

from torch import nn

__all__ = ["detect", "hf_trainer", "lightning_facts", "lightning_owner", "note",
           "transformers_facts"]

_LIGHTNING = ("lightning.pytorch", "pytorch_lightning")
_TRANSFORMERS = ("transformers",)
#: Frames searched above the hook: a forward inside training_step, an optimizer step
#: inside LightningModule.optimizer_step or the Hugging Face training loop, are far closer.
_DEPTH = 80


def _loaded(packages: tuple[str, ...]) -> bool:
    return any(name in sys.modules for name in packages)


def _has_class(obj: Any, class_name: str, packages: tuple[str, ...]) -> bool:
    """``obj``'s class or a base is ``class_name`` from one of ``packages``."""
    for cls in type(obj).__mro__:
        if cls.__name__ == class_name and \
                str(getattr(cls, "__module__", "")).startswith(packages):
            return True
    return False


def is_lightning_module(obj: Any) -> bool:
    return _has_class(obj, "LightningModule", _LIGHTNING)


def _is_hf_trainer(obj: Any) -> bool:
    return _has_class(obj, "Trainer", _TRANSFORMERS)


def _selves(frame: FrameType | None) -> Iterator[Any]:
    """The ``self`` of each method running in the frames from ``frame`` outwards."""
    for _ in range(_DEPTH):
        if frame is None:
            return
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            obj = frame.f_locals.get("self")
            if obj is not None:
                yield obj
        frame = frame.f_back


def lightning_owner(module: nn.Module, frame: FrameType | None = None
                    ) -> tuple[nn.Module, str] | None:
    """The LightningModule running up the stack that holds ``module`` as a submodule, and
    the submodule's path in it; None outside Lightning."""
    if not _loaded(_LIGHTNING):
        return None
    try:
        for obj in _selves(frame or sys._getframe(1)):
            if obj is not module and is_lightning_module(obj):
                for path, sub in obj.named_modules():
                    if sub is module and path:
                        return obj, path
                return None
    except Exception:  # a module that cannot be walked: named as in a plain script
        return None
    return None


def detect(frame: FrameType | None = None) -> dict[str, Any] | None:
    """The framework running up the stack, as facts (see the module's docstring)."""
    if not (_loaded(_LIGHTNING) or _loaded(_TRANSFORMERS)):
        return None
    for obj in _selves(frame or sys._getframe(1)):
        if is_lightning_module(obj):
            return lightning_facts(obj)
        if _is_hf_trainer(obj):
            return transformers_facts(obj)
    return None


def hf_trainer(frame: FrameType | None = None) -> Any | None:
    """The Hugging Face ``Trainer`` whose method runs up the stack (a callback's caller),
    or None."""
    if not _loaded(_TRANSFORMERS):
        return None
    return next((obj for obj in _selves(frame or sys._getframe(1)) if _is_hf_trainer(obj)),
                None)


def note(facts: dict[str, Any], frame: FrameType | None = None) -> None:
    """Record the framework in ``facts["framework"]`` (a later reading, with the optimizer
    created, replaces an earlier one of the same framework)."""
    try:
        found = detect(frame or sys._getframe(1))
    except Exception:  # a framework object that cannot be read: plain remedies then
        return
    old = facts.get("framework")
    if found is not None and (old is None or old.get("name") == found["name"]):
        facts["framework"] = found


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def lightning_facts(module: Any) -> dict[str, Any]:
    """``facts["framework"]`` of a LightningModule and the Trainer attached to it."""
    cls = type(module)
    package = next((p for p in _LIGHTNING for c in cls.__mro__
                    if c.__name__ == "LightningModule" and c.__module__.startswith(p)),
                   _LIGHTNING[0])
    facts: dict[str, Any] = {
        "name": "lightning", "package": package, "module_class": cls.__name__,
        "automatic_optimization": bool(getattr(module, "automatic_optimization", True)),
        "lr_attribute": None}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        facts["trainer"] = {
            "gradient_clip_val": _number(getattr(trainer, "gradient_clip_val", None)),
            "gradient_clip_algorithm": _text(getattr(trainer, "gradient_clip_algorithm", None)),
            "accumulate_grad_batches": _number(getattr(trainer, "accumulate_grad_batches",
                                                       None))}
        try:
            configs = list(getattr(trainer, "lr_scheduler_configs", None) or [])
        except Exception:  # a trainer property that needs a strategy not set up yet
            configs = []
        facts["schedulers"] = [{"type": type(getattr(c, "scheduler", None)).__name__,
                                "interval": _text(getattr(c, "interval", None))}
                               for c in configs]
        try:
            optimizers = list(getattr(trainer, "optimizers", None) or [])
        except Exception:
            optimizers = []
        facts["optimizers"] = [type(getattr(o, "optimizer", o)).__name__ for o in optimizers]
        if optimizers:
            facts["lr_attribute"] = _lr_attribute(module, optimizers[0])
    return facts


def _lr_attribute(module: Any, optimizer: Any) -> str | None:
    """The attribute (or hyper-parameter) of the LightningModule that holds the rate its
    first optimizer started with, if any: where configure_optimizers read it."""
    groups = getattr(optimizer, "param_groups", None) or [{}]
    start = _number(groups[0].get("initial_lr", groups[0].get("lr")))
    if start is None:
        return None
    hparams = getattr(module, "_hparams", None)
    for name in ("lr", "learning_rate"):
        if _number(getattr(module, name, None)) == start:
            return f"self.{name}"
        if hparams is not None and _number(_get(hparams, name)) == start:
            return f"self.hparams.{name}"
    return None


def _get(mapping: Any, key: str) -> Any:
    try:
        return mapping.get(key)
    except Exception:
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    value = getattr(value, "value", value)  # an enum (SchedulerType, GradClipAlgorithmType)
    return str(value)


def transformers_facts(trainer: Any) -> dict[str, Any]:
    """``facts["framework"]`` of a Hugging Face Trainer: its ``TrainingArguments`` values."""
    args = getattr(trainer, "args", None)
    facts: dict[str, Any] = {"name": "transformers", "trainer_class": type(trainer).__name__,
                             "model_class": type(getattr(trainer, "model", None)).__name__}
    if args is not None:
        facts["args"] = {
            "learning_rate": _number(getattr(args, "learning_rate", None)),
            "max_grad_norm": _number(getattr(args, "max_grad_norm", None)),
            "warmup_steps": _number(getattr(args, "warmup_steps", None)),
            "warmup_ratio": _number(getattr(args, "warmup_ratio", None)),
            "lr_scheduler_type": _text(getattr(args, "lr_scheduler_type", None)),
            "gradient_accumulation_steps": _number(getattr(args, "gradient_accumulation_steps",
                                                           None)),
            "optim": _text(getattr(args, "optim", None))}
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is not None:
        facts["optimizers"] = [type(getattr(optimizer, "optimizer", optimizer)).__name__]
    return facts
