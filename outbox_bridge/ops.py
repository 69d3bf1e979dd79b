"""What the ``status`` and ``dead`` commands read and change, for the outbox
and for the inbox's deliveries (one queue per handler)."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from .config import Settings
from .db import q, transaction
from .queue import Queue

_HELD = "state IN ('retrying', 'dead')"


def show_key(key: bytes | memoryview | None) -> str | None:
    """A key as people read it: its text, or ``hex:...`` when it is not UTF-8 text."""
    if key is None:
        return None
    raw = bytes(key)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return "hex:" + raw.hex()
    return "hex:" + raw.hex() if "\x00" in text or text.startswith("hex:") else text


def parse_key(key: str) -> bytes:
    """The bytes of a key given as ``show_key`` shows it."""
    if key.startswith("hex:"):
        try:
            return bytes.fromhex(key[4:])
        except ValueError as exc:
            raise ValueError(f"--key {key!r}: not hex after 'hex:'") from exc
    return key.encode()


def status(settings: Settings, kafka: bool = True) -> dict[str, Any]:
    """Counts per state, oldest pending age, keys held back by a failed head, consumer lag."""
    from .inbox.consumer import consumer_group

    with transaction(settings, "outbox-bridge status") as cur:
        out = {"outbox": _outbox_status(cur, settings.schema)}
        out["inbox"] = _inbox_status(cur, settings.schema)
        cur.execute(q("SELECT DISTINCT topic FROM {handlers}", settings.schema))
        topics = [r[0] for r in cur.fetchall()]
        group = consumer_group(cur, settings)
    if kafka:
        out["inbox"]["consumer_group"] = group
        out["inbox"]["consumer_lag"] = consumer_lag(settings, group, topics)
    return out


def _outbox_status(cur, schema: str) -> dict[str, Any]:
    cur.execute(q("SELECT state, count(*) FROM {outbox} GROUP BY state", schema))
    counts = {"pending": 0, "waiting": 0, "retrying": 0, "dead": 0, **dict(cur.fetchall())}
    cur.execute(
        q(
            "SELECT extract(epoch FROM now() - min(created_at)) FROM {outbox}"
            " WHERE state = 'pending'",
            schema,
        )
    )
    oldest = cur.fetchone()[0]
    cur.execute(
        q(
            "SELECT h.topic, h.key, h.state, h.attempts, h.last_error,"
            " (SELECT count(*) FROM {outbox} w WHERE w.shard = h.shard AND w.topic = h.topic"
            "  AND w.key = h.key AND w.state IN ('pending', 'waiting'))"
            f" FROM {{outbox}} h WHERE h.{_HELD} AND h.key IS NOT NULL ORDER BY h.id LIMIT 100",
            schema,
        )
    )
    blocked = [
        {"topic": t, "key": show_key(k), "state": s, "attempts": a, "last_error": e, "waiting": w}
        for t, k, s, a, e, w in cur.fetchall()
    ]
    return {
        "counts": counts,
        "oldest_pending_seconds": None if oldest is None else float(oldest),
        "blocked_keys": blocked,
    }


def _inbox_status(cur, schema: str) -> dict[str, Any]:
    cur.execute(
        q(
            "SELECT handler, state, count(*),"
            " extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending'))"
            " FROM {deliveries} GROUP BY handler, state ORDER BY handler",
            schema,
        )
    )
    handlers: dict[str, Any] = {}
    for handler, state, count, oldest in cur.fetchall():
        entry = handlers.setdefault(
            handler,
            {"counts": {"pending": 0, "waiting": 0, "retrying": 0, "dead": 0, "done": 0},
             "oldest_pending_seconds": None},
        )  # fmt: skip
        entry["counts"][state] = count
        if oldest is not None:
            entry["oldest_pending_seconds"] = float(oldest)
    cur.execute(
        q(
            "SELECT h.handler, h.topic, h.key, h.state, h.attempts,"
            " h.last_error, (SELECT count(*) FROM {deliveries} w WHERE w.handler = h.handler"
            "  AND w.shard = h.shard AND w.topic = h.topic AND w.key = h.key"
            "  AND w.state IN ('pending', 'waiting'))"
            f" FROM {{deliveries}} h WHERE h.{_HELD} AND h.key IS NOT NULL"
            " ORDER BY h.id LIMIT 100",
            schema,
        )
    )
    for handler, t, k, s, a, e, w in cur.fetchall():
        handlers[handler].setdefault("blocked_keys", []).append(
            {
                "topic": t,
                "key": show_key(k),
                "state": s,
                "attempts": a,
                "last_error": e,
                "waiting": w,
            }
        )
    return {"handlers": handlers}


def consumer_lag(settings: Settings, group: str, topics: list[str]) -> list[dict[str, Any]]:
    """Per partition: the consumer group's committed offset, the end offset and the lag
    (the records from the committed offset, or the low watermark, to the end)."""
    if not topics:
        return []
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers,
         "group.id": group, "enable.auto.commit": False}
    )  # fmt: skip
    try:
        meta = consumer.list_topics(timeout=10).topics
        partitions = [
            TopicPartition(t, p) for t in sorted(topics) if t in meta for p in meta[t].partitions
        ]
        lag = []
        for tp in consumer.committed(partitions, timeout=10):
            if tp.error is not None:
                # the coordinator is loading (a broker restarted): no offset is not
                # "nothing committed", and the lag would read as the whole topic
                raise KafkaException(tp.error)
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            committed = tp.offset if tp.offset >= 0 else None
            # what the group still has to read: records before the low watermark are
            # gone (expired or deleted), and a group without a commit starts there
            start = low if committed is None else max(committed, low)
            lag.append(
                {"topic": tp.topic, "partition": tp.partition, "committed": committed,
                 "end": high, "lag": max(0, high - start)}
            )  # fmt: skip
        return lag
    finally:
        consumer.close()


def _where(topic, key, ids, handler) -> tuple[str, list]:
    where, params = ["state = 'dead'"], []
    if topic:
        where.append("topic = %s")
        params.append(topic)
    if key is not None:
        where.append("key = %s")
        params.append(parse_key(key))
    if ids:
        where.append("(id::text = ANY(%s) OR message_id::text = ANY(%s))")
        params += [list(ids), list(ids)]
    if handler:
        where.append("handler = %s")
        params.append(handler)
    return " AND ".join(where), params


def _tables(handler: str | None) -> list[str]:
    """The outbox unless a handler is named; the deliveries always."""
    return (["outbox"] if not handler else []) + ["deliveries"]


def dead_list(
    settings: Settings, topic=None, key=None, ids=(), handler=None, limit: int = 1000
) -> list[dict]:
    """Dead outbox rows and dead deliveries (``queue`` says which), oldest first."""
    found: list[dict] = []
    with transaction(settings, "outbox-bridge dead") as cur:
        for table in _tables(handler):
            where, params = _where(topic, key, ids, handler if table == "deliveries" else None)
            queue = "'outbox'" if table == "outbox" else "handler"
            cur.execute(
                q(
                    f"SELECT {queue} AS queue, id, message_id, topic,"
                    " key, attempts, last_error, created_at,"
                    f" failed_at, dead_at FROM {{{table}}} WHERE {where} ORDER BY id LIMIT %s",
                    settings.schema,
                ),
                params + [limit],
            )
            cols = [d.name for d in cur.description]
            for r in cur.fetchall():
                entry = dict(zip(cols, r, strict=True))
                entry["key"] = show_key(entry["key"])
                found.append(entry)
    return found


def dead_retry(settings: Settings, topic=None, key=None, ids=(), handler=None) -> int:
    """Dead rows become pending again, keeping their ids, so per-key order holds."""
    return _change(settings, topic, key, ids, handler, retry=True)


def dead_purge(settings: Settings, topic=None, key=None, ids=(), handler=None) -> int:
    """Delete dead rows for good; their keys flow again."""
    return _change(settings, topic, key, ids, handler, retry=False)


def _change(settings: Settings, topic, key, ids, handler, retry: bool) -> int:
    total = 0
    with transaction(settings, "outbox-bridge dead") as cur:
        for table in _tables(handler):
            where, params = _where(topic, key, ids, handler if table == "deliveries" else None)
            queue_of = "'outbox'" if table == "outbox" else "'inbox:' || handler"
            action = (
                f"UPDATE {{{table}}} SET state = 'pending', attempts = 0, claim_token = NULL,"
                f" lease_until = NULL, dead_at = NULL WHERE {where}"
                if retry
                else f"DELETE FROM {{{table}}} WHERE {where}"
            )
            cur.execute(
                q(f"{action} RETURNING {queue_of}, shard, topic, key", settings.schema), params
            )
            freed: dict[str, set[tuple]] = {}
            for queue, shard, topic_, key_ in cur.fetchall():
                freed.setdefault(queue, set()).add(
                    (shard, topic_, None if key_ is None else bytes(key_))
                )
                total += 1
            for queue, keys in freed.items():
                scope = queue.removeprefix("inbox:") if table == "deliveries" else None
                found = Queue(queue, table, settings.schema, scope=scope)
                found.unpark(cur, keys)  # the rows that waited behind them
                found.wake_shards(cur, {shard for shard, _t, _k in keys})
    return total


def prune_inbox(settings: Settings, older_than_seconds: float) -> int:
    """Forget inbox messages received before the cut-off whose deliveries are all done
    (what the worker's retention does after ``dedupe_window``; see ``retention``)."""
    from .worker.maintenance import prune

    return prune(settings, older_than_seconds)


def list_handlers(settings: Settings) -> list[dict]:
    """The handlers registered in the database, with their delivery counts."""
    with transaction(settings, "outbox-bridge handlers") as cur:
        cur.execute(
            q(
                "SELECT h.name, h.topic, h.max_retries, h.registered_at, h.seen_at,"
                " (SELECT count(*) FROM {deliveries} d WHERE d.handler = h.name"
                "  AND d.state <> 'done') AS open_deliveries"
                " FROM {handlers} h ORDER BY h.topic, h.name",
                settings.schema,
            )
        )
        cols = [d.name for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def forget_handler(settings: Settings, name: str) -> int:
    """Unregister a handler that no worker runs any more, with its open deliveries
    (a worker that still runs it registers it again at its next start)."""
    with transaction(settings, "outbox-bridge handlers") as cur:
        cur.execute(
            q("DELETE FROM {deliveries} WHERE handler = %s AND state <> 'done'", settings.schema),
            (name,),
        )
        dropped = cur.rowcount
        cur.execute(q("DELETE FROM {handlers} WHERE name = %s", settings.schema), (name,))
        if not cur.rowcount:
            raise ValueError(f"no handler {name!r} is registered")
        return dropped


def ensure_topics(
    settings: Settings, topics: list[str], partitions: int = 4, config: dict | None = None
) -> None:
    """Create the topics that do not exist yet (for the demo and the bench: clusters
    that, like most production ones, do not create topics on first use)."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    futures = admin.create_topics([NewTopic(t, partitions, 1, config=config or {})
                                   for t in topics])  # fmt: skip
    for future in futures.values():
        try:
            future.result(30)
        except Exception as exc:
            err = exc.args[0] if exc.args else None
            if getattr(err, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
