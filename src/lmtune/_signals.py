"""SIGINT/SIGTERM as KeyboardInterrupt, but never in the middle of a call into the study's database.

A KeyboardInterrupt raised between a query and the fetch of its rows leaves that connection holding its SQLite
lock, and the next write (failing and re-queueing the interrupted trial) waits on it for good: CI saw
`lmtune tune` hang after a SIGTERM that landed while a trial recorded an attribute. So a signal that arrives
inside the database layer is held and sent again every ``_RETRY_S`` until it lands outside it; only a database
call stuck for ``_STUCK_S`` (a server gone away) is interrupted where it stands.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

# Code that runs with a database connection, a transaction or a storage lock held.
STORAGE_MODULES = ("sqlalchemy", "sqlite3", "optuna.storages", "psycopg2", "psycopg", "pymysql", "redis")
_RETRY_S = 0.05
_STUCK_S = 10.0


class _Held:
    """The signal held back, if any: one at a time, and more signals meanwhile change nothing.

    The lock makes "still held? then send it again" one step for the retry thread, so no copy is sent after the
    handler has raised the signal (a late copy would find the handlers restored and kill the process). Reentrant:
    the handler can run again, in the same thread, while it holds the lock.
    """

    signum: int | None = None
    since: float = 0.0
    resent: bool = False  # the next delivery is the retry thread's copy
    deferring: int = 0  # inside `deferred()`: every signal is held, as in database code
    lock = threading.RLock()


def in_storage(frame: FrameType | None) -> bool:
    """Whether ``frame`` or one of its callers runs database code."""
    while frame is not None:
        name = frame.f_globals.get("__name__") or ""
        if any(name == m or name.startswith(m + ".") for m in STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


def interrupt(signum: int, frame: FrameType | None) -> None:
    """Signal handler: raise KeyboardInterrupt, or, inside a database call, hold the signal until it returns."""
    with _Held.lock:
        resent, _Held.resent = _Held.resent, False
        if _Held.signum is not None:
            signum = _Held.signum
        elif resent:
            return  # a retry copy that arrived after the held signal was raised
        now = time.monotonic()
        if (_Held.deferring or in_storage(frame)) and (_Held.signum is None or now - _Held.since < _STUCK_S):
            if _Held.signum is None:
                _Held.signum, _Held.since = signum, now
                threading.Thread(target=_resend_while_held, name="lmtune-signal-retry", daemon=True).start()
            return
        _Held.signum = None
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _resend_while_held() -> None:
    while True:
        time.sleep(_RETRY_S)
        with _Held.lock:
            held = _Held.signum
            if held is None:
                return
            _Held.resent = True
            os.kill(os.getpid(), held)  # the handler runs again in the main thread, at its next instruction


def install(handler: Callable[[int, FrameType | None], Any]) -> dict[int, Any]:
    """Set ``handler`` for SIGINT and SIGTERM; the handlers it replaced, for :func:`restore`. Only the main
    thread can set handlers: elsewhere (a search running trials in threads) nothing changes."""
    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    return old


def holding() -> bool:
    """Whether a signal is held, or its retry copy is on its way: the next delivery belongs to :func:`interrupt`."""
    return _Held.signum is not None or _Held.resent


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the whole block, as if it were one database call: cleanup that must not stop half
    way (failing and re-queueing an interrupted trial) runs to its end, then the signal is raised."""
    _Held.deferring += 1
    try:
        yield
    finally:
        _Held.deferring -= 1


def restore(old: dict[int, Any]) -> None:
    """Put the handlers back; a signal still held (it came during the last database call) is raised now."""
    with _Held.lock:
        # Cleared first: `signal.signal` runs a pending copy's handler before it swaps, and that copy must find
        # nothing held (else it raises here and the old handlers never come back).
        held, _Held.signum, _Held.resent = _Held.signum, None, True
        try:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        finally:
            _Held.resent = False
    if held is not None:
        raise KeyboardInterrupt(signal.Signals(held).name)


class _StopRequest:
    """A stop asked for while training (the training loop's first SIGINT/SIGTERM): the loop acts on it before its
    next step; if the run ends first (its last evaluation, early stopping, a pruned trial), it stays here for
    the caller, so a search stops after that trial instead of starting the next one."""

    name: str | None = None


def request_stop(signum: int) -> None:
    _StopRequest.name = signal.Signals(signum).name


def stop_requested() -> str | None:
    """The signal that asked the run to stop, if one did and nobody has acted on it yet."""
    return _StopRequest.name


def take_stop_request() -> str | None:
    """The pending stop request, now acted on (cleared)."""
    name, _StopRequest.name = _StopRequest.name, None
    return name
