"""``gradwatch.watch``: attach to a model and optimizer, measure every step, report."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .measure.distributed import Distributed, unwrap_parallel
from .measure.extension import Extension
from .measure.extensions.activations import ActivationSites
from .measure.extensions.evalmode import EvalModeCheck
from .measure.extensions.nanorigin import NanOrigin
from .measure.extensions.recurrent import RecurrentGradients
from .measure.monitor import Monitor, Options
from .measure.probes import INTERCEPTOR, Handles, attach_model, attach_optimizer, unwrap_compiled
from .report import Report, build_report
from .thresholds import Thresholds, resolve_thresholds

__all__ = ["OPTION_NAMES", "Watch", "default_extensions", "watch"]

OPTION_NAMES = (*tuple(f.name for f in dataclasses.fields(Options)), "thresholds")


def default_extensions() -> list[Extension]:
    """The forward-side measurements every monitor gets: activation sites (dead and
    saturated units), the eval-mode check, gradients through time, where a NaN is born,
    and what the ranks of a distributed run combine."""
    return [ActivationSites(), EvalModeCheck(), RecurrentGradients(), NanOrigin(),
            Distributed()]


def _options(options: Mapping[str, Any]) -> tuple[Options, Thresholds]:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))} for "
                        f"gradwatch.watch; allowed: {', '.join(OPTION_NAMES)}")
    kwargs = {k: v for k, v in options.items() if k != "thresholds"}
    return Options(**kwargs), resolve_thresholds(None, options.get("thresholds"))


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    items = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for o in items:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, a list of them, or "
                            f"None (then call gw.step(loss) after backward()); got "
                            f"{type(o).__name__}")
    return items


class Watch:
    """Hooks on one model (and its optimizers) for the duration of a ``with`` block.

    Hooks attach when the watch is created and are removed on exit, also when the block
    raises (including KeyboardInterrupt). The watch keeps no reference to the model
    after exit.

    >>> import torch, gradwatch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
    >>> with gradwatch.watch(model, opt) as gw:
    ...     for _ in range(30):
    ...         opt.zero_grad()
    ...         torch.nn.functional.mse_loss(model(x), y).backward()
    ...         opt.step()
    >>> gw.report().run["steps"]
    30
    """

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                 options: Options, thresholds: Thresholds,
                 loggers: Sequence[Extension] = ()) -> None:
        self._loggers = list(loggers)
        self._final: Report | None = None  # the report the loggers got at close
        self.monitor = Monitor(options, thresholds,
                               extensions=[*default_extensions(), *self._loggers])
        self._handles = Handles()
        # torch.compile(model) returns a wrapper; its layers are those of the original,
        # whose own forward hooks never run: its losses cannot be told by output flags.
        model = unwrap_parallel(model)  # DistributedDataParallel: the module it trains
        compiled = model is not unwrap_compiled(model)
        model = unwrap_compiled(model)
        self.monitor.add_root(model, type(model).__name__)
        if compiled or getattr(model, "_compiled_call_impl", None) is not None:
            self.monitor.note_compiled(model)
        for opt in optimizers:
            if not self.monitor.watched.owns_params_of(opt):
                raise ValueError(f"the {type(opt).__name__} optimizer passed to watch() "
                                 f"updates none of the model's parameters; pass the "
                                 f"optimizer that trains this model")
        if optimizers:
            self.monitor.mode = "optimizer"  # steps are this optimizer's, from the start
        try:
            attach_model(self.monitor, model, self._handles)
            for opt in optimizers:
                attach_optimizer(self.monitor, opt, self._handles)
            self._handles.add(INTERCEPTOR.register(self.monitor))
            if not compiled:
                # Take only the losses whose gradient passes through this model's output.
                INTERCEPTOR.armed.add(id(self.monitor))
        except BaseException:
            self._handles.remove()
            raise
        self._closed = False

    def __enter__(self) -> Watch:
        if self._closed:
            raise RuntimeError("this watch is closed (its with block has ended): its hooks "
                               "are gone and it measures nothing more; start a new one with "
                               "gradwatch.watch(model, optimizer)")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted", "KeyboardInterrupt")
        elif issubclass(exc_type, SystemExit) and _exit_status(exc) == 0:
            self.close()  # sys.exit(0) ends the program successfully, the run included
        else:
            self.close("failed", f"{exc_type.__name__}: {exc}")

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Mark the end of a training step when no optimizer is watched (manual updates).

        Call it after ``backward()``; ``loss`` is the value to record for this step.
        """
        if loss is not None and not isinstance(loss, torch.Tensor):
            if isinstance(loss, bool) or not isinstance(loss, (int, float)):
                raise TypeError(f"gw.step(loss) takes a tensor or a number, got "
                                f"{type(loss).__name__}")
            loss = torch.tensor(float(loss))
        if self._closed:
            raise RuntimeError("gw.step() called after the watch was closed")
        self.monitor.on_explicit_step(loss)

    def close(self, status: str = "completed", error: str | None = None) -> None:
        """Remove every hook and finish measuring; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._handles.remove()
        if self.monitor.root_forwards == 0 and self.monitor.step > 0:
            # Every step ran, no forward of the model was seen: it runs compiled or only
            # through its submodules, and its forward-side measurements are missing.
            self.monitor.history.facts["forward_unseen"] = list(self.monitor.history.roots)
        self.monitor.close(status, error)
        if self._loggers:
            self._final = build_report(self.monitor)
            for logger in self._loggers:
                logger.on_report(self._final)

    @property
    def hooks(self) -> int:
        """Number of hooks currently attached (0 after exit)."""
        return len(self._handles)

    @property
    def steps(self) -> int:
        return self.monitor.step

    def report(self) -> Report:
        """Diagnose what was measured so far (the whole run once the block has exited)."""
        if not self._closed:
            self.monitor.snapshot()
        return self._final or build_report(self.monitor)


def _exit_status(exc: BaseException | None) -> int:
    """The process exit status a SystemExit stands for (``sys.exit()`` and ``sys.exit(0)``:
    0; a message: 1)."""
    code = getattr(exc, "code", None)
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def watch(model: nn.Module,
          optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer]
          | tuple[torch.optim.Optimizer, ...] | None = None, *,
          loggers: Sequence[Extension] = (), **options: Any) -> Watch:
    """Watch ``model`` (and the optimizer(s) that train it) until the ``with`` block ends.

    Options (all keyword): ``sync_every`` (steps per host copy, default 64),
    ``detail_every`` (weights/updates/activations every this many steps, default 16),
    ``overhead`` (gradwatch's share of the step it keeps to by stretching ``detail_every``
    on long runs, default 0.01; None: fixed),
    ``every`` (gradient norms every this many steps, default 1), ``capacity`` (rows kept
    per series), ``strict`` (raise gradwatch's own errors), ``thresholds`` (dict or
    :class:`~gradwatch.Thresholds` overriding the documented defaults). ``loggers``: where
    the run is also logged while it trains (``gradwatch.integrations``: ``TensorBoard``,
    ``WandB``, ``MLflow``); each gets the report when the block ends.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradwatch.watch expects a torch.nn.Module as its first argument, "
                        f"got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"the {type(model).__name__} model has no trainable parameters "
                         f"(none with requires_grad=True): there are no gradients to watch")
    opts, thresholds = _options(options)
    if isinstance(loggers, Extension):
        loggers = [loggers]
    for logger in loggers:
        if not isinstance(logger, Extension):
            raise TypeError(f"loggers takes gradwatch loggers (gradwatch.integrations: "
                            f"TensorBoard, WandB, MLflow), got {type(logger).__name__}")
    return Watch(model, _optimizers(optimizer), opts, thresholds, loggers)
