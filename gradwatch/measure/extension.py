"""The base of the monitor's forward-side extensions (activation sites, through time, eval mode).

An extension is handed to the :class:`~gradwatch.measure.monitor.Monitor` by whoever builds it
(``watch``, ``gradwatch run``), so that the monitor, one engine with one host copy, does not
depend on what its extensions measure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Extension"]


class Extension:
    """A measurement that plugs into the monitor's forward events, step clock and flush.

    An extension registers per-step device buffers with ``monitor.add_buffer``, writes its
    row (``monitor.row()``) on device, and reads the rows back in :meth:`on_flush`. Every
    method is called inside the monitor's guard: an exception disables measuring, never
    the user's run. The base class does nothing, so an extension overrides only what it
    needs. It must not keep a strong reference to a model (a root): models are held weakly
    so that a script can free them; :meth:`on_root_gone` says when one has died.
    """

    monitor: Any  # the Monitor it is bound to (typed loosely: the monitor imports this)

    def bind(self, monitor: Any) -> None:
        self.monitor = monitor

    def on_root_forward_pre(self, module: nn.Module, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> None:
        """A watched model's forward starts (with or without grad)."""

    def on_root_forward(self, module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any], output: Any) -> None:
        """A watched model's forward returned (``output`` is None when it raised)."""

    def on_backward_begin(self, loss: torch.Tensor) -> None:
        """``backward()`` is about to run on ``loss``: no optimizer has used it yet, so the
        weights are still those of the forward that made it."""

    def wants_layer_pre(self, module: nn.Module) -> bool:
        """Whether :meth:`on_layer_forward_pre` must see this layer's forward."""
        return False

    def on_layer_forward_pre(self, module: nn.Module, args: tuple[Any, ...]
                             ) -> tuple[Any, ...] | None:
        """A layer's forward starts; may return replacement positional arguments."""
        return None

    def on_rows(self, steps: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """The rows of a flush before ``History`` gets them (norms in device encoding: -1 =
        not measured); may change them in place (sharded norms made global)."""

    def on_flush(self, steps: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Committed rows of every buffer, on the host (extension buffers included)."""

    def on_snapshot(self) -> None:
        """The run goes on, but its findings are wanted now (a ``--fix`` check, a re-run's
        early stop, a report taken inside the with-block): write the facts that
        :meth:`on_root_gone` writes at the end, as they stand, keeping the state."""

    def on_root_gone(self, root: int) -> None:
        """Root ``root`` died (or the watch closes): turn what was kept about it into facts
        and drop it. Its parameters can still be read (``monitor.layer_params``)."""

    def finish(self) -> None:
        """The watch closes, after :meth:`on_root_gone` of every live root."""

    def on_report(self, report: Any) -> None:
        """The run is over and reported on (``report``, a ``Report``; None when the script
        never ran): called by ``watch`` when its block ends and by ``gradwatch run`` once its
        report is final, for the extensions passed as loggers (which publish it)."""
