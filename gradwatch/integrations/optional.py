"""The optional packages the integrations use, imported in one place: a missing one is a
clear error naming the ``pip install gradwatch[extra]`` that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "require"]

EXTRAS: dict[str, str] = {
    "lightning": "lightning",
    "transformers": "transformers",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
}
"""Importable package -> the gradwatch extra that installs it."""


class MissingExtra(ImportError):
    """An integration was used without the package it needs."""


def require(package: str, used_by: str) -> ModuleType:
    """Import ``package`` for ``used_by`` (an integration's name), or raise
    :class:`MissingExtra` saying which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        extra = EXTRAS.get(package.split(".")[0], package.split(".")[0])
        raise MissingExtra(
            f"{used_by} needs the package {package.split('.')[0]!r}, which is not installed: "
            f"pip install 'gradwatch[{extra}]'") from exc
