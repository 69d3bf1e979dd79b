"""SQLAlchemy: publish() on a Session or Connection (any PostgreSQL driver),
publish_async() on an AsyncSession or AsyncConnection, and handlers that get a
``Session`` bound to their delivery's transaction (``@outbox_handler(..., session=)``).

A session that has not begun a transaction begins one, as for any ORM write:
the message is written when the session commits, and not if it rolls back.
An engine in ``AUTOCOMMIT`` isolation is refused (``NotInTransaction``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, exc, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import StaticPool

from ..errors import NotInTransaction
from ..outbox.adapters import numbered, refuse_autocommit, wrong_side

_HOW = "Use an engine or connection without AUTOCOMMIT isolation"


def _is_async(tx: Any) -> bool:
    return type(tx).__module__.startswith("sqlalchemy.ext.asyncio")


def _statement(sql: str, params: tuple) -> tuple[Any, dict]:
    return text(numbered(sql, lambda n: f":p{n}")), {f"p{n}": v for n, v in enumerate(params, 1)}


def _check(tx: Any, conn: Connection) -> None:
    if getattr(conn.connection.dbapi_connection, "autocommit", False):
        raise refuse_autocommit(tx, _HOW)


def _not_begun(tx: Any, error: Exception) -> NotInTransaction:
    return NotInTransaction(f"publish() got a {type(tx).__name__} that cannot begin: {error}")


def execute(tx: Any, sql: str, params: tuple) -> None:
    if _is_async(tx):
        raise wrong_side(tx, asynchronous=True)
    try:
        conn = tx if isinstance(tx, Connection) else tx.connection()  # Session, scoped_session
    except exc.InvalidRequestError as error:  # a Session with autobegin=False, not begun
        raise _not_begun(tx, error) from error
    _check(tx, conn)
    conn.execute(*_statement(sql, params))


async def execute_async(tx: Any, sql: str, params: tuple) -> None:
    from sqlalchemy.ext.asyncio import AsyncConnection

    if not _is_async(tx):
        raise wrong_side(tx, asynchronous=False)
    try:
        conn = tx if isinstance(tx, AsyncConnection) else await tx.connection()
    except exc.InvalidRequestError as error:
        raise _not_begun(tx, error) from error
    _check(tx, conn.sync_connection)
    await conn.execute(*_statement(sql, params))


# Handlers: a Session on the worker's own psycopg2 connection and transaction.

_local = threading.local()


class HandlerRolledBack(NotInTransaction):
    """A handler's Session tried to commit or roll back the delivery's transaction."""


def _refuse_end(_dbapi_connection: Any) -> None:
    raise HandlerRolledBack(
        "a handler's Session cannot end its delivery's transaction (it also marks the"
        " delivery done): raise an exception to undo the handler's writes"
    )


def bind(conn: Any) -> Connection:
    """A SQLAlchemy Connection on the psycopg2 connection ``conn``, inside a transaction
    SQLAlchemy never ends: outbox-bridge commits it with "done". Call it while ``conn``
    is idle (the first connect of an engine ends with a rollback)."""
    cached = getattr(_local, "bound", None)
    if cached is not None and cached[0] is conn and not cached[1].closed:
        sa_conn = cached[1]
    else:
        engine = create_engine(
            "postgresql+psycopg2://",
            creator=lambda: conn,
            poolclass=StaticPool,
            pool_reset_on_return=None,
        )
        sa_conn = engine.connect()
        # from now on SQLAlchemy neither commits nor rolls back this connection
        engine.dialect.do_commit = _refuse_end
        engine.dialect.do_rollback = _refuse_end
        _local.bound = (conn, sa_conn)
    if not sa_conn.in_transaction():
        sa_conn.begin()  # psycopg2 begins on the next statement: no SQL here
    return sa_conn


def session_for(factory: Callable[..., Any], conn: Any) -> Any:
    """A Session from ``factory`` (a sessionmaker or Session class) joined to ``conn``'s
    transaction: its commit() only flushes; its rollback() raises."""
    return factory(bind=bind(conn), join_transaction_mode="rollback_only")
