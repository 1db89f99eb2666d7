"""The guard around every hook body: a failure inside gradwatch never breaks the user's run."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["count_while_stopped", "guarded"]

F = TypeVar("F", bound=Callable[..., Any])


def guarded(method: F) -> F:
    """Run a hook body so that a failure inside gradwatch never breaks the user's run.

    Deaths of watched objects are handled first, so that no hook mistakes a new object
    for a dead one that had the same ``id``. Once measuring has stopped, only the step
    clock goes on (``count_while_stopped``), so that the report still says
    how far the run went. The outermost call is timed (``cadence.py``): gradwatch's
    own share of the step.
    """

    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            count_while_stopped(self, name)
            return None
        clock = self.cadence
        outer = not clock.depth
        if outer:
            clock.enter()
        clock.depth += 1
        try:
            self.watched.reap()
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.fail(exc)
            if self.options.strict:
                raise
            return None
        finally:
            clock.depth -= 1
            if outer:
                clock.leave()

    return wrapper  # type: ignore[return-value]


def count_while_stopped(monitor: Any, event: str) -> None:
    """After an internal error: keep counting the monitor's steps (nothing else), so that
    the report says how far the run went."""
    if event == "on_step_begin":
        monitor._in_step += 1
    elif event == "on_step_end":
        monitor._in_step = max(0, monitor._in_step - 1)
        if not monitor._in_step:
            monitor.step += 1
    elif event == "on_explicit_step" and monitor.mode != "optimizer":
        monitor.step += 1
    elif event == "on_backward_end" and monitor.mode == "backward":
        monitor.step += 1
