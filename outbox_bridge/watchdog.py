"""Deadlines for waits on PostgreSQL that the network may never end.

A peer that goes silent without closing the connection (a dropped route, a NAT
table flush, a paused VM) leaves a blocking read waiting for ever: libpq has no
deadline of its own, and TCP keepalives only help when nothing answers them
(a proxy or a load balancer in between answers them). So each piece of
outbox-bridge's own database work runs under ``guard(conn, seconds)``: when it
takes longer, a watchdog thread shuts the connection's socket down, the
blocked call fails as a lost connection (a transient error) and the loop or
task reconnects as after any other. User code (a handler's body) and waits on
Kafka run under ``paused()``: their time does not count.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CHECK_EVERY = 0.5


@dataclass
class _Watched:
    fd: int
    what: str
    seconds: float
    since: float  # monotonic, when the block (or its last paused part) began
    paused: bool = False


def _originals():
    """start_new_thread, allocate_lock and sleep as the OS gives them, even under
    gevent or eventlet: a blocked libpq call blocks the whole hub, so the
    watchdog must be a real thread beside it."""
    import _thread

    try:
        from gevent import monkey

        if monkey.is_module_patched("threading"):
            return (
                monkey.get_original("_thread", "start_new_thread"),
                monkey.get_original("_thread", "allocate_lock"),
                monkey.get_original("time", "sleep"),
            )
    except ImportError:
        pass
    try:
        from eventlet import patcher

        if patcher.is_monkey_patched("thread"):
            real = patcher.original("_thread")
            return real.start_new_thread, real.allocate_lock, patcher.original("time").sleep
    except ImportError:
        pass
    return _thread.start_new_thread, _thread.allocate_lock, time.sleep


_start_thread, _allocate_lock, _sleep = _originals()
_lock = _allocate_lock()
_watched: dict[int, _Watched] = {}
_ids = itertools.count()
_local = threading.local()
_started_in: int | None = None  # the pid whose watchdog thread runs
fired = 0  # connections shut down, for tests and logs
sweeps = 0  # looks at the watched connections, for tests: "it has looked since"


@contextmanager
def guard(conn: Any, seconds: float, what: str) -> Iterator[None]:
    """Shut ``conn``'s socket down if the block takes more than ``seconds``
    (not counting ``paused()`` parts). ``seconds <= 0``: no deadline."""
    if seconds <= 0 or conn is None or conn.closed:
        yield
        return
    _ensure_thread()
    key = next(_ids)
    entry = _Watched(conn.fileno(), what, seconds, time.monotonic())
    with _lock:
        _watched[key] = entry
    stack = _stack()
    stack.append(entry)
    try:
        yield
    finally:
        stack.pop()
        with _lock:  # after this no shutdown can reach the fd, which may be reused
            _watched.pop(key, None)


@contextmanager
def paused() -> Iterator[None]:
    """Inside ``guard``: this part's time does not count (user code, Kafka waits)."""
    stack = _stack()
    entry = stack[-1] if stack else None
    if entry is None or entry.paused:
        yield
        return
    entry.paused = True
    try:
        yield
    finally:
        entry.since, entry.paused = time.monotonic(), False


def _stack() -> list[_Watched]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _ensure_thread() -> None:
    global _started_in
    if _started_in == os.getpid():
        return
    with _lock:
        if _started_in == os.getpid():
            return
        _watched.clear()  # a forked child inherits its parent's entries, not its threads
        _started_in = os.getpid()
    _start_thread(_watch, ())


def _watch() -> None:
    global fired, sweeps
    while True:
        _sleep(CHECK_EVERY)
        now = time.monotonic()
        with _lock:
            sweeps += 1
            for key, entry in list(_watched.items()):
                if entry.paused or now - entry.since <= entry.seconds:
                    continue
                del _watched[key]
                _shut(entry.fd)
                fired += 1
                log.warning(
                    "%s: no answer from PostgreSQL in %.0fs; its connection is closed"
                    " and made again",
                    entry.what,
                    entry.seconds,
                )


def _shut(fd: int) -> None:
    """End the connection behind ``fd`` for whoever waits on it: shutdown wakes a
    blocked read with end of file, and leaves closing the fd to its owner."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()
