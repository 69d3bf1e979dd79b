"""What the ``status`` and ``dead`` commands read and change."""

from __future__ import annotations

from typing import Any

from .config import Settings
from .db import connect, q
from .queue import Queue


def status(settings: Settings) -> dict[str, Any]:
    """Counts per state, oldest pending age, and the keys held back by a failed head."""
    conn = connect(settings, name="outbox-bridge status")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(q("SELECT state, count(*) FROM {outbox} GROUP BY state", settings.schema))
            counts = {"pending": 0, "retrying": 0, "dead": 0}
            counts.update(dict(cur.fetchall()))
            cur.execute(
                q(
                    "SELECT extract(epoch FROM now() - min(created_at)) FROM {outbox}"
                    " WHERE state = 'pending'",
                    settings.schema,
                )
            )
            oldest = cur.fetchone()[0]
            cur.execute(
                q(
                    "SELECT h.topic, convert_from(h.key, 'UTF8'), h.state, h.attempts,"
                    " h.last_error, (SELECT count(*) FROM {outbox} w WHERE w.shard = h.shard"
                    "  AND w.topic = h.topic AND w.key = h.key AND w.state = 'pending')"
                    " FROM {outbox} h WHERE h.state <> 'pending' AND h.key IS NOT NULL"
                    " ORDER BY h.id LIMIT 100",
                    settings.schema,
                )
            )
            blocked = [
                {"topic": t, "key": k, "state": s, "attempts": a, "last_error": e, "waiting": w}
                for t, k, s, a, e, w in cur.fetchall()
            ]
    finally:
        conn.close()
    return {
        "outbox": {
            "counts": counts,
            "oldest_pending_seconds": None if oldest is None else float(oldest),
            "blocked_keys": blocked,
        }
    }


def _filters(topic: str | None, key: str | None, ids: tuple[str, ...]) -> tuple[str, list]:
    where, params = ["state = 'dead'"], []
    if topic:
        where.append("topic = %s")
        params.append(topic)
    if key is not None:
        where.append("key = %s")
        params.append(key.encode())
    if ids:
        where.append("(id::text = ANY(%s) OR message_id::text = ANY(%s))")
        params += [list(ids), list(ids)]
    return " AND ".join(where), params


def dead_list(settings: Settings, topic=None, key=None, ids=(), limit: int = 1000) -> list[dict]:
    where, params = _filters(topic, key, ids)
    conn = connect(settings, name="outbox-bridge dead")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                q(
                    "SELECT id, message_id, topic, convert_from(key, 'UTF8'), attempts,"
                    " last_error, created_at, failed_at, dead_at FROM {outbox}"
                    f" WHERE {where} ORDER BY id LIMIT %s",
                    settings.schema,
                ),
                params + [limit],
            )
            cols = [d.name for d in cur.description]
            rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        conn.close()
    for row in rows:
        row["key"] = row.pop("convert_from")
    return rows


def dead_retry(settings: Settings, topic=None, key=None, ids=()) -> int:
    """Dead rows become pending again, keeping their ids, so per-key order holds."""
    where, params = _filters(topic, key, ids)
    queue = Queue("outbox", "outbox", settings.schema)
    conn = connect(settings, name="outbox-bridge dead")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                q(
                    "UPDATE {outbox} SET state = 'pending', attempts = 0, claim_token = NULL,"
                    f" lease_until = NULL, dead_at = NULL WHERE {where} RETURNING shard",
                    settings.schema,
                ),
                params,
            )
            shards = [r[0] for r in cur.fetchall()]
            if shards:
                queue.wake_shards(cur, shards)
    finally:
        conn.close()
    return len(shards)


def dead_purge(settings: Settings, topic=None, key=None, ids=()) -> int:
    where, params = _filters(topic, key, ids)
    queue = Queue("outbox", "outbox", settings.schema)
    conn = connect(settings, name="outbox-bridge dead")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                q(f"DELETE FROM {{outbox}} WHERE {where} RETURNING shard", settings.schema),
                params,
            )
            shards = [r[0] for r in cur.fetchall()]
            if shards:
                queue.wake_shards(cur, shards)
    finally:
        conn.close()
    return len(shards)
