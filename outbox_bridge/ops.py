"""What the ``status`` and ``dead`` commands read and change, for the outbox
and for the inbox's deliveries (one queue per handler)."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from .config import Settings, kafka_client
from .db import transaction
from .inbox import inbox_queue
from .outbox import outbox_queue
from .queries import render
from .queue import Queue


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
    from .worker.election import dispatcher

    with transaction(settings, "outbox-bridge status") as cur:
        out: dict[str, Any] = {"dispatcher": dispatcher(cur, settings.schema)}
        out["outbox"] = _outbox_status(cur, settings)
        out["inbox"] = _inbox_status(cur, settings)
        cur.execute(render("ops.handler_topics", settings.schema))
        topics = [r[0] for r in cur.fetchall()]
        group = consumer_group(cur, settings)
    if kafka:
        out["inbox"]["consumer_group"] = group
        out["inbox"]["consumer_lag"] = consumer_lag(settings, group, topics)
    return out


def _queue_status(cur, settings: Settings, queue: Queue, done: bool) -> dict[str, Any]:
    blocked = [
        {"topic": t, "key": show_key(k), "state": s, "attempts": a, "last_error": e, "waiting": w}
        for t, k, s, a, e, w in queue.blocked_keys(cur)
    ]
    return {
        "counts": queue.counts(cur, done=done),
        "oldest_pending_seconds": queue.oldest_pending(cur, settings.shards),
        "blocked_keys": blocked,
    }


def _outbox_status(cur, settings: Settings) -> dict[str, Any]:
    out = _queue_status(cur, settings, outbox_queue(settings), done=False)
    count, next_due = scheduled(cur, settings)
    out["counts"]["scheduled"] = count
    out["next_due_seconds"] = next_due
    return out


def scheduled(cur, settings: Settings, cap: int | None = None) -> tuple[int, float | None]:
    """Delayed messages waiting (bounded by ``cap``), and seconds until the next is due."""
    cur.execute(render("ops.scheduled", settings.schema), {"cap": cap})
    count, next_due = cur.fetchone()
    return count, None if next_due is None else float(next_due)


def _inbox_status(cur, settings: Settings) -> dict[str, Any]:
    cur.execute(render("ops.handler_names", settings.schema))
    handlers: dict[str, Any] = {}
    for (name,) in cur.fetchall():
        entry = _queue_status(cur, settings, inbox_queue(settings, name), done=True)
        if not entry["blocked_keys"]:
            del entry["blocked_keys"]
        if any(entry["counts"].values()):
            handlers[name] = entry
    return {"handlers": handlers}


_COORDINATOR_MOVING = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
}


def _committed(consumer: Consumer, partitions: list, deadline: float) -> list:
    """The group's committed offsets; asked again while its coordinator moves or
    loads (a broker just started or restarted), until ``deadline`` (monotonic)."""
    while True:
        try:
            found = consumer.committed(partitions, timeout=max(0.1, deadline - time.monotonic()))
            error = next((tp.error for tp in found if tp.error is not None), None)
        except KafkaException as exc:
            error = exc.args[0]
        if error is None:
            return found
        # no offset is not "nothing committed": the lag would read as the whole topic
        if error.code() not in _COORDINATOR_MOVING or time.monotonic() > deadline:
            raise KafkaException(error)
        time.sleep(0.2)


def consumer_lag(settings: Settings, group: str, topics: list[str]) -> list[dict[str, Any]]:
    """Per partition: the consumer group's committed offset, the end offset and the lag
    (the records from the committed offset, or the low watermark, to the end)."""
    if not topics:
        return []
    consumer = Consumer(kafka_client(settings, **{"group.id": group, "enable.auto.commit": False}))
    try:
        meta = consumer.list_topics(timeout=10).topics
        partitions = [
            TopicPartition(t, p) for t in sorted(topics) if t in meta for p in meta[t].partitions
        ]
        lag = []
        for tp in _committed(consumer, partitions, time.monotonic() + 10):
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            committed = tp.offset if tp.offset >= 0 else None
            # what the group still has to read: records before the low watermark are
            # gone (expired or deleted), and a group without a commit starts there
            start = low if committed is None else max(committed, low)
            lag.append(
                {
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "committed": committed,
                    "end": high,
                    "lag": max(0, high - start),
                }
            )
        return lag
    finally:
        consumer.close()


# what the dead commands name: both kinds of dead; retry re-drives only the failed ones
DEAD_STATES = ["dead", "expired"]
RETRY_STATES = ["dead"]


def _match(topic, key, ids, handler, states=DEAD_STATES) -> dict[str, Any]:
    """The parameters of ``ops.dead_match`` (and the handler filter)."""
    return {
        "states": list(states),
        "topic": topic or None,
        "key": None if key is None else parse_key(key),
        "ids": [str(i) for i in ids],
        "handler": handler or None,
    }


_DEAD_MATCH = {"dead_match": "ops.dead_match"}


def _tables(handler: str | None, table: str | None = None) -> list[str]:
    """The outbox unless a handler is named; the deliveries always (``table``: that one
    alone, "outbox" or "deliveries")."""
    found = (["outbox"] if not handler else []) + ["deliveries"]
    if table is not None and table not in ("outbox", "deliveries"):
        raise ValueError(f"table must be 'outbox' or 'deliveries', got {table!r}")
    return [t for t in found if table in (None, t)]


def dead_list(
    settings: Settings, topic=None, key=None, ids=(), handler=None, limit: int = 1000, table=None
) -> list[dict]:
    """Dead outbox rows and dead deliveries (``queue`` says which), oldest first;
    ``state`` is "dead" (failed) or "expired" (past its ``expires_at``)."""
    found: list[dict] = []
    params = {**_match(topic, key, ids, handler), "limit": limit}
    with transaction(settings, "outbox-bridge dead") as cur:
        for name in _tables(handler, table):
            cur.execute(render(f"ops.dead_{name}", settings.schema, _DEAD_MATCH), params)
            cols = [d.name for d in cur.description]
            for r in cur.fetchall():
                entry = dict(zip(cols, r, strict=True))
                entry["key"] = show_key(entry["key"])
                found.append(entry)
    return found


def dead_retry(settings: Settings, topic=None, key=None, ids=(), handler=None, table=None) -> int:
    """Dead rows become pending again, keeping their ids, so per-key order holds.
    Expired ones stay as they are: their time has passed (purge them, or publish
    them again)."""
    return _change(settings, topic, key, ids, handler, True, table)


def dead_purge(settings: Settings, topic=None, key=None, ids=(), handler=None, table=None) -> int:
    """Delete dead (and expired) rows for good; their keys flow again."""
    return _change(settings, topic, key, ids, handler, False, table)


def _change(settings: Settings, topic, key, ids, handler, retry: bool, only=None) -> int:
    total = 0
    params = _match(topic, key, ids, handler, RETRY_STATES if retry else DEAD_STATES)
    with transaction(settings, "outbox-bridge dead") as cur:
        for table in _tables(handler, only):
            statement = ("ops.retry_" if retry else "ops.purge_") + table
            cur.execute(render(statement, settings.schema, _DEAD_MATCH), params)
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
        cur.execute(render("ops.handlers", settings.schema))
        cols = [d.name for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def forget_handler(settings: Settings, name: str) -> int:
    """Unregister a handler that no worker runs any more, with its open deliveries
    (a worker that still runs it registers it again at its next start)."""
    with transaction(settings, "outbox-bridge handlers") as cur:
        cur.execute(render("ops.forget_deliveries", settings.schema), {"name": name})
        dropped = cur.rowcount
        cur.execute(render("ops.forget_handler", settings.schema), {"name": name})
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

    admin = AdminClient(kafka_client(settings))
    futures = admin.create_topics([NewTopic(t, partitions, 1, config=config or {}) for t in topics])
    for future in futures.values():
        try:
            future.result(30)
        except Exception as exc:
            err = exc.args[0] if exc.args else None
            if getattr(err, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
