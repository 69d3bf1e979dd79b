"""Maintenance: jobs of one shape (``Job``: an interval and ``run_once(cur)``), run
by a ``Maintainer`` in the loop that owns their connection. The dispatcher runs
the re-drive of lost retries, the repair of held rows and the move of due
delayed messages into the outbox; the
retention loop runs ``Forget`` (old bookkeeping) and ``Prune``.

Retention: the worker forgets handled inbox messages after the dedupe window.

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
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg2

from ..config import Settings
from ..db import connect
from ..events import emit
from ..loops import Heartbeat, run_forever, wait
from ..queries import render
from ..queue import fire_dead
from ..shardtask import Source
from ..watchdog import guard

log = logging.getLogger(__name__)


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
    does not take the database from the relay and the handlers. Without ``stop``
    (the command) it waits for a worker's round to end; with one it skips the
    round when another pruner runs."""
    conn = connect(settings, autocommit=True, name="outbox-bridge retention")
    try:
        with conn.cursor() as cur:
            return prune_on(cur, settings, window, stop, beat, share)
    finally:
        conn.close()


def prune_on(cur, settings: Settings, window=None, stop=None, beat=None, share=1.0) -> int:
    """``prune`` on an autocommit cursor of the caller's."""
    window = settings.dedupe_window if window is None else window
    total, after = 0, 0
    # one pruner at a time per schema (every worker runs one); the others skip the
    # round, the command waits
    lock = {"name": f"outbox_bridge.prune:{settings.schema}"}
    wait_for_it = "worker.prune_lock_wait" if stop is None else "worker.prune_lock"
    cur.execute(render(wait_for_it, settings.schema), lock)
    if cur.fetchone()[0] is False:
        return 0
    try:
        while stop is None or not stop.is_set():
            if beat is not None:
                beat()
            started = time.monotonic()
            with guard(cur.connection, settings.network_timeout, "retention"):
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
            emit("pruned", gone)
            if last is None or not all_old:
                break  # the end, or rows inside the window: the rest are newer
            after = last
    finally:
        cur.execute(render("worker.prune_unlock", settings.schema), lock)
    return total


def forget(settings: Settings) -> None:
    """Delete bookkeeping that would otherwise grow for ever, besides inbox messages:
    receipts of ``send()`` and pause rows of topics no relay tried for a day."""
    conn = connect(settings, autocommit=True, name="outbox-bridge retention")
    try:
        with conn.cursor() as cur:
            Forget(settings).run_once(cur)
    finally:
        conn.close()


@contextmanager
def durably(cur: Any) -> Iterator[None]:
    """A transaction on an autocommit cursor whose COMMIT waits for the WAL flush,
    whatever the session's ``synchronous_commit``."""
    cur.execute("BEGIN")
    try:
        cur.execute("SET LOCAL synchronous_commit = on")
        yield
    except BaseException:
        with suppress(psycopg2.Error):  # a lost connection: the original error counts
            cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")


class Job:
    """A maintenance job: ``run_once(cur)`` every ``interval`` seconds (the first time
    ``start_after`` seconds after its maintainer starts), on an autocommit cursor of
    the loop that runs it. It returns how much it did, and raises
    ``psycopg2.Error`` for its loop to reconnect."""

    name = "job"
    interval = 60.0
    start_after = 0.0

    def run_once(self, cur: Any) -> int:
        raise NotImplementedError


