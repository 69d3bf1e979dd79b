"""Retention: the worker forgets handled inbox messages after the dedupe window
(and old bookkeeping: ``forget``).

The inbox is what deduplicates: a message read again from Kafka (a consumer
group rewound, a partition re-read after a crash) is recognised by its id and
not handled again, for as long as its inbox row exists. Rows whose deliveries
are all done are deleted ``dedupe_window`` seconds after they were received,
with their done deliveries; a message read again after that is handled again.
Size the window to what Kafka can hand out again: a segment is deleted only
once its newest record is older than ``retention.ms``, and the active segment
rolls only after ``segment.ms``, so a record can be read again until it is about
``retention.ms + segment.ms`` old (14 days with Kafka's defaults, this
window's default). The consumer warns at start, and ``health --ready`` says,
when a subscribed topic can replay records older than the window. Messages with a
delivery that is not done (pending, retrying, dead) stay; dead ones until
``outbox-bridge dead purge``.

Pruning walks the inbox in id order, ``prune_batch`` rows per short
transaction (no long locks, no table scan: each batch reads the next rows of
the primary key), and stops at the first row inside the window.
"""

from __future__ import annotations

import logging
import threading
import time

from .. import events, watchdog
from ..config import Settings
from ..db import connect
from ..loops import Heartbeat, run_forever, wait
from ..queries import render

log = logging.getLogger(__name__)


# The next rows after ``after``; those received before the window whose
# deliveries are all done go, with their deliveries.
def prune(
    settings: Settings,
    window: float | None = None,
    stop: threading.Event | None = None,
    beat=None,
    share: float = 1.0,
) -> int:
    """Delete handled inbox messages received more than ``window`` seconds ago
    (default: the ``dedupe_window`` setting), batch by batch; returns how many.
    ``share``: the part of the time spent deleting (after a batch that took t
    seconds it waits t * (1 / share - 1)), so that a large backlog of old rows
    does not take the database from the relay and the handlers."""
    window = settings.dedupe_window if window is None else window
    total, after = 0, 0
    conn = connect(settings, autocommit=True, name="outbox-bridge retention")
    try:
        with conn.cursor() as cur:
            # one pruner at a time per schema (every worker runs one); the others skip
            # the round, the command waits
            lock = "worker.prune_lock" if stop is not None else "worker.prune_lock_wait"
            cur.execute(
                render(lock, settings.schema), {"name": f"outbox_bridge.prune:{settings.schema}"}
            )
            if cur.fetchone()[0] is False:
                return 0
            while stop is None or not stop.is_set():
                if beat is not None:
                    beat()
                started = time.monotonic()
                with watchdog.guard(conn, settings.network_timeout, "retention"):
                    cur.execute(
                        render("worker.prune_batch", settings.schema),
                        {"window": window, "after": after, "limit": settings.prune_batch},
                    )
                last, gone, all_old = cur.fetchone()
                if gone and share < 1:
                    # beating meanwhile: a slow batch on a loaded database means a long
                    # pause, and a silent one would read as a hung loop (health --live)
                    wait(stop, (time.monotonic() - started) * (1 / max(share, 0.01) - 1), beat)
                total += gone
                events.emit("pruned", gone)
                if last is None or not all_old:
                    break  # the end, or rows inside the window: the rest are newer
                after = last
    finally:
        conn.close()
    return total


def forget(settings: Settings) -> None:
    """Delete bookkeeping that would otherwise grow for ever, besides inbox messages:
    receipts of ``send()`` and pause rows of topics no relay tried for a day."""
    conn = connect(settings, autocommit=True, name="outbox-bridge retention")
    try:
        with watchdog.guard(conn, settings.network_timeout, "retention"), conn.cursor() as cur:
            for statement in ("worker.forget_receipts", "worker.forget_pauses"):
                cur.execute(render(statement, settings.schema))
    finally:
        conn.close()


class Retention:
    """The worker's pruning loop, every ``prune_interval`` seconds: ``forget`` and, with
    a dedupe window, ``prune``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pruned = 0
        self.heartbeat = Heartbeat(settings, "retention")

    def run(self, stop: threading.Event) -> None:
        run_forever(self._loop, stop, "retention", self.heartbeat)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            forget(self.settings)
            count = 0
            if self.settings.dedupe_window > 0:
                count = prune(
                    self.settings,
                    stop=stop,
                    beat=self.heartbeat.beat,
                    share=self.settings.prune_share,
                )
            self.pruned += count
            if count:
                log.info(
                    "retention: forgot %d handled inbox messages in %.1fs",
                    count,
                    time.monotonic() - started,
                )
            wait(stop, self.settings.prune_interval, self.heartbeat.beat)
