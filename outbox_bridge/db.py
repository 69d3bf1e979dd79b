"""PostgreSQL connections and the schema-qualified SQL of outbox-bridge."""

from __future__ import annotations

import hashlib
import os
import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

from .config import Settings, get_settings
from .watchdog import guard

psycopg2.extras.register_uuid()

# SQLSTATE classes and codes after which the same work may succeed on a new
# connection or attempt. OperationalError also covers deterministic ones
# (54000 program_limit_exceeded, 57014 query_canceled): those are not retried.
_TRANSIENT_CLASSES = ("08", "53", "58")
_TRANSIENT_CODES = frozenset(
    {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "57P05", "25P03"}
)


def is_transient(exc: BaseException) -> bool:
    """Whether the same work may succeed on a new connection or a new attempt."""
    if isinstance(exc, psycopg2.InterfaceError):
        return True  # the connection is closed
    if not isinstance(exc, psycopg2.Error):
        return False
    code = exc.pgcode
    if code is None:  # no answer from the server: connection refused or lost
        return isinstance(exc, psycopg2.OperationalError)
    return code[:2] in _TRANSIENT_CLASSES or code in _TRANSIENT_CODES


def connect(
    settings: Settings | None = None, *, autocommit: bool = False, name: str = "outbox-bridge"
) -> psycopg2.extensions.connection:
    """A new connection to the outbox-bridge database."""
    conn = psycopg2.connect(**connection_params(settings or get_settings(), name))
    conn.autocommit = autocommit
    return conn


def connect_async(settings: Settings, name: str) -> psycopg2.extensions.connection:
    """A new asynchronous connection (psycopg2's ``async_``), connected: its statements
    are sent without waiting, so a thread can wait for the answer with ``select()``
    and still beat its heartbeat, or stop (the dispatcher's election)."""
    conn = psycopg2.connect(**connection_params(settings, name), async_=1)
    wait_ready(conn, settings.network_timeout or None)
    return conn


def wait_ready(conn: Any, timeout: float | None, tick=None) -> None:
    """Wait until an asynchronous connection has its answer (psycopg2's poll loop);
    ``tick()``, when given, runs about every second meanwhile and may raise to stop."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if left <= 0:
            raise psycopg2.OperationalError("no answer from PostgreSQL in time")
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], left)
        else:
            select.select([], [conn.fileno()], [], left)
        if tick is not None:
            tick()


def connection_params(settings: Settings, name: str) -> dict[str, Any]:
    """libpq's parameters of a connection named ``name`` (``application_name``)."""
    dsn = psycopg2.extensions.parse_dsn(settings.database_url)
    options = " ".join(
        filter(
            None,
            (
                *network_options(settings.network_timeout),
                dsn.pop("options", ""),
                f"-c idle_in_transaction_session_timeout={idle_in_transaction_ms(settings)}",
            ),
        )
    )
    return {
        **network_params(settings.network_timeout),
        **dsn,
        "application_name": name,
        "options": options.strip(),
    }


def idle_in_transaction_ms(settings: Settings) -> int:
    """How long one of our sessions may sit idle inside a transaction: longer than any
    wait of ours there (a handler's own code, up to ``handler_time_limit``; the relay's
    wait on Kafka, within the lease) plus ``network_timeout``. Past that its client is
    gone or frozen (a paused VM, a flow gone silent while the server's side of it stays
    up, which no keepalive notices) and its row locks would hold back every later
    attempt of those keys. Not a server-wide setting below that, which would cut our
    waits on Kafka. 0 (never) without a network timeout or a handler time limit."""
    if settings.network_timeout <= 0 or settings.handler_time_limit <= 0:
        return 0
    longest = max(settings.handler_time_limit, settings.lease_seconds)
    return round((longest + settings.network_timeout) * 1000)


