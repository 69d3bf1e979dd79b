"""Long-running loops (the watcher, the inbox consumer): restart with backoff, never die."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .db import TRANSIENT_ERRORS

log = logging.getLogger(__name__)


def run_forever(body: Callable[[threading.Event], None], stop: threading.Event, what: str) -> None:
    """Run ``body(stop)`` until ``stop`` is set; after an error, again with backoff."""
    delay = 0.5
    while not stop.is_set():
        try:
            body(stop)
            return
        except TRANSIENT_ERRORS as exc:
            log.warning("%s lost PostgreSQL (%s); reconnecting in %.1fs", what,
                        str(exc).strip(), delay)  # fmt: skip
        except Exception:
            log.exception("%s failed; restarting in %.1fs", what, delay)
        stop.wait(delay)
        delay = min(delay * 2, 30.0)


class LoopThread:
    """A loop in a daemon thread of its own, as the worker bootsteps run them."""

    def __init__(self, run: Callable[[threading.Event], None], name: str):
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=run, args=(self.stop_event,), name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
