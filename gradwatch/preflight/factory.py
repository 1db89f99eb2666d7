"""What ``gradwatch check MODULE:FACTORY`` runs: the factory, imported, called, unpacked."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .batch import describe


class _TargetError(ImportError):
    """A target that cannot be imported, said in one line."""


def load_factory(module: str, factory: str) -> Callable[[], Any]:
    """``FACTORY`` of ``MODULE:FACTORY`` or ``FILE.py:FACTORY`` (``gradwatch check``).

    A module is imported like ``python -m`` does, from the current folder first; a file is
    imported with its folder on ``sys.path`` (so that its sibling imports work). Errors are
    one line: ``ImportError`` for what cannot be imported, ``LookupError`` for a missing or
    uncallable factory.
    """
    try:
        if module.endswith(".py") or os.sep in module or "/" in module:
            path = os.path.abspath(module)
            if not os.path.isfile(path):
                raise _TargetError(f"no such file: {module}")
            sys.path.insert(0, os.path.dirname(path))
            name = "_gradwatch_check_" + os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise _TargetError(f"cannot import {module} as Python code")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # dataclasses and pickling look their module up there
            spec.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                    raise _TargetError(f"no module named {module!r} (looked in the current "
                                      f"folder and on sys.path; give a file as "
                                      f"path/to/file.py:FACTORY)") from None
                raise
    except _TargetError:
        raise
    except Exception as exc:  # the user's module raised while being imported
        raise ImportError(f"importing {module} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = mod
    for part in factory.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise LookupError(f"{module} has no {factory!r}")
    if not callable(obj):
        raise LookupError(f"{module}:{factory} is a {type(obj).__name__}, not callable")
    return obj


def resolve_factory_result(factory: Callable[[], Any], name: str,
                           shape: tuple[int, ...] | None,
                           seed: int = 0) -> tuple[nn.Module, Any, Any]:
    """Call ``factory()`` (torch seeded with ``seed``) and return ``(model, batch, loss_fn)``.

    The factory returns a model, ``(model, example_batch)`` or ``(model, example_batch,
    loss_fn)``; for a bare model the batch is standard normal of ``shape`` (seed ``seed``)
    on the model's device and in its dtype.
    """
    torch.manual_seed(seed)  # the factory's init draws from it: reproducible predictions
    try:
        made = factory()
    except Exception as exc:
        raise ValueError(f"{name}() raised {type(exc).__name__}: {exc}") from exc
    if isinstance(made, nn.Module):
        if shape is None:
            raise ValueError(f"{name}() returned only a model: give --input-shape N,D,... (a "
                             f"standard normal batch) or return (model, example_batch) from it")
        param = next(made.parameters(), None)
        dtype = next((p.dtype for p in made.parameters() if p.is_floating_point()),
                     torch.float32)
        gen = torch.Generator().manual_seed(seed)
        batch = torch.randn(shape, generator=gen).to(
            device=param.device if param is not None else "cpu", dtype=dtype)
        return made, batch, None
    if isinstance(made, (tuple, list)) and len(made) in (2, 3) and isinstance(made[0], nn.Module):
        if shape is not None:
            raise ValueError(f"{name}() returns its own example batch: drop --input-shape")
        return made[0], made[1], made[2] if len(made) == 3 else None
    raise TypeError(f"{name}() must return an nn.Module, (model, example_batch) or (model, "
                    f"example_batch, loss_fn); got {describe(made)}")
