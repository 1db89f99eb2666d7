"""``gradwatch run``: an unmodified script as ``__main__`` under process-wide hooks."""

from __future__ import annotations

import os
import runpy
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from .measure.distributed import unwrap_parallel
from .measure.extension import Extension
from .measure.monitor import Monitor, Options
from .measure.probes import INTERCEPTOR, GlobalProbes, Handles, unwrap_compiled
from .report import Report, build_report
from .thresholds import Thresholds
from .watch import default_extensions

__all__ = ["Control", "RunResult", "StopRun", "run_script"]

_COMPILE_HOOK_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"


class StopRun(BaseException):
    """Raised inside the script to end a run cleanly (a ``--verify`` re-run at its step
    budget); a BaseException so that the script's own ``except Exception`` does not
    swallow it. The run counts as completed."""


class Control(Protocol):
    """Something that steers a run from outside (``verify.child.ChildControl``,
    ``verify.fix.FixControl``): global hooks registered around gradwatch's own, and what it
    did, for the report."""

    def attach_first(self, handles: Handles, monitor: Monitor) -> None:
        """Register hooks that must run before gradwatch's (change the model first)."""

    def attach_last(self, handles: Handles) -> None:
        """Register hooks that must run after gradwatch's (the stopping step committed)."""

    def summary(self) -> dict[str, Any]:
        """What it did: sections added to the report (``{"applied": {...}}``)."""


class RunResult:
    """The script's exit status and gradwatch's report of its run.

    ``report`` is None in a process the script forked (``os.fork()``) that ended while
    running the script: the run and its report belong to the process that started it.
    """

    def __init__(self, exit_code: int, report: Report | None) -> None:
        self.exit_code, self.report = exit_code, report


def _main_namer() -> Any:
    """Name objects after the running script's own global variables (``model_relu``), or
    their place in a global list, tuple or dict (``Ws[0]``)."""

    def name_of(obj: Any) -> str | None:
        main = sys.modules.get("__main__")
        namespace = getattr(main, "__dict__", {})
        direct: str | None = None
        held: str | None = None
        for key, value in list(namespace.items()):
            if key.startswith("_"):
                continue
            if value is obj:
                direct = direct or key
            elif held is None and isinstance(value, (list, tuple)):
                held = next((f"{key}[{i}]" for i, v in enumerate(value) if v is obj), None)
            elif held is None and isinstance(value, dict):
                held = next((f"{key}[{k!r}]" for k, v in value.items() if v is obj), None)
        # A one-letter global holding a tensor that also sits in a list is most likely a
        # loop variable (``for W in Ws``): the list entry names it better.
        if direct is not None and (len(direct) > 1 or held is None):
            return direct
        return held

    return name_of


def _main_models(untracked: set[int]) -> list[tuple[str, nn.Module]]:
    """The script's global models that own parameters with these ids (largest first, each
    adding some not covered yet): models an optimizer steps whose forward gradwatch never
    saw (``model.compile()`` runs it inside the compiled code only)."""
    namespace = getattr(sys.modules.get("__main__"), "__dict__", {})
    found: list[tuple[int, str, nn.Module]] = []
    for key, value in list(namespace.items()):
        if key.startswith("_") or not isinstance(value, nn.Module):
            continue
        module = unwrap_compiled(unwrap_parallel(value))
        hits = sum(id(p) in untracked for p in module.parameters())
        if hits:
            found.append((hits, key, module))
    out: list[tuple[str, nn.Module]] = []
    left = set(untracked)
    for _, key, module in sorted(found, key=lambda f: -f[0]):
        ids = {id(p) for p in module.parameters()} & left
        if ids:
            out.append((key, module))
            left -= ids
    return out


def run_script(script: str | os.PathLike[str], args: Sequence[str] = (),
               options: Options | None = None,
               thresholds: Thresholds | None = None,
               control: Control | None = None,
               extensions: Sequence[Extension] = ()) -> RunResult:
    """Run ``script`` with ``args`` as ``__main__``, watching every model and optimizer.

    Returns the script's own exit status (0, its ``sys.exit`` code, 1 when it raised,
    130 on KeyboardInterrupt) and the report, which exists in every case. ``control``
    (a ``--verify`` re-run) applies a remedy and may stop the script early: that run
    counts as completed, and its report says what was applied under ``"applied"``.
    ``extensions`` are measured besides the default ones (the loggers of ``--tensorboard``
    and co.; the caller hands them the final report).
    """
    path = Path(script)
    if path.is_dir() and not (path / "__main__.py").is_file():
        raise FileNotFoundError(f"{path} is a folder without a __main__.py: give the training "
                                f"script (a .py file) to run")
    if not path.exists():
        raise FileNotFoundError(f"no such training script: {path}")
    started_in = os.getpid()
    monitor = Monitor(options, thresholds, discover=True,
                      extensions=[*default_extensions(), *extensions])
    monitor.watched.namer = _main_namer()
    monitor.models_of = _main_models
    handles = Handles()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    status, error, code = "completed", None, 0
    try:
        if control is not None:
            control.attach_first(handles, monitor)  # before GlobalProbes: change, then adopt
        GlobalProbes(monitor, handles, monitor.watched.namer)
        if control is not None:
            control.attach_last(handles)  # after GlobalProbes: the last step is committed
        handles.add(INTERCEPTOR.register(monitor))
        sys.argv = [str(path), *args]
        sys.path.insert(0, str(path.resolve() if path.is_dir() else path.resolve().parent))
        with warnings.catch_warnings():
            # torch warns at every call of a torch.compile wrapper while global module
            # hooks exist: they are gradwatch's, which already ignores that extra call.
            warnings.filterwarnings("ignore", message=_COMPILE_HOOK_WARNING,
                                    category=UserWarning)
            runpy.run_path(str(path), run_name="__main__")
    except StopRun:
        pass  # a --verify re-run reached its step budget (or its remedy could not apply)
    except SystemExit as exc:
        code = _exit_code(exc.code)
        if code:
            status, error = "failed", f"SystemExit: {exc.code}"
    except KeyboardInterrupt:
        status, error, code = "interrupted", "KeyboardInterrupt", 130
    except BaseException as exc:
        traceback.print_exc()
        status, error, code = "failed", f"{type(exc).__name__}: {exc}", 1
    finally:
        sys.argv[:], sys.path[:] = saved_argv, saved_path
        handles.remove()
        monitor.close(status, error)
    if os.getpid() != started_in:
        return RunResult(code, None)  # a forked child: the parent reports the run
    report = build_report(monitor)
    if control is not None:
        report = Report({**report.to_dict(), **control.summary()})
    return RunResult(code, report)


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
