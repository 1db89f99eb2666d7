"""Remedies for the data: standardised inputs, checks for non-finite batches, anomaly mode."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import NotApplicable, RemedyEntry, fmt, number

__all__ = ["ENTRIES"]


def _standardize_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    mean, std = number(params, "mean"), number(params, "std")
    if not std > 0 or not math.isfinite(std) or not math.isfinite(mean):
        raise NotApplicable(f"the measured input std ({params.get('std')}) cannot scale the "
                            "inputs; standardise them in the data pipeline")

    def standardize(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return ((args[0] - mean) / std, *args[1:])
        return None

    model.register_forward_pre_hook(standardize, prepend=True)
    changes.append(f"standardise the model's first input before each forward: "
                   f"x -> (x - {fmt(mean)}) / {fmt(std)}")


def _assert_inputs_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                bad = int((~torch.isfinite(a)).sum())
                if bad:
                    raise ValueError(f"non-finite input batch: argument {i} of "
                                     f"{type(module).__name__} has {bad} NaN/Inf value(s) "
                                     f"of {a.numel()}; fix the data pipeline")

    model.register_forward_pre_hook(check, prepend=True)
    changes.append("check every floating-point input of the model before its forward; a "
                   "non-finite batch raises ValueError")


def _anomaly_model(model: nn.Module, params: dict[str, Any], changes: list[str]) -> None:
    torch.autograd.set_detect_anomaly(True)
    changes.append("turned on torch.autograd anomaly detection for this process (slow: the "
                   "backward that first makes NaN/Inf raises with the forward's traceback); "
                   "torch.autograd.set_detect_anomaly(False) turns it off")


ENTRIES = [
    RemedyEntry(
        "standardize_inputs",
        lambda p: (f"standardise the inputs (measured mean {p['mean']}, std {p['std']}) so that "
                   f"the first layer sees unit-scale features"),
        lambda p: (f"x = (x - {p['mean']}) / {p['std']}  # better: per-feature statistics "
                   "of the training set, x = (x - x_train.mean(0)) / x_train.std(0)"),
        to_model=_standardize_model),
    RemedyEntry(
        "assert_finite_inputs",
        lambda p: ("check every batch before the forward pass and fix the data pipeline "
                   "(missing values, division by a zero std in preprocessing, bad records)"),
        lambda p: ("assert torch.isfinite(x).all(), "
                   "f\"non-finite input batch: {(~torch.isfinite(x)).sum()} bad values\""),
        to_model=_assert_inputs_model,
        diagnostic=True),
    RemedyEntry(
        "detect_anomaly",
        lambda p: ("run a few steps with anomaly detection to get the traceback of the "
                   "operation that first produced NaN/Inf"),
        lambda p: ("with torch.autograd.detect_anomaly():\n"
                   "    loss = loss_fn(model(x), y)\n"
                   "    loss.backward()"),
        to_model=_anomaly_model,
        diagnostic=True),
]
