"""Long-running loops (the dispatcher, the inbox consumer, maintenance): restart with
backoff, never die, and beat a heartbeat file that ``outbox-bridge health --live`` reads."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .config import Settings
from .db import is_transient

log = logging.getLogger(__name__)

FIRST_DELAY = 0.5
MAX_DELAY = 10.0  # an idle reconnect costs little; a silent network ends sooner
HEALTHY_AFTER = 60.0  # a run this long was healthy: the next restart is quick again
BEAT_EVERY = 1.0  # seconds between touches of a loop's heartbeat file


def health_dir(settings: Settings) -> Path:
    if settings.health_dir:
        return Path(settings.health_dir)
    return Path(tempfile.gettempdir()) / f"outbox-bridge-health-{settings.schema}"


class Heartbeat:
    """The heartbeat file of one loop: ``beat()`` as often as you like."""

    def __init__(self, settings: Settings, name: str):
        self.path = health_dir(settings) / name
        self.last = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if now - self.last < BEAT_EVERY:
            return
        self.last = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError:
            pass  # a read-only disk must not stop the loop; the probe then says so

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def run_forever(
    body: Callable[[threading.Event], None],
    stop: threading.Event,
    what: str,
    heartbeat: Heartbeat | None = None,
) -> None:
    """Run ``body(stop)`` until ``stop`` is set; after an error, again with backoff
    (which starts over after a healthy run). ``heartbeat``: the loop's (``body``
    beats it), also beaten while it waits to reconnect (it is alive, its service
    is not), and removed when the loop ends."""
    try:
        _run(body, stop, what, heartbeat.beat if heartbeat else None)
    finally:
        if heartbeat is not None:
            heartbeat.remove()


def _run(body, stop: threading.Event, what: str, beat: Callable[[], None] | None) -> None:
    delay = FIRST_DELAY
    while not stop.is_set():
        started = time.monotonic()
        try:
            body(stop)
            return
        except Exception as exc:
            if time.monotonic() - started >= HEALTHY_AFTER:
                delay = FIRST_DELAY
            if is_transient(exc):
                log.warning(
                    "%s lost PostgreSQL (%s); reconnecting in %.1fs", what, str(exc).strip(), delay
                )
            else:
                log.exception("%s failed; restarting in %.1fs", what, delay)
        wait(stop, delay, beat)
        delay = min(delay * 2, MAX_DELAY)


def wait(stop: threading.Event | None, delay: float, beat: Callable[[], None] | None) -> None:
    """Wait ``delay`` seconds or until ``stop`` is set, beating the loop's heartbeat at
    least every second meanwhile: a loop that waits on purpose is alive."""
    if beat is None and stop is not None:
        stop.wait(delay)
        return
    until = time.monotonic() + delay
    while (stop is None or not stop.is_set()) and (left := until - time.monotonic()) > 0:
        if beat is not None:
            beat()
        if stop is None:
            time.sleep(min(1.0, left))
        else:
            stop.wait(min(1.0, left))


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