def network_params(timeout: float) -> dict[str, int]:
    """libpq's settings that notice a dead server or route in about ``timeout``
    seconds, not hours (the database URL's own values win)."""
    if timeout <= 0:
        return {"connect_timeout": 10}
    return {
        "connect_timeout": max(2, round(timeout / 3)),
        "keepalives": 1,
        "keepalives_idle": max(1, round(timeout / 3)),
        "keepalives_interval": max(1, round(timeout / 9)),
        "keepalives_count": 3,
        "tcp_user_timeout": round(timeout * 1000),
    }


def network_options(timeout: float) -> tuple[str, ...]:
    """The same for the server's side of the connection: a backend whose client went
    silent ends (and frees its locks) instead of waiting hours for it."""
    if timeout <= 0:
        return ()
    p = network_params(timeout)
    return tuple(
        f"-c {name}={p[key]}"
        for name, key in (
            ("tcp_keepalives_idle", "keepalives_idle"),
            ("tcp_keepalives_interval", "keepalives_interval"),
            ("tcp_keepalives_count", "keepalives_count"),
            ("tcp_user_timeout", "tcp_user_timeout"),
        )
    )


@contextmanager
def work(conn: Any, settings: Settings, what: str) -> Iterator[Any]:
    """A transaction on ``conn`` with a cursor: outbox-bridge's own database work,
    its connection closed by the watchdog when it waits longer than
    ``network_timeout`` for an answer (see ``watchdog``)."""
    with guard(conn, settings.network_timeout, what), conn, conn.cursor() as cur:
        yield cur


_local = threading.local()


def task_connection(settings: Settings) -> psycopg2.extensions.connection:
    """This thread's connection for tasks: one per pool process, thread or greenlet,
    made after the fork, so that concurrent tasks never share a transaction."""
    conn = getattr(_local, "conn", None)
    if (
        conn is None
        or conn.closed
        or _local.pid != os.getpid()
        or _local.url != settings.database_url
    ):
        drop_task_connection()
        conn = connect(settings, name="outbox-bridge task")
        _local.conn, _local.pid, _local.url = conn, os.getpid(), settings.database_url
    return conn


def drop_task_connection() -> None:
    """Close this thread's task connection (after an error); the next use makes a new one."""
    conn = getattr(_local, "conn", None)
    _local.conn = None
    if conn is not None and _local.pid == os.getpid():
        with suppress(psycopg2.Error):
            conn.close()


def recreate_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` (ending its sessions) and create it empty: the
    benchmark's and the soak's own databases."""
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        admin.close()


@contextmanager
def transaction(
    settings: Settings | None = None, name: str = "outbox-bridge", *, bounded: bool = False
) -> Iterator[Any]:
    """A cursor in a transaction on a connection of its own, committed and closed after.
    ``bounded``: the whole of it under the watchdog's ``network_timeout`` (the worker's
    own work; a command a person runs may take as long as it needs)."""
    settings = settings or get_settings()
    conn = connect(settings, name=name)
    try:
        if bounded:
            with work(conn, settings, name) as cur:
                yield cur
        else:
            with conn, conn.cursor() as cur:
                yield cur
    finally:
        conn.close()


# the tables that SQL templates name as {outbox}, {claims}, ...
TABLES = (
    "outbox",
    "scheduled",
    "claims",
    "wakeup",
    "migrations",
    "inbox",
    "deliveries",
    "wakes",
    "handlers",
    "topic_pauses",
    "send_receipts",
    "shares",
)


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier, exactly as ``psycopg2.sql.Identifier``
    renders it (libpq's PQescapeIdentifier), for drivers that take plain text."""
    if "\x00" in name:
        raise ValueError(f"an SQL identifier cannot contain NUL: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def channel(schema: str, queue: str) -> str:
    """The NOTIFY channel of one queue (matches the trigger's). PostgreSQL cuts
    names at 63 bytes, so a long one is shortened with a hash that keeps it apart."""
    name = f"{schema}.{queue}"
    if len(name.encode()) <= 63:
        return name
    return "ob_" + hashlib.md5(name.encode()).hexdigest()  # as outbox_wakeup() does
