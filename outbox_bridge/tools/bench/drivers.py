"""psycopg2 or psycopg 3 for the worker: the relay's database round trips on each.

A round is what a relay task does to the database per batch: read ``rows``
outbox rows (key, value, headers) and delete them by id (rolled back, so the
next round finds them again); and ``publish()`` of ``rows`` messages in one
transaction (rolled back). Each driver runs the same rounds on the same rows.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from ...config import Settings
from ...db import connect
from ...outbox.publish import publish
from ...queries import plain as text

_READ = "SELECT id, topic, key, value, headers FROM {outbox} WHERE topic = %s ORDER BY id LIMIT %s"
_DELETE = "DELETE FROM {outbox} WHERE id = ANY(%s)"
TOPIC = "bench-drivers"


def _rounds(
    conn: Any, cursor: Callable[[], Any], settings: Settings, rows: int, rounds: int, value: bytes
) -> dict[str, float]:
    read, delete = text(_READ, settings.schema), text(_DELETE, settings.schema)
    relay, pub = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with cursor() as cur:
            cur.execute(read, (TOPIC, rows))
            ids = [r[0] for r in cur.fetchall()]
            cur.execute(delete, (ids,))
        conn.rollback()
        relay.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with cursor() as cur:
            for i in range(rows):
                publish(cur, "bench-drivers-publish", value, key=f"key-{i % 100}")
        conn.rollback()
        pub.append(time.perf_counter() - t0)
    return {
        "relay_round_ms": round(statistics.median(relay) * 1000, 1),
        "relay_rows_per_s": round(rows / statistics.median(relay)),
        "publish_per_s": round(rows / statistics.median(pub)),
    }


def compare(settings: Settings, rows: int = 2000, rounds: int = 15, size: int = 1024) -> dict:
    """Median of ``rounds`` rounds per driver; psycopg 3 only if it is installed."""
    value = b"x" * size
    conn = connect(settings)
    with conn, conn.cursor() as cur:
        for _ in range(rows):
            publish(cur, TOPIC, value, key=str(uuid.uuid4()), headers={"type": "T"})
    out: dict[str, Any] = {"rows": rows, "rounds": rounds, "size": size}
    try:
        out["psycopg2"] = _rounds(conn, conn.cursor, settings, rows, rounds, value)
        try:
            import psycopg
        except ImportError:
            return out
        p3 = psycopg.connect(settings.database_url)
        try:
            out["psycopg3_text"] = _rounds(p3, p3.cursor, settings, rows, rounds, value)
            binary = lambda: p3.cursor(binary=True)  # noqa: E731
            out["psycopg3_binary"] = _rounds(p3, binary, settings, rows, rounds, value)
        finally:
            p3.close()
    finally:
        with conn, conn.cursor() as cur:
            cur.execute(text("DELETE FROM {outbox} WHERE topic = %s", settings.schema), (TOPIC,))
        conn.close()
    return out
