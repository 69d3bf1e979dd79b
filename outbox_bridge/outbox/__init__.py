"""The outbox side: ``publish`` writes a message in the caller's transaction
(``publish``), the publish tasks send it to Kafka (``tasks``, ``kafka``)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Settings
from ..queue import Queue


@dataclass(frozen=True)
class Row:
    """One queued message, as fetched for delivery."""

    id: int
    message_id: str
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list | None
    # when the writer's transaction began (epoch seconds), for the latency metric
    created_at: float | None = None


def _row(r: tuple) -> Row:
    # bytea arrives as memoryview; the Kafka client wants bytes
    key, value = r[3], r[4]
    return Row(
        r[0],
        r[1],
        r[2],
        None if key is None else bytes(key),
        None if value is None else bytes(value),
        r[5],
        r[6],
    )


@dataclass(frozen=True)
class OutboxQueue(Queue):
    """The outbox's queue: rows fetched whole for the relay, and the idle lock that
    tells committing writers whether an idle dispatcher waits for their NOTIFY."""

    def fetch(
        self,
        cur,
        shards: Sequence[int],
        limit: int,
        max_bytes: int = 2**62,
        skip_topics: Sequence[str] = (),
    ) -> tuple[list[Row], set[int]]:
        """The next rows of the shards, oldest first, at most ``limit`` rows and about
        ``max_bytes`` of values, skipping keys held by a failed head and the
        ``skip_topics``; and the shards that may have more."""
        rows, full = self._fetch(cur, "outbox.row_columns", shards, limit, max_bytes, skip_topics)
        return [_row(r[:-2]) for r in rows], full

    def fetch_held(self, cur, ids: Sequence[int], token: uuid.UUID) -> list[tuple[Row, int]]:
        """Retrying rows still owned by ``token``, locked, with their attempts and shard."""
        self._run(
            cur,
            "outbox.fetch_held",
            {"row_columns": "outbox.row_columns"},
            ids=list(ids),
            token=token,
        )
        return [(_row(r[:7]), r[7], r[8]) for r in cur.fetchall()]

    def set_idle(self, cur, idle: bool) -> bool:
        """Take the idle lock (commits of ``wake = "notify"`` NOTIFY while it is held)
        or give it back; True if this session holds it now. Taking it fails while a
        transaction that published without a NOTIFY is open: still busy, then."""
        self._run(cur, "outbox.idle_lock" if idle else "outbox.idle_unlock")
        (result,) = cur.fetchone()
        return bool(result) if idle else False


def outbox_queue(settings: Settings) -> OutboxQueue:
    return OutboxQueue(name="outbox", table="outbox", schema=settings.schema, in_memory=True)
