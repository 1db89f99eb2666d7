"""The guard around every hook body: a failure inside gradwatch never breaks the user's run."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["guarded"]

F = TypeVar("F", bound=Callable[..., Any])


def guarded(method: F) -> F:
    """Run a hook body so that a failure inside gradwatch never breaks the user's run.

    Deaths of watched objects are handled first, so that no hook mistakes a new object
    for a dead one that had the same ``id``. Once measuring has stopped, only the step
    clock goes on (the monitor's ``count_while_stopped``), so that the report still says
    how far the run went.
    """

    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            self.count_while_stopped(name)
            return None
        try:
            self.watched.reap()
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.fail(exc)
            if self.options.strict:
                raise
            return None

    return wrapper  # type: ignore[return-value]
