"""Run one statement in the caller's transaction, whatever holds it.

``publish()`` takes what the application already has: a psycopg2 or psycopg 3
connection or cursor, a SQLAlchemy session or connection, a Django connection
or cursor, an asyncpg connection. The driver is told by the class's package,
so no driver is imported unless it is the one in use. Every adapter runs the
same SQL text (``%s`` placeholders; asyncpg and SQLAlchemy get them renamed)
and refuses a connection with no transaction open (``NotInTransaction``).
"""

from __future__ import annotations

import importlib
import itertools
import re
from typing import Any

from ..errors import NotInTransaction

# top-level package of the transaction's class -> module with its adapter
_ADAPTERS = {
    "psycopg2": "outbox_bridge.contrib.psycopg2",
    "psycopg": "outbox_bridge.contrib.psycopg",
    "sqlalchemy": "outbox_bridge.contrib.sqlalchemy",
    "django": "outbox_bridge.contrib.django.publish",
    "asyncpg": "outbox_bridge.contrib.asyncpg",
}
_SUPPORTED = (
    "a psycopg2 or psycopg 3 connection or cursor, a SQLAlchemy Session or Connection,"
    " a Django connection or cursor"
)
_SUPPORTED_ASYNC = (
    "an asyncpg connection, a psycopg 3 AsyncConnection or AsyncCursor,"
    " a SQLAlchemy AsyncSession or AsyncConnection"
)


_by_type: dict[type, Any] = {}


def _adapter(tx: Any) -> Any:
    kind = type(tx)
    if kind not in _by_type:
        module = next(
            (
                _ADAPTERS[top]
                for cls in kind.__mro__
                if (top := cls.__module__.partition(".")[0]) in _ADAPTERS
            ),
            None,
        )
        _by_type[kind] = module and importlib.import_module(module)
    return _by_type[kind]


def execute(tx: Any, sql: str, params: tuple) -> None:
    """Run ``sql`` with ``params`` in the transaction ``tx`` belongs to."""
    adapter = _adapter(tx)
    if adapter is None or not hasattr(adapter, "execute"):
        raise TypeError(f"publish() takes {_SUPPORTED}; got {type(tx).__name__}")
    adapter.execute(tx, sql, params)


async def execute_async(tx: Any, sql: str, params: tuple) -> None:
    """Like :func:`execute`, for asynchronous drivers."""
    adapter = _adapter(tx)
    if adapter is None or not hasattr(adapter, "execute_async"):
        raise TypeError(f"publish_async() takes {_SUPPORTED_ASYNC}; got {type(tx).__name__}")
    await adapter.execute_async(tx, sql, params)


def wrong_side(tx: Any, asynchronous: bool) -> TypeError:
    """The error for an async object given to publish() or the reverse."""
    if asynchronous:
        return TypeError(f"{type(tx).__name__} is asynchronous: use await publish_async(...)")
    return TypeError(f"{type(tx).__name__} is synchronous: use publish(...)")


def refuse_autocommit(tx: Any, how: str) -> NotInTransaction:
    """The error for a connection whose statements commit on their own."""
    return NotInTransaction(
        f"publish() got a {type(tx).__name__} with no transaction open (autocommit): the"
        f" message would commit on its own, apart from your writes. {how}, or use send()"
        " to write a message in a transaction of its own."
    )


_PLACEHOLDER = re.compile(r"%s")


def numbered(sql: str, make: Any) -> str:
    """``sql`` with its n-th ``%s`` replaced by ``make(n)`` (n from 1)."""
    count = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _: make(next(count)), sql)
