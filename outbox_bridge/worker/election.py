"""One dispatcher per database, and the fleet's size, from PostgreSQL sessions.

Every worker keeps one *fleet* connection, named with its pool size
(``application_name``): the elected dispatcher counts the fleet's pool processes
from ``pg_stat_activity``. No table, no heartbeat: a worker that stops, is
killed or goes silent for ``network_timeout`` takes its session with it.

A worker that runs the dispatcher (the default) asks for the schema's session
advisory lock on that connection and waits for it in PostgreSQL, which costs
nothing while nothing changes. The holder dispatches and runs the maintenance
jobs; when its session ends, PostgreSQL hands the lock to a waiting worker at
once. Two dispatchers for a moment (a holder that has not yet noticed it lost
its session) are harmless: claims are taken with ``SKIP LOCKED``; the election
saves work, it does not make anything correct.

A flow can go silent while both ends still see it open (a hung proxy or load
balancer, a NAT that drops its state): no keepalive notices, and a session that
holds or is granted the lock would keep it for good. So with a ``network_timeout``
the holder and the members ask ``SELECT 1`` every few seconds (no answer within
the timeout: the session is given up), the server ends a fleet session idle for
longer than that (``idle_session_timeout``: the lock goes to the next standby),
and a standby's wait ends every STAND_FOR seconds (``lock_timeout``), so a standby
that hears nothing gives its session up too and stands again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2

from ..config import Settings
from ..db import connect_async, wait_ready
from ..queries import render
from ..shardtask import sources

log = logging.getLogger(__name__)

PREFIX = "outbox-bridge fleet"
PING_EVERY = 5.0  # seconds between signs of life of an idle fleet session (at most)
STAND_FOR = 10.0  # seconds a standby waits for the lock before it asks again (at most)
_CONCURRENCY = re.compile(r" c=(\d+)$")
_PID = re.compile(r" p=(\d+) ")


def schema_tag(schema: str) -> str:
    """A short tag of the schema (names are cut at 63 bytes; a schema name may be long)."""
    return hashlib.md5(schema.encode()).hexdigest()[:12]


def fleet_name(schema: str, concurrency: int) -> str:
    """The ``application_name`` of a worker's fleet connection: its schema, the worker's
    main process id (which one dispatches, for `status`) and its pool size."""
    return f"{PREFIX} {schema_tag(schema)} p={os.getpid()} c={concurrency}"


def _members(schema: str) -> dict[str, str]:
    return {"prefix": f"{PREFIX} {schema_tag(schema)} %"}


def fleet_capacity(cur, schema: str) -> int:
    """Pool processes of the workers connected to this database and schema now."""
    cur.execute(render("worker.fleet", schema), _members(schema))
    found = (_CONCURRENCY.search(name) for (name,) in cur.fetchall())
    return sum(int(m.group(1)) for m in found if m)


def dispatcher(cur, schema: str) -> dict[str, Any] | None:
    """The worker that dispatches for this database now: its host (as PostgreSQL sees
    it) and main process id; None while no worker holds the election."""
    cur.execute(render("worker.dispatcher", schema), _members(schema))
    row = cur.fetchone()
    if row is None:
        return None
    name, host = row
    pid = _PID.search(name)
    return {"host": host or "local socket", "pid": int(pid.group(1)) if pid else None}


def timings(network_timeout: float) -> dict[str, float]:
    """The fleet session's rhythm for a ``network_timeout`` (0: no deadlines, as
    before): how often an idle session says it is alive (``ping``), how long the
    server lets it sit idle (``idle``), how long a standby waits for the lock at a
    time (``stand``)."""
    if network_timeout <= 0:
        return {"ping": 0.0, "idle": 0.0, "stand": 0.0}
    ping = min(PING_EVERY, network_timeout / 3)
    # longer than a holder's longest gap between pings: a look at the queues stuck
    # until the watchdog (network_timeout), and a ping of its own
    return {
        "ping": ping,
        "idle": network_timeout + 2 * ping,
        "stand": min(STAND_FOR, network_timeout),
    }


class Fleet:
    """This worker's fleet connection: its membership, and its part in the election."""

    def __init__(self, settings: Settings, concurrency: int):
        self.settings = settings
        self.name = fleet_name(settings.schema, concurrency)
        self.lock = {"name": f"outbox_bridge.dispatcher:{settings.schema}"}
        # the tasks this worker's pool runs: the elected dispatcher sends those it lacks
        # (none for a dispatcher without a pool: `outbox-bridge watch`)
        self.serves = sorted({s.task for s in sources(settings)}) if concurrency else []
        self.timeout = settings.network_timeout
        self.timings = timings(self.timeout)
        self.conn = None
        self._cur = None  # the ping's, kept until its answer (psycopg2's async poll)
        self._asked: float | None = None  # when the ping in flight was sent
        self._heard = 0.0  # when the session last answered

    def join(self) -> None:
        self.conn = connect_async(self.settings, self.name)
        if self.timeout > 0:
            self._ask(
                render("worker.fleet_session", self.settings.schema),
                {
                    "lock_ms": str(round(self.timings["stand"] * 1000)),
                    "idle_ms": str(round(self.timings["idle"] * 1000)),
                },
            )
        if self.serves:
            self._ask(
                render("worker.serve_handlers", self.settings.schema),
                {"schema": self.settings.schema, "names": self.serves},
            )
        self._heard = time.monotonic()

    def _ask(self, query, params) -> None:
        cur = self.conn.cursor()  # kept until the answer: psycopg2's async poll needs it
        cur.execute(query, params)
        wait_ready(self.conn, self.timeout or None)
        cur.fetchall()

    def elect(self, stop: threading.Event, beat: Callable[[], None]) -> bool:
        """Wait until this worker holds the dispatcher's lock (True) or ``stop`` is set.
        Raises ``OperationalError`` when the session stops answering."""

        def tick() -> None:
            beat()
            if stop.is_set():
                self.conn.cancel()

        # the server ends the wait after `stand` seconds: no answer by then (and the
        # network's time) means the flow is gone
        deadline = self.timings["stand"] + self.timeout if self.timeout > 0 else None
        while True:
            cur = self.conn.cursor()
            cur.execute(render("worker.dispatcher_lock", self.settings.schema), self.lock)
            try:
                wait_ready(self.conn, deadline, tick)
            except psycopg2.errors.LockNotAvailable:
                continue  # the wait's own end: the session is alive, wait again
            except psycopg2.errors.QueryCanceled:
                if stop.is_set():
                    return False
                raise
            self._heard = time.monotonic()
            return True

    def stay(self, stop: threading.Event, beat: Callable[[], None]) -> None:
        """Keep the membership until ``stop`` (a worker that does not dispatch)."""
        while not stop.is_set():
            beat()
            self.check(1.0)

    def check(self, wait: float = 0.0) -> None:
        """Raise ``OperationalError`` when the session has ended or stopped answering
        (waiting up to ``wait`` seconds for a sign of it): a dispatcher that lost it no
        longer holds the lock. Sends the session's ping when it is due."""
        ready, _, _ = select.select([self.conn.fileno()], [], [], wait)
        if ready or self._asked is not None:
            state = self.conn.poll()  # raises when the server closed the session
            if self.conn.closed:
                raise psycopg2.OperationalError("the fleet connection was closed")
            if self._asked is not None and state == psycopg2.extensions.POLL_OK:
                self._cur.fetchall()
                self._asked, self._cur, self._heard = None, None, time.monotonic()
        if not self.timings["ping"]:
            return
        now = time.monotonic()
        if self._asked is not None:
            if now - self._asked > self.timeout:
                raise psycopg2.OperationalError(
                    f"the fleet connection did not answer in {self.timeout:.0f}s"
                )
        elif now - self._heard >= self.timings["ping"]:
            self._cur = self.conn.cursor()
            self._cur.execute(render("worker.fleet_ping", self.settings.schema))
            self._asked = now

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()
        self.conn = None
        self._cur = self._asked = None


def serve_member(settings: Settings, concurrency: int) -> Callable[[threading.Event], None]:
    """The loop of a worker without the dispatcher: a member of the fleet (its pool
    counts), never elected. Reconnects as the other loops do."""
    from ..loops import Heartbeat, run_forever

    heartbeat = Heartbeat(settings, "fleet")

    def body(stop: threading.Event) -> None:
        fleet = Fleet(settings, concurrency)
        try:
            fleet.join()
            fleet.stay(stop, heartbeat.beat)
        finally:
            fleet.close()

    return lambda stop: run_forever(body, stop, "fleet membership", heartbeat)
