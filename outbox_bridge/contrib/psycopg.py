"""publish() and publish_async() on psycopg 3 connections and cursors."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import pq

from ..outbox.adapters import refuse_autocommit, wrong_side

_HOW = "Open one (with conn.transaction():, or a connection without autocommit)"


def _check(tx: Any, conn: Any) -> None:
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        raise refuse_autocommit(tx, _HOW)


def execute(tx: Any, sql: str, params: tuple) -> None:
    if isinstance(tx, (psycopg.AsyncConnection, psycopg.AsyncCursor)):
        raise wrong_side(tx, asynchronous=True)
    conn = tx.connection if isinstance(tx, psycopg.Cursor) else tx
    _check(tx, conn)
    # our own plain cursor: the caller's keeps its results, whatever its cursor_factory
    with psycopg.Cursor(conn) as cur:
        cur.execute(sql, params)


async def execute_async(tx: Any, sql: str, params: tuple) -> None:
    if not isinstance(tx, (psycopg.AsyncConnection, psycopg.AsyncCursor)):
        raise wrong_side(tx, asynchronous=False)
    conn = tx.connection if isinstance(tx, psycopg.AsyncCursor) else tx
    _check(tx, conn)
    async with psycopg.AsyncCursor(conn) as cur:
        await cur.execute(sql, params)
