"""publish_async() on an asyncpg connection (or a pool's connection)."""

from __future__ import annotations

from typing import Any

from ..outbox.adapters import numbered, refuse_autocommit, wrong_side


def execute(tx: Any, sql: str, params: tuple) -> None:
    raise wrong_side(tx, asynchronous=True)


async def execute_async(tx: Any, sql: str, params: tuple) -> None:
    if not tx.is_in_transaction():  # asyncpg commits each statement outside tx.transaction()
        raise refuse_autocommit(tx, "Open one (async with conn.transaction():)")
    await tx.execute(numbered(sql, lambda n: f"${n}"), *params)
