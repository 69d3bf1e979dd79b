"""The dispatcher: turns committed work into Celery tasks, one per database.

Every worker runs one; they elect one that dispatches (``election``) and the
others stand by at no cost. The elected one learns of new outbox rows by reading
the outbox id sequence every ``wake_poll`` seconds (one cheap query, no cost to
writers). With the setting ``wake = "notify"``:

- **idle** (no pending outbox rows for IDLE_AFTER seconds): it holds the outbox's
  idle lock (a session advisory lock), and ``publish()``'s own INSERT, which tries
  that lock shared, NOTIFYs it when refused. Nothing is polled, but a full look at
  every queue every ``poll_interval`` (a safety net: writes that bypass publish(),
  a notification lost with a connection);
- **busy**: the lock is free, commits take it shared and NOTIFY nobody (a NOTIFY
  serializes commits behind one lock of the cluster), and it reads the sequence
  as above.

A writer that published without a NOTIFY holds the lock shared until its
transaction ends, so the dispatcher can go idle only once every such transaction
has ended: their rows are visible to the look it makes then. It also LISTENs for
the inbox consumer's one NOTIFY per batch and for tasks giving shards back. Claims
are taken with SKIP LOCKED, so two dispatchers for a moment (a handover) deliver
each row once all the same.
"""

from __future__ import annotations

import collections
import logging
import select
import threading
import time
from typing import Any

import psycopg2
from celery import Celery
from psycopg2 import sql

from ..config import Settings
from ..db import connect
from ..loops import BEAT_EVERY, Heartbeat, run_forever
from ..queries import render
from ..shardtask import Source, served_sources, sources
from ..watchdog import guard
from .election import Fleet, fleet_capacity
from .maintenance import DUE_LOOK_GAP, Maintainer, MoveDue, RedriveRetries, RepairHeld

log = logging.getLogger(__name__)

# After the sequence moved, look again until every transaction that was running
# then has ended (the rows it wrote are visible), but for at most this long.
SETTLE_SECONDS = 2.0
# A row committed this long after its id was taken is still found at once on a shard
# whose other pending rows are held back by their keys (later: by the repair pass).
LATE_COMMIT_SECONDS = 10.0
# A queue that had work counts as busy this long: the pool's shares do not flap
# when its work comes in bursts.
BUSY_MEMORY = 1.0
IDLE_AFTER = 1.0  # seconds without pending outbox rows before commits NOTIFY again
BUSY_POLL = 0.05  # seconds between looks at every queue while one is busy
CAPACITY_FOR = 2.0  # seconds a count of the fleet's pool processes is used
SERVED_FOR = 2.0  # seconds a list of the handlers other workers serve is used


