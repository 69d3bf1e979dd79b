"""publish() on a psycopg2 connection or cursor (the worker's own driver)."""

from __future__ import annotations

from typing import Any

import psycopg2.extensions as ext

from ..outbox.adapters import refuse_autocommit


def execute(tx: Any, sql: str, params: tuple) -> None:
    conn = tx.connection if isinstance(tx, ext.cursor) else tx
    if conn.autocommit and conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE:
        raise refuse_autocommit(tx, "Open one (autocommit off, or BEGIN)")
    with conn.cursor() as cur:  # a cursor of our own: the caller's keeps its results
        cur.execute(sql, params)
