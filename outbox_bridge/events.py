"""Events of the runtime, and the middleware that subscribes to them.

The core and the two sides say what happens (``emit``, ``around``,
``publishing``); integrations such as metrics and tracing subscribe, the way
dramatiq's middleware does, so that nothing in the runtime imports them. The
subscribers are the objects named in the setting ``outbox_bridge_middleware``
(dotted paths, ``module:attribute``; a class is instantiated once per process);
the ``dead`` event goes to the built-in ``message_dead`` signal and dead hook
first. A subscriber has a
method per event it wants (see ``Middleware``); an exception in one is logged
and changes nothing for the caller.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from typing import Any

from .config import get_settings

log = logging.getLogger(__name__)

# always there, whatever the setting says: the documented dead-message signal and hook
# (loaded when a message first becomes dead: a publishing process never needs Celery's)
BUILTIN = {"dead": "outbox_bridge.signals:DeadSignal"}


class Middleware:
    """The events a subscriber may take; each is optional (this class is a template).

    In the worker's main process: ``worker_starting(settings)`` before its pool
    starts, ``worker_started(settings)`` once it runs, ``worker_stopping()``,
    ``process_exited(pid)``; ``consumed(messages)`` (the inbox consumer stored a
    polled batch), ``pruned(n)``. In the process that did it: ``publishing(headers)
    -> headers`` (a message is written), ``sending(rows)`` and ``processing(message,
    handler)`` (context managers around a Kafka send and a handler call),
    ``delivered(rows, acked_at)``, ``counted(counter, queue, n)`` (counter: failed,
    retried, handled), ``batch(queue, n)``, ``handled_in(queue, seconds)`` and
    ``dead(message)`` (after the change committed). ``active()`` says whether the
    subscriber wants per-message events now (the handler loop skips their cost if
    none does).
    """


_loaded: tuple[tuple[str, ...], list[Any]] | None = None
_builtin: dict[str, Any] = {}


def subscribers() -> list[Any]:
    """The middleware of this process (loaded once per value of the setting)."""
    global _loaded
    names = tuple(get_settings().middleware)
    if _loaded is None or _loaded[0] != names:
        _loaded = (names, [s for s in map(_load, names) if s is not None])
    return _loaded[1]


def _builtin_for(event: str) -> list[Any]:
    path = BUILTIN.get(event)
    if path is None:
        return []
    if path not in _builtin:
        _builtin[path] = _load(path)
    return [] if _builtin[path] is None else [_builtin[path]]


def _load(path: str) -> Any:
    module, _, attribute = path.partition(":")
    try:
        found = importlib.import_module(module)
        for part in attribute.split(".") if attribute else ():
            found = getattr(found, part)
        return found() if isinstance(found, type) else found
    except Exception:  # noqa: BLE001 - a bad setting must not stop the caller
        log.exception("outbox_bridge_middleware %r cannot be loaded", path)
        return None


def emit(event: str, *args: Any) -> None:
    """Tell every subscriber that has a method ``event``."""
    for subscriber in _builtin_for(event) + subscribers():
        method = getattr(subscriber, event, None)
        if method is not None:
            try:
                method(*args)
            except Exception:  # noqa: BLE001
                log.exception("middleware %r failed on %s", subscriber, event)


@contextlib.contextmanager
def around(event: str, *args: Any) -> Iterator[None]:
    """Run the body inside the context managers that subscribers return for ``event``."""
    with contextlib.ExitStack() as stack:
        for subscriber in subscribers():
            method = getattr(subscriber, event, None)
            if method is not None:
                try:
                    stack.enter_context(method(*args))
                except Exception:  # noqa: BLE001
                    log.exception("middleware %r failed on %s", subscriber, event)
        yield


def publishing(headers: list[list[Any]]) -> list[list[Any]]:
    """The headers of a message being written, as the subscribers extend them."""
    for subscriber in subscribers():
        method = getattr(subscriber, "publishing", None)
        if method is not None:
            try:
                headers = method(headers)
            except Exception:  # noqa: BLE001
                log.exception("middleware %r failed on publishing", subscriber)
    return headers


def active() -> bool:
    """Whether some subscriber wants per-message events now."""
    return any(getattr(s, "active", lambda: False)() for s in subscribers())
