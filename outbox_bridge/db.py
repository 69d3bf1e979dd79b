"""PostgreSQL connections and the schema-qualified SQL of outbox-bridge."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

from .config import Settings, get_settings

psycopg2.extras.register_uuid()

# Errors after which the same work may succeed on a new connection or attempt.
TRANSIENT_ERRORS = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    psycopg2.errors.SerializationFailure,
    psycopg2.errors.DeadlockDetected,
)


def connect(
    settings: Settings | None = None, *, autocommit: bool = False, name: str = "outbox-bridge"
) -> psycopg2.extensions.connection:
    """A new connection to the outbox-bridge database."""
    settings = settings or get_settings()
    conn = psycopg2.connect(
        settings.database_url,
        application_name=name,
        connect_timeout=10,
        # notice a dead server or peer in seconds, not hours
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )
    conn.autocommit = autocommit
    return conn


@contextmanager
def transaction(settings: Settings | None = None, name: str = "outbox-bridge") -> Iterator[Any]:
    """A cursor in a transaction on a connection of its own, committed and closed after."""
    conn = connect(settings, name=name)
    try:
        with conn, conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


@functools.lru_cache(maxsize=64)
def _compose(template: str, schema: str) -> sql.Composed:
    return sql.SQL(template).format(
        schema=sql.Identifier(schema),
        outbox=sql.Identifier(schema, "outbox"),
        claims=sql.Identifier(schema, "claims"),
        wakeup=sql.Identifier(schema, "wakeup"),
        migrations=sql.Identifier(schema, "migrations"),
        inbox=sql.Identifier(schema, "inbox"),
        deliveries=sql.Identifier(schema, "deliveries"),
    )


def q(template: str, schema: str | None = None) -> sql.Composed:
    """``template`` with {outbox}, {claims}, ... as quoted, schema-qualified names."""
    return _compose(template, schema or get_settings().schema)


def channel(schema: str, queue: str) -> str:
    """The NOTIFY channel of one queue (matches the trigger's)."""
    return f"{schema}.{queue}"
