"""The numerically safe forms of operations that turn finite values into NaN/Inf.

One remedy, ``safe_ops``, run around the whole script: a ``TorchFunctionMode`` rewrites,
in the script's own code (not inside PyTorch), each call that has a safe form:

* ``log(softmax(x, dim))`` -> ``log_softmax(x, dim)`` and ``log(sigmoid(x))`` ->
  ``logsigmoid(x)``: the probabilities underflow to 0 where their logarithm would not;
* any other ``log(x)`` -> ``log(x.clamp_min(tiny))``: ``log(0)`` is ``-inf`` and its
  gradient infinite;
* ``sqrt(x)`` and ``x ** p`` with ``0 < p < 1`` -> the same of ``x.clamp_min(1e-12)``: their
  derivative at 0 is infinite (a distance to itself, a norm of zeros);
* ``a / b`` -> ``0`` where ``a`` and ``b`` are both exactly 0 (a mean over an empty
  selection), ``a / 0`` for non-zero ``a`` is left as it is;

and a ``DataLoader`` whose last batch would hold a single sample drops it
(``drop_last=True``): the std of one sample is NaN. Each rewrite is reported once per line
of the script, with how many calls it changed, so the re-run says which line to change.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils.data import BatchSampler, DataLoader
from torch.utils.weak import WeakIdKeyDictionary

from .base import ProcessChange, RemedyEntry

__all__ = ["ENTRIES", "SQRT_EPS"]

#: The least value ``sqrt`` and fractional powers see: sqrt(1e-12) = 1e-6, and values
#: at or above it are unchanged.
SQRT_EPS = 1e-12

_SOFTMAX = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax}
_SIGMOID = {torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, torch.special.expit}
_LOG = {torch.log, torch.Tensor.log}
_SQRT = {torch.sqrt, torch.Tensor.sqrt}
_POW = {torch.pow, torch.Tensor.pow, torch.Tensor.__pow__}
_DIV = {torch.div, torch.true_divide, torch.Tensor.div, torch.Tensor.true_divide,
        torch.Tensor.__truediv__}
_WATCHED = _SOFTMAX | _SIGMOID | _LOG | _SQRT | _POW | _DIV
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _caller() -> str | None:
    """``file:line`` of the script's code that made this call; None when the call comes
    from PyTorch itself (an optimizer's own division is no line of the script)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_OWN_DIR):
            frame = frame.f_back
            continue
        if name.startswith(_TORCH_DIR):
            # Dispatch wrappers between the script and the op; anything else is torch's own.
            if name.endswith(("overrides.py", "_tensor.py", os.sep + "functional.py")):
                frame = frame.f_back
                continue
            return None
        return f"{os.path.basename(name)}:{frame.f_lineno}"
    return None


def _dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs.get("dim", args[1] if len(args) > 1 else None)


class _SafeOps(TorchFunctionMode):
    """Rewrites the script's unsafe calls (see the module's docstring) and counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: dict[tuple[str, str], torch.Tensor] = {}
        self.order: list[tuple[str, str]] = []
        self.made: WeakIdKeyDictionary = WeakIdKeyDictionary()  # output -> ("softmax", x, dim)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            watched = func in _WATCHED
        except TypeError:  # an unhashable callable
            watched = False
        if not watched or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        x = args[0]
        if func in _SOFTMAX or func in _SIGMOID:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                self.made[out] = ("softmax", x, _dim(args, kwargs)) if func in _SOFTMAX \
                    else ("sigmoid", x, None)
            return out
        if not x.is_floating_point():
            return func(*args, **kwargs)
        site = _caller()
        if site is None:
            return func(*args, **kwargs)
        if func in _LOG:
            origin = self.made.get(x)
            if origin is not None and origin[0] == "softmax" and origin[2] is not None:
                self._count("log(softmax(x, dim)) -> log_softmax(x, dim)", site, x == 0)
                return F.log_softmax(origin[1], dim=origin[2])
            if origin is not None and origin[0] == "sigmoid":
                self._count("log(sigmoid(x)) -> logsigmoid(x)", site, x == 0)
                return F.logsigmoid(origin[1])
            tiny = torch.finfo(x.dtype).tiny
            self._count("log(x) -> log(x.clamp_min(tiny))", site, x < tiny)
            return torch.log(x.clamp_min(tiny))
        if func in _SQRT:
            self._count(f"sqrt(x) -> sqrt(x.clamp_min({SQRT_EPS:g}))", site, x < SQRT_EPS)
            return torch.sqrt(x.clamp_min(SQRT_EPS))
        if func in _POW:
            p = args[1] if len(args) > 1 else kwargs.get("exponent")
            if isinstance(p, (int, float)) and 0 < p < 1:
                self._count(f"x ** {p:g} -> x.clamp_min({SQRT_EPS:g}) ** {p:g}", site,
                            x < SQRT_EPS)
                return torch.pow(x.clamp_min(SQRT_EPS), p)
            return func(*args, **kwargs)
        # a division: 0 / 0 -> 0, where both are exactly zero
        den = args[1] if len(args) > 1 else kwargs.get("other")
        if not isinstance(den, torch.Tensor) or kwargs.get("rounding_mode") is not None:
            return func(*args, **kwargs)
        both = (den == 0) & (x == 0)
        self._count("a / b -> 0 where a and b are both 0", site, both)
        return torch.div(x, torch.where(both, torch.ones_like(den), den))

    def _count(self, what: str, site: str, changed: torch.Tensor) -> None:
        """Count the values this rewrite changed, on their device: read once, at the end,
        with no synchronisation per call."""
        key = (what, site)
        hits = changed.detach().sum()
        if key not in self.hits:
            self.hits[key] = hits
            self.order.append(key)
        else:
            self.hits[key] = self.hits[key] + hits.to(self.hits[key].device)

    def changes(self) -> list[str]:
        """The rewrites that changed any value, one per kind and line of the script."""
        out = []
        for key in self.order:
            n = int(self.hits[key])
            if n:
                out.append(f"{key[0]} at {key[1]} ({n} value(s) changed)")
        return out


class _SafeProcess(ProcessChange):
    """The mode entered for the whole script and the DataLoader patch, undone on remove."""

    def __init__(self) -> None:
        self.mode = _SafeOps()
        self.loaders: list[str] = []
        self._init = DataLoader.__init__
        original = self._init
        loaders = self.loaders

        @functools.wraps(original)
        def init(loader: DataLoader, *args: Any, **kwargs: Any) -> None:
            original(loader, *args, **kwargs)
            sampler = getattr(loader, "batch_sampler", None)
            try:
                size = len(loader.dataset)  # type: ignore[arg-type]
            except TypeError:
                return  # an iterable dataset: no length, no last batch to foresee
            if isinstance(sampler, BatchSampler) and not sampler.drop_last and \
                    sampler.batch_size > 1 and size % sampler.batch_size == 1:
                sampler.drop_last = True
                loaders.append(f"DataLoader at {_caller() or 'the script'}: its last batch "
                               f"held 1 of {size} samples (batch_size {sampler.batch_size}); "
                               f"drop_last=True")

        DataLoader.__init__ = init  # type: ignore[method-assign]
        self.mode.__enter__()

    def changes(self) -> list[str]:
        return ["computed in the safe form: " + c for c in self.mode.changes()] + \
            ["dropped the last batch of one sample: " + c for c in self.loaders]

    def remove(self) -> None:
        DataLoader.__init__ = self._init  # type: ignore[method-assign]
        stack = _get_current_function_mode_stack()
        if stack and stack[-1] is self.mode:  # never pop a mode the script left above it
            self.mode.__exit__(None, None, None)


ENTRIES = [
    RemedyEntry(
        "safe_ops",
        lambda p: ("compute the operations that produce NaN/Inf in their numerically safe "
                   "form: log_softmax for log(softmax(x)), logsigmoid for log(sigmoid(x)), a "
                   "floor under log and sqrt, 0 for 0/0 (an empty selection), and no last "
                   "batch of a single sample; --verify's re-run names the line of each "
                   "rewrite"),
        lambda p: ("import torch.nn.functional as F\n"
                   "out = model(x)\n"
                   "log_probs = F.log_softmax(out, dim=1)  # not torch.log(torch.softmax(out, 1))\n"
                   "log_p = F.logsigmoid(out)  # not torch.log(torch.sigmoid(out))\n"
                   "sq = ((out[:, None] - out[None]) ** 2).sum(-1)\n"
                   f"dist = torch.sqrt(sq.clamp_min({SQRT_EPS:g}))  # d sqrt(0) is inf\n"
                   "count = (y > 0).sum()\n"
                   "mean = (out * (y > 0)).sum() / count.clamp_min(1)  # count may be 0\n"
                   "# and DataLoader(..., drop_last=True) where the last batch holds 1 sample"),
        to_process=lambda params: _SafeProcess()),
]
