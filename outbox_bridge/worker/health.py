"""Probes for orchestrators: ``outbox-bridge health --live`` and ``--ready``.

Live: each long-running loop of the worker (the watcher, the inbox consumer,
retention) touches a heartbeat file of its own at least every second while it
runs, also while it waits to reconnect; a loop that hangs stops touching it.
A stopped worker removes its files. Ready: the database answers, its schema has
every migration this version needs, and Kafka answers a metadata request.
"""

from __future__ import annotations

import time

from ..config import Settings
from ..loops import health_dir
from ..queries import render


def live(settings: Settings, max_age: float) -> tuple[bool, list[str]]:
    """Whether every loop with a heartbeat file touched it in the last ``max_age``
    seconds (and at least one has one); with a line per loop."""
    where = health_dir(settings)
    found = sorted(where.glob("*")) if where.is_dir() else []
    if not found:
        return False, [f"no outbox-bridge loop runs here (no heartbeat in {where})"]
    lines, ok = [], True
    now = time.time()
    for path in found:
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue  # removed by a stopping worker just now
        fresh = age <= max_age
        ok = ok and fresh
        lines.append(f"{path.name}: {'alive' if fresh else 'STALE'}, last beat {age:.1f}s ago")
    return ok, lines


def ready(settings: Settings, timeout: float = 5.0) -> tuple[bool, list[str]]:
    """Whether the database answers with an up-to-date schema and Kafka answers."""
    import psycopg2
    from confluent_kafka.admin import AdminClient

    from ..config import kafka_connection
    from ..db import transaction
    from ..inbox.consumer import consumer_config, replay_warnings
    from ..migrate import pending

    lines, ok = [], True
    topics: list[str] = []  # those the registered handlers consume
    try:
        missing = pending(settings)
        if missing:
            ok = False
            lines.append(f"database: migrations pending: {', '.join(missing)}")
        else:
            lines.append("database: answers, schema up to date")
            with transaction(settings, "outbox-bridge health", bounded=True) as cur:
                cur.execute(render("inbox.handler_topics", settings.schema))
                topics = sorted(r[0] for r in cur.fetchall())
    except psycopg2.Error as exc:
        ok = False
        lines.append(f"database: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
    conf = kafka_connection(consumer_config(settings, "outbox-bridge-health"))
    admin = AdminClient({**conf, "socket.timeout.ms": 3000})
    try:
        meta = admin.list_topics(timeout=timeout)
        lines.append(f"kafka: answers ({len(meta.brokers)} brokers)")
    except Exception as exc:  # noqa: BLE001 - KafkaException: no answer in time
        ok = False
        lines.append(f"kafka: no answer in {timeout:.0f}s ({exc})")
    else:  # a warning, not unreadiness: the worker runs, its dedupe has a gap
        lines += [f"kafka: warning: {w}" for w in replay_warnings(settings, admin, topics, timeout)]
    return ok, lines