class Maintainer:
    """Runs the jobs that are due; an error of one (but the database's) is logged
    and the others go on."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        now = time.monotonic()
        self.next_run = {job.name: now + job.start_after for job in jobs}
        self.last_run: dict[str, float] = {}

    def next_due(self) -> float:
        """When (``time.monotonic()``) the next job is due."""
        return min(self.next_run.values(), default=float("inf"))

    def poke(self, name: str, gap: float = 0.0) -> None:
        """Run job ``name`` soon: something it waits for may be there. Not sooner than
        ``gap`` seconds after its last run (a busy loop pokes it at every look)."""
        if name in self.next_run:
            soon = self.last_run.get(name, float("-inf")) + gap
            self.next_run[name] = min(self.next_run[name], soon)

    def run_due(self, cur: Any) -> int:
        """Run every job whose time has come; the work they did, summed."""
        done = 0
        for job in self.jobs:
            now = time.monotonic()
            if now < self.next_run[job.name]:
                continue
            self.next_run[job.name] = now + job.interval
            self.last_run[job.name] = now
            try:
                done += job.run_once(cur) or 0
                self.next_run[job.name] = time.monotonic() + job.interval  # it may have changed
            except psycopg2.Error:
                raise
            except Exception:  # noqa: BLE001 - one job must not stop the others
                log.exception("maintenance job %s failed; again in %.0fs", job.name, job.interval)
        return done


# -- the retention loop's jobs ----------------------------------------------------------
class Forget(Job):
    """Receipts of ``send()`` (a retry comes within seconds) and the pause rows of topics
    no relay tried for a day (gone, or no rows left: made again if needed)."""

    name = "forget"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.interval = settings.prune_interval

    def run_once(self, cur: Any) -> int:
        with guard(cur.connection, self.settings.network_timeout, "retention"):
            for statement in ("worker.forget_receipts", "worker.forget_pauses"):
                cur.execute(render(statement, self.settings.schema))
        return 0


class Prune(Job):
    """Handled inbox messages past the dedupe window (``prune``), at ``prune_share``."""

    name = "prune"

    def __init__(self, settings: Settings, stop: threading.Event, beat) -> None:
        self.settings, self.stop, self.beat = settings, stop, beat
        self.interval = settings.prune_interval

    def run_once(self, cur: Any) -> int:
        if self.settings.dedupe_window <= 0:
            return 0
        started = time.monotonic()
        count = prune_on(cur, self.settings, None, self.stop, self.beat, self.settings.prune_share)
        if count:
            log.info(
                "retention: forgot %d handled inbox messages in %.1fs",
                count,
                time.monotonic() - started,
            )
        return count


class Retention:
    """The worker's retention loop: ``Forget`` and ``Prune`` every ``prune_interval``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pruned = 0
        self.heartbeat = Heartbeat(settings, "retention")

    def run(self, stop: threading.Event) -> None:
        run_forever(self._loop, stop, "retention", self.heartbeat)

    def _loop(self, stop: threading.Event) -> None:
        jobs = Maintainer([Forget(self.settings), Prune(self.settings, stop, self.heartbeat.beat)])
        conn = connect(self.settings, autocommit=True, name="outbox-bridge retention")
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    self.pruned += jobs.run_due(cur)
                    wait(stop, self.settings.prune_interval, self.heartbeat.beat)
        finally:
            conn.close()


# -- the dispatcher's jobs ------------------------------------------------------------
class RedriveRetries(Job):
    """Retrying rows whose retry task was lost (their lease is over): their retry is
    sent again, or, past their retries, they are dead."""

    name = "redrive"

    def __init__(self, app: Any, sources: list[Source], settings: Settings):
        self.app, self.sources, self.settings = app, sources, settings
        self.interval = settings.poll_interval  # a lost retry waited for its lease already

    def run_once(self, cur: Any) -> int:
        return sum(self._redrive(cur, source) for source in self.sources)

    def _redrive(self, cur: Any, source: Source) -> int:
        sent = 0
        lease = self.settings.lease_seconds
        for row_id, token, attempts in source.queue.expired_retries(cur, lease):
            if attempts > source.max_retries:
                with durably(cur):  # the dispatcher's session does not wait for the WAL
                    dead = source.queue.bury(cur, [row_id], token, None)
                fire_dead(dead)  # once: after a commit that a crash cannot take back
                continue
            try:
                source.apply(self.app, source.retry_task, ([row_id], str(token)), retries=attempts)
                sent += 1
            except Exception as exc:  # noqa: BLE001 - retried at the next lease
                log.warning(
                    "could not re-send the retry of %s row %d: %s", source.queue.name, row_id, exc
                )
        return sent


class RepairHeld(Job):
    """Every lease, a safety net for held rows (``Queue.repair``), in every queue."""

    name = "repair"

    def __init__(self, sources: list[Source], settings: Settings):
        self.sources = sources
        self.interval = self.start_after = settings.lease_seconds

    def run_once(self, cur: Any) -> int:
        for source in self.sources:
            source.queue.repair(cur)
        return 0


MOVE_BATCH = 5000  # due delayed messages moved into the outbox per statement
# while busy, the dispatcher asks for the next due time at most this often: a delayed
# message due sooner than the timer is seen this much later at most
DUE_LOOK_GAP = 0.2


class MoveDue(Job):
    """Delayed messages that are due join the outbox (``publish(..., delay=)``). One timer:
    the job runs again when the next one is due (at most ``poll_interval`` later, a
    safety net), and when the dispatcher hears of new ones (``Maintainer.poke``)."""

    name = "due"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.interval = settings.poll_interval
        self.moved = 0  # rows moved by the last run, until ``take_moved``

    def run_once(self, cur: Any) -> int:
        schema = self.settings.schema
        left = None
        while True:
            cur.execute(render("outbox.next_due", schema))
            (left,) = cur.fetchone()
            if left is None or left > 0:
                break
            cur.execute(render("outbox.move_due", schema), {"limit": MOVE_BATCH})
            self.moved += cur.rowcount
            if cur.rowcount <= 0:  # due, but locked by another dispatcher (a handover)
                left = 1.0
                break
        limit = self.settings.poll_interval
        self.interval = limit if left is None else min(limit, max(0.0, float(left)))
        return 0

    def take_moved(self) -> int:
        """Rows moved since the last call: the outbox has new rows to look at."""
        moved, self.moved = self.moved, 0
        return moved
