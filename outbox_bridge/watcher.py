"""The LISTEN watcher: turns commits into Celery publish tasks.

Commits wake it through NOTIFY while it is idle (the trigger skips NOTIFY while
it is dispatching, which keeps NOTIFY's global commit lock off the busy path).
NOTIFY is only a hint: it also looks for work when it starts, after each
reconnect, whenever a task gives its shard back, and on a fallback timer.
Several watchers may run at once: claims are taken with SKIP LOCKED.
"""

from __future__ import annotations

import logging
import select
import threading
import time

from celery import Celery

from .config import Settings
from .db import TRANSIENT_ERRORS, connect
from .queue import Queue

log = logging.getLogger(__name__)


class Watcher:
    """Dispatches claimed outbox shards, and re-drives lost retries, as Celery tasks."""

    def __init__(self, app: Celery, settings: Settings):
        from .relay import PUBLISH_TASK, RETRY_TASK, backoff, outbox_queue

        self.app = app
        self.settings = settings
        self.queue: Queue = outbox_queue(settings)
        self.publish_task = app.tasks[PUBLISH_TASK]
        self.retry_task = app.tasks[RETRY_TASK]
        self._backoff = backoff
        self.dispatched = 0  # tasks sent, for tests and status
        self._last_retry_scan = 0.0
        self._last_recheck = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set, reconnecting with backoff when PostgreSQL goes away."""
        delay = 0.5
        while not stop.is_set():
            try:
                self._watch(stop)
                return
            except TRANSIENT_ERRORS as exc:
                log.warning(
                    "watcher lost PostgreSQL (%s); reconnecting in %.1fs", str(exc).strip(), delay
                )
            except Exception:
                log.exception("watcher failed; restarting in %.1fs", delay)
            stop.wait(delay)
            delay = min(delay * 2, 30.0)

    def _watch(self, stop: threading.Event) -> None:
        conn = connect(self.settings, autocommit=True, name="outbox-bridge watcher")
        try:
            with conn.cursor() as cur:
                cur.execute("LISTEN " + _quote(self.queue.channel))
                log.info("watcher listening on %s", self.queue.channel)
                while not stop.is_set():
                    self.dispatch(cur)
                    if not conn.notifies:
                        ready, _, _ = select.select([conn], [], [], self.settings.poll_interval)
                        if ready:
                            conn.poll()
                    conn.notifies.clear()
        finally:
            conn.close()

    def dispatch(self, cur) -> int:
        """One look for work: claim ready shards and send their tasks. Returns tasks sent."""
        sent = self._dispatch_shards(cur)
        if not sent:
            self.queue.set_idle(cur, True)
            # a row committed before the flag flipped sent no NOTIFY: look once more
            sent = self._dispatch_shards(cur)
        now = time.monotonic()
        if now - self._last_retry_scan >= self.settings.poll_interval:
            self._last_retry_scan = now
            sent += self._redrive_retries(cur)
        if now - self._last_recheck >= self.settings.lease_seconds:
            self._last_recheck = now
            self.queue.forget_held(cur)
        self.dispatched += sent
        return sent

    def _dispatch_shards(self, cur) -> int:
        shards = self.queue.ready_shards(cur)
        if not shards:
            return 0
        self.queue.set_idle(cur, False)
        sent = 0
        for shard, token in self.queue.claim(cur, shards, self.settings.lease_seconds):
            try:
                self.publish_task.apply_async((shard, str(token)))
                sent += 1
            except Exception as exc:  # noqa: BLE001 - broker away: the lease brings it back
                log.warning("could not send the publish task of shard %d: %s", shard, exc)
                self.queue.release(cur, shard, token, self.settings.pause_seconds)
        return sent

    def _redrive_retries(self, cur) -> int:
        """Retrying rows whose retry task was lost (lease over): send it again."""
        sent = 0
        for row_id, token, attempts in self.queue.expired_retries(cur, self.settings.lease_seconds):
            if attempts > self.settings.max_retries:
                self.queue.bury(cur, [row_id], token, None)
                continue
            try:
                self.retry_task.apply_async(([row_id], str(token)), retries=attempts)
                sent += 1
            except Exception as exc:  # noqa: BLE001 - retried at the next lease
                log.warning("could not re-send the retry of outbox row %d: %s", row_id, exc)
        return sent


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class WatcherThread:
    """The watcher in a daemon thread of its own (used by the worker bootstep)."""

    def __init__(self, app: Celery, settings: Settings):
        self.watcher = Watcher(app, settings)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=self.watcher.run,
            args=(self.stop_event,),
            name="outbox-bridge-watcher",
            daemon=True,
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
