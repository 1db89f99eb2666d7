"""Where re-runs and the restarted run come from: a process forked from ``gradwatch run``
before the script starts, with torch already imported, that imports the rest once and forks
one process per re-run on request (Linux). Elsewhere, the standard library's fork server.

Why not only the standard library's fork server: it starts a fresh interpreter that imports
torch again (1-2 s), on the cores the user's first run is using, and the first re-run waits
for it; forked from ``gradwatch run`` the server already has torch and needs only what torch
imports lazily. The standard library has no "fork a server from here" start method, so this
is the small one it needs: a pipe for requests, one ``os.fork`` per request.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PRELOAD", "Forked", "start", "start_server"]

#: What the server imports once for every re-run: gradwatch, and what torch imports only
#: when first used (an optimizer's constructor imports torch._dynamo: 1-2 s).
PRELOAD = ("gradwatch.verify.launch", "torch._dynamo", "torch.utils.data")
#: How often a waiting parent looks whether a forked process ended.
POLL_S = 0.02

_SERVER: list[Any] = []  # [] not started; [None] none here; [_Zygote] or [fork server ctx]
_LOCK = threading.Lock()


class Forked:
    """A process the zygote forked: ``is_alive``, ``join``, ``kill``, ``exitcode``, as a
    ``multiprocessing.Process`` has. It is the zygote's child, not ours: its exit status
    comes back in a file it writes as it exits (none when it was killed)."""

    def __init__(self, pid: int, status: Path) -> None:
        self.pid, self.status = pid, status
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        if self.exitcode is not None:
            return False
        try:
            os.kill(self.pid, 0)
            # A zombie still answers: the zygote reaps its children itself.
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                alive = f.read().split(b") ", 1)[-1][:1] != b"Z"
        except (ProcessLookupError, FileNotFoundError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            try:
                self.exitcode = int(self.status.read_text() or "1")
            except (OSError, ValueError):
                self.exitcode = -signal.SIGKILL
        return alive

    def join(self, timeout: float | None = None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (end is None or time.monotonic() < end):
            time.sleep(POLL_S if end is None else max(0.0, min(POLL_S, end - time.monotonic())))

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _Zygote:
    """Forked with ``os.fork`` itself, not as a ``multiprocessing.Process``: what it forks
    is nobody's daemonic child, so a script may start its own processes (DataLoader
    workers). It exits when the pipe closes, as this process ends."""

    def __init__(self) -> None:
        self.conn, theirs = multiprocessing.connection.Pipe()
        pid = os.fork()
        if pid == 0:
            self.conn.close()
            _serve(theirs)  # never returns
        theirs.close()
        self.pid = pid
        atexit.register(self.close)

    def start(self, target: Callable[..., Any], args: Sequence[Any], status: Path) -> Forked:
        with _LOCK:
            self.conn.send((target, tuple(args), str(status)))
            return Forked(self.conn.recv(), status)

    def close(self) -> None:
        self.conn.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(conn: Any) -> None:
    """The zygote: imports PRELOAD, then forks one process per request until the pipe
    closes (the parent ended)."""
    try:
        _loop(conn)
    finally:
        os._exit(0)


def _loop(conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the user's run
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # its children are reaped as they end
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # a torch without it: the re-run imports what it needs
            pass
    while True:
        try:
            target, args, status = conn.recv()
        except (EOFError, OSError):
            return
        pid = os.fork()
        if pid == 0:
            conn.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = 1
            try:
                target(*args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    Path(status).write_text(str(code))
                finally:
                    os._exit(code)
        conn.send(pid)


def start_server() -> None:
    """Start the server now, before the script runs (the zygote must be forked before the
    script's modules, threads and models exist; the fork server takes ``__main__`` as it
    is then): its imports overlap the first run instead of delaying the first re-run.
    None where ``GRADWATCH_VERIFY_SPAWN`` is set: re-runs start as ``python -m gradwatch
    run`` processes."""
    with _LOCK:
        if _SERVER:
            return
        if os.environ.get("GRADWATCH_VERIFY_SPAWN"):
            _SERVER.append(None)
            return
        if sys.platform.startswith("linux") and threading.active_count() == 1:
            try:
                _SERVER.append(_Zygote())
                return
            except (OSError, ValueError):
                pass
        try:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(list(PRELOAD))
            multiprocessing.forkserver.ensure_running()
        except (ValueError, AttributeError, OSError):
            context = None
        _SERVER.append(context)


def start(target: Callable[..., Any], args: Sequence[Any], status: Path) -> Any:
    """Start ``target(*args)`` in a fresh process forked from the server (started now if
    it was not): a handle with ``is_alive``, ``join``, ``kill`` and ``exitcode``; None when
    there is no server (the caller spawns ``python -m gradwatch run`` instead)."""
    start_server()
    server = _SERVER[0]
    if server is None:
        return None
    if isinstance(server, _Zygote):
        return server.start(target, args, status)
    process = server.Process(target=target, args=tuple(args), daemon=True)
    process.start()
    return process