def free_tasks(parallel_tasks: int, busy_queues: int, active: int) -> int:
    """How many new tasks a busy queue may get now: its equal share of
    ``parallel_tasks`` among the ``busy_queues`` (at least one), less its ``active``
    tasks (<= 0: none)."""
    return max(1, parallel_tasks // max(1, busy_queues)) - active


def send(app: Celery, source: Source, cur, shards: list[int], token: Any) -> bool:
    """Send the task of claimed ``shards``; False when it had nothing to hand out."""
    if not source.batch_size:
        source.apply(app, source.task, (shards, str(token)))
        return True
    ids, with_rows = source.queue.fetch_ids(cur, shards, source.batch_size)
    empty = [s for s in shards if s not in with_rows]
    if empty:  # nothing to hand out there: all held back, or drained meanwhile
        source.queue.release(cur, empty, token, held=empty)
    if not ids:
        return False
    source.apply(app, source.task, (ids, str(token), sorted(with_rows)))
    return True


class SequenceWatch:
    """New outbox rows, seen from the id sequence: ``moved()`` is True when a look
    may find rows that were not there at the last look.

    A writer takes its id before it commits: when the sequence moves, its rows
    may not be visible yet (or never, after a rollback). So after a move it
    keeps saying "look" until every transaction that had a transaction id at
    the move has ended (``pg_stat_activity``; the watcher's role needs to see
    the writers' sessions: the same role, or ``pg_read_all_stats``), for at most
    SETTLE_SECONDS. A transaction that commits later still is found by the next
    move or the fallback timer."""

    def __init__(self, cur, schema: str):
        self.schema = schema
        table = sql.Identifier(schema, "outbox").as_string(cur)
        cur.execute(render("worker.sequence_of_outbox", schema), {"table": table})
        nspname, relname = cur.fetchone()
        self.query = render("worker.sequence_value", schema, {"sequence": (nspname, relname)})
        self.value: int | None = None
        # (when, value) of the moves of the last LATE_COMMIT_SECONDS: see since()
        self.moves: collections.deque[tuple[float, int]] = collections.deque()
        # (pid, xid) of transactions that ran at the last move (None: not asked yet)
        self.running: set[tuple[int, str]] | None = set()
        self.until = 0.0

    def moved(self, cur) -> bool:
        cur.execute(self.query)
        (value,) = cur.fetchone()
        if value != self.value:
            self.value = value
            self.moves.append((time.monotonic(), value))
            # which transactions run is asked once the sequence stands still: while
            # it keeps moving, each move brings a look anyway
            self.running = None
            self.until = time.monotonic() + SETTLE_SECONDS
            return True
        if self.running is None:
            # a superset of those running at the last move; those that ended
            # since are visible to this look
            cur.execute(render("worker.running", self.schema))
            self.running = set(cur.fetchall())
            return True
        if not self.running:
            return False
        cur.execute(
            render("worker.still_running", self.schema),
            {"pids": [pid for pid, _xid in self.running]},
        )
        self.running &= set(cur.fetchall())
        if time.monotonic() > self.until:
            self.running = set()
        return True  # one more look; the last one after those transactions ended

    def since(self) -> int | None:
        """The next id as it stood LATE_COMMIT_SECONDS ago: a row from it on may be of
        a transaction that committed after a task last looked at its shard (a slow
        writer with a lower id than the rows the task saw), so a shard released as
        "all held" is looked at again for such rows (``Queue.ready_shards``)."""
        horizon = time.monotonic() - LATE_COMMIT_SECONDS
        old = None
        while self.moves and self.moves[0][0] <= horizon:
            old = self.moves.popleft()[1]
        if old is not None:  # keep the newest value older than the horizon
            self.moves.appendleft((horizon, old))
        return self.moves[0][1] if self.moves else self.value


class Dispatcher:
    """Dispatches claimed shards, and re-drives lost retries, as Celery tasks: of the
    outbox and of every handler, the sources the sides register (``shardtask``).
    ``concurrency``: this worker's pool processes (0: a dispatcher without a pool,
    ``outbox-bridge watch``); the fleet's are counted from the workers' sessions."""

    def __init__(self, app: Celery, settings: Settings, concurrency: int = 0):
        self.app = app
        self.settings = settings
        self.concurrency = concurrency
        # the outbox first: "outbox" looks (the sequence moved) dispatch only it
        self.sources = sorted(sources(settings), key=lambda s: s.queue.name != "outbox")
        if not self.sources or self.sources[0].queue.name != "outbox":
            raise RuntimeError("the outbox's tasks are not imported (outbox_bridge.outbox.tasks)")
        self.outbox = self.sources[0].queue
        self._local = list(self.sources)  # this process's; self.sources adds the fleet's
        self._served_at = 0.0
        self.dispatched = 0  # tasks sent, for tests and logs
        self.leading = False  # elected: this one dispatches
        self.due = MoveDue(settings)
        self.maintenance = Maintainer(
            [
                RedriveRetries(app, self.sources, settings),
                RepairHeld(self.sources, settings),
                self.due,
            ]
        )
        self.idle = False  # this session holds the idle lock
        self._flipped = False  # it took the lock at this look
        self._quiet_since: float | None = None
        self._busy_until: dict[str, float] = {}  # queue -> until when it counts as busy
        self._per_task: dict[str, tuple[int, int]] = {}  # queue -> shares as written
        self._capacity = (0.0, 0)  # (counted at, pool processes of the fleet)
        self.heartbeat = Heartbeat(settings, "watcher")
        self.since: int | None = None  # SequenceWatch.since(), for the outbox's ready shards

    def run(self, stop: threading.Event) -> None:
        """Stand for election, then dispatch until ``stop`` is set, reconnecting with
        backoff when PostgreSQL goes away (and standing again)."""
        run_forever(self._serve, stop, "watcher", self.heartbeat)

    def _serve(self, stop: threading.Event) -> None:
        fleet = Fleet(self.settings, self.concurrency)
        try:
            fleet.join()
            log.info("dispatcher standing by (one per database dispatches)")
            if not fleet.elect(stop, self.heartbeat.beat):
                return
            log.info("dispatcher elected: this worker dispatches for the database")
            self.leading = True
            self._watch(stop, fleet)
        finally:
            self.leading = False
            fleet.close()

    def _watch(self, stop: threading.Event, fleet: Fleet) -> None:
        conn = connect(self.settings, autocommit=True, name="outbox-bridge watcher")
        self.idle, self._quiet_since, self._per_task = False, None, {}
        try:
            with conn.cursor() as cur:
                cur.execute(render("worker.dispatcher_session", self.settings.schema))
                listening: set[str] = set()
                self.sources[:], self._served_at = self._local, 0.0
                self._listen(cur, self.sources, listening)
                poll = self.settings.wake_poll
                sequence = SequenceWatch(cur, self.settings.schema) if poll > 0 else None
                notified_when_idle = self.settings.wake == "notify"
                log.info("watcher listening for %d queues", len(self.sources))
                next_full = 0.0  # the next look at every queue
                look: str | None = "all"
                while not stop.is_set():
                    self.heartbeat.beat()
                    with guard(conn, self.settings.network_timeout, "watcher"):
                        if look == "all" or time.monotonic() >= next_full:
                            self.serve_fleet(cur, listening)
                            self.dispatch(cur)
                            pause = self.settings.poll_interval if self.quiet() else BUSY_POLL
                            next_full = time.monotonic() + pause
                        elif look == "outbox":
                            self.dispatch(cur, self.sources[:1])
                        self.dispatched += self.maintenance.run_due(cur)  # re-sent retries
                        due_moved = self.due.take_moved() > 0  # delayed rows joined the outbox
                        self._flipped = False
                        # busy: commits do not NOTIFY, read the sequence; idle: they do
                        reading = sequence is not None and not (notified_when_idle and self.idle)
                        due = min(next_full, self.maintenance.next_due())
                        wait = min(BEAT_EVERY, max(0.0, due - time.monotonic()))
                        if reading:
                            wait = min(wait, poll)
                        if due_moved:
                            wait = 0.0
                        if not conn.notifies:
                            ready, _, _ = select.select([conn, fleet.conn], [], [], wait)
                            if conn in ready:
                                conn.poll()
                        fleet.check()  # lost the election's session: stop dispatching
                        notified = bool(conn.notifies)
                        conn.notifies.clear()
                        moved = reading and sequence.moved(cur)
                        self.since = sequence.since() if sequence is not None else None
                        if notified or moved:  # a delayed message may be due sooner
                            self.maintenance.poke(self.due.name, DUE_LOOK_GAP)
                    look = "all" if notified else "outbox" if moved or due_moved else None
        finally:
            conn.close()

    def _listen(self, cur, new: list[Source], listening: set[str]) -> None:
        for name in sorted({s.queue.channel for s in new} - listening):
            cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
            listening.add(name)
        for source in new:
            source.queue.add_claims(cur, range(self.settings.shards))

    def serve_fleet(self, cur, listening: set[str]) -> None:
        """Serve the handlers that other workers of the fleet run and this one lacks
        (their tasks go by name to the queue they registered); drop those that no
        connected worker serves any more. At most every SERVED_FOR seconds."""
        if time.monotonic() - self._served_at < SERVED_FOR:
            return
        self._served_at = time.monotonic()
        local = {s.task for s in self._local}
        known = {s.task for s in self.sources}
        found = [s for s in served_sources(cur, self.settings) if s.task not in local]
        new = [s for s in found if s.task not in known]
        for source in new:
            log.info("dispatching %s too: another worker of the fleet runs it", source.task)
        self._listen(cur, new, listening)
        # in place: the maintenance jobs hold this list
        self.sources[:] = [*self._local, *found]

    def quiet(self) -> bool:
        """Idle, and no queue busy: the next look is the safety net's."""
        now = time.monotonic()
        return bool(self.idle) and not any(u > now for u in self._busy_until.values())

    def capacity(self, cur) -> int:
        """The tasks the fleet runs at once: ``parallel_tasks``, or the pool processes of
        every worker connected (counted every CAPACITY_FOR seconds), at least one."""
        if self.settings.parallel_tasks:
            return self.settings.parallel_tasks
        counted_at, count = self._capacity
        if time.monotonic() - counted_at > CAPACITY_FOR:
            count = fleet_capacity(cur, self.settings.schema)
            if count != self._capacity[1]:
                log.info("the fleet runs %d pool processes", count)
            self._capacity = (time.monotonic(), count)
        return max(1, count or self.concurrency or 4)

    def dispatch(self, cur, only: list[Source] | None = None) -> int:
        """One look for work (at ``only`` these sources): claim ready shards and send
        their tasks. Returns tasks sent.

        The fleet's pool processes are shared fairly: each busy queue (ready shards
        or tasks at work, in the last BUSY_MEMORY seconds) gets an equal share of
        the fleet's capacity, at least one task. A queue whose tasks fill its share
        gets no new task, and is not even looked at: its lingering tasks take on its
        ready shards themselves, and a new task would only wait behind them for a
        pool process. A task keeps at most its part of the queue's shards
        (``shards`` / share, ``shares``): when a share grows, the tasks give shards
        back for new ones."""
        sent = 0
        now = time.monotonic()
        active = self._active(cur)
        capacity = self.capacity(cur)
        for name, tasks in active.items():
            if tasks:
                self._busy_until[name] = now + BUSY_MEMORY
        for source in self.sources if only is None else only:
            queue = source.queue
            busy = {n for n, until in self._busy_until.items() if until > now} | {queue.name}
            share = max(1, capacity // len(busy))
            # every shard of the queue over its share of tasks: a lingering task may
            # take on shards that are not ready now, up to its part of them all; with
            # more tasks at work than the share, they are crowded (Linger.over)
            # (0 tasks: more busy queues than pool processes, so each takes turns)
            per_task, tasks = -(-self.settings.shards // share), capacity // len(busy)
            if self._per_task.get(queue.name) != (per_task, tasks):
                queue.set_share(cur, per_task, tasks)
                self._per_task[queue.name] = (per_task, tasks)
            free = free_tasks(capacity, len(busy), active.get(queue.name, 0))
            if free <= 0:
                if queue is self.outbox:
                    self._outbox_idle(cur, True, now)  # its tasks are at work
                continue
            since = self.since if queue is self.outbox else None
            shards = queue.ready_shards(cur, since)
            if queue is self.outbox and not shards:
                self._outbox_idle(cur, False, now)
                if self._flipped:
                    # a row committed before the lock was taken sent no NOTIFY: look again
                    shards = queue.ready_shards(cur, since)
            if shards:
                self._busy_until[queue.name] = now + BUSY_MEMORY
                sent += self._send(cur, source, shards, free, per_task)
                if queue is self.outbox:  # after the send: the first row goes out sooner
                    self._outbox_idle(cur, True, now)
        self.dispatched += sent
        return sent

    def _outbox_idle(self, cur, found: bool, now: float) -> None:
        """Commits NOTIFY only once the outbox has been empty for IDLE_AFTER seconds:
        under steady load the lock is free and writers skip NOTIFY's global lock."""
        if found:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        idle = not found and now - self._quiet_since >= IDLE_AFTER
        if idle and not self.idle:
            # refused while a writer that sent no NOTIFY is open: still busy
            self.idle = self._flipped = self.outbox.set_idle(cur, True)
        elif not idle and self.idle:
            self.idle = self.outbox.set_idle(cur, False)

    def _active(self, cur) -> dict[str, int]:
        """Tasks at work per queue: tokens whose claims were renewed lately. A task
        renews at least every batch; one that has not for a while (crashed, or in a
        long batch) does not count, so it cannot hold its queue back for a lease."""
        fresh = self.settings.lease_seconds - max(2.0, 2 * self.settings.linger_max_seconds)
        cur.execute(render("worker.active_tasks", self.settings.schema), {"fresh": fresh})
        return dict(cur.fetchall())

    def _send(self, cur, source: Source, shards: list[int], groups: int, per_task: int) -> int:
        sent = 0
        lease = self.settings.lease_seconds
        for group, token in source.queue.claim(cur, shards, lease, groups, per_task):
            try:
                sent += send(self.app, source, cur, group, token)
            except psycopg2.Error:
                raise  # the loop reconnects
            except Exception as exc:  # noqa: BLE001 - broker away: retried after a pause
                log.warning(
                    "could not send the task of %s shards %s: %s", source.queue.name, group, exc
                )
                source.queue.release(cur, group, token, self.settings.pause_seconds)
        return sent
