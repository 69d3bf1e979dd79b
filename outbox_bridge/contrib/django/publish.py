"""publish() on a Django connection or cursor, inside ``transaction.atomic()``."""

from __future__ import annotations

from typing import Any

from django.db.backends.utils import CursorWrapper

from ...outbox.adapters import refuse_autocommit


def execute(tx: Any, sql: str, params: tuple) -> None:
    wrapper = tx.db if isinstance(tx, CursorWrapper) else tx
    if getattr(wrapper, "vendor", None) != "postgresql":
        raise TypeError(f"publish() needs a PostgreSQL database; got {type(tx).__name__}")
    if wrapper.get_autocommit():  # Django commits each statement outside atomic()
        raise refuse_autocommit(tx, "Call it inside transaction.atomic()")
    with wrapper.cursor() as cur:
        cur.execute(sql, params)
