"""The Kafka consumer that fills the inbox.

Each polled batch is written to the inbox (duplicates by topic and message id ignored)
together with one delivery per handler of its topic, in one transaction; the
Kafka offsets are committed only after that commit. A message whose headers
are broken still gets its inbox row, with dead deliveries that say why: the
loop never stops on bad input.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import psycopg2
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from ..config import Settings, kafka_client, kafka_connection
from ..db import channel, connect, is_transient, work
from ..events import emit
from ..loops import Heartbeat, run_forever
from ..message import MAX_KEY_BYTES, MESSAGE_ID_HEADER, as_stored, cloudevent_id
from ..queries import render
from ..queue import DEAD_COLUMNS, DeadMessage, dead_messages, fire_dead, shard_of

log = logging.getLogger(__name__)

# ids of messages from producers that set no message_id header
_NAMESPACE = uuid.UUID("5f1c3e1e-8a7b-4c1d-9a57-0b0f5e2d7c11")

# (task name, topic, max_retries, Celery queue or None: the default)
HandlerRow = tuple[str, str, "int | None", "str | None"]


def register_handlers(cur, settings: Settings, specs: Iterable[HandlerRow]) -> None:
    """Record (name, topic, max_retries, queue) of this worker's handlers in the database.
    A handler receives the messages stored after its first registration; the elected
    dispatcher sends its tasks to that queue, also from a worker that lacks it."""
    specs = sorted(specs)
    if specs:
        cur.execute(
            render("inbox.register_handlers", settings.schema),
            [list(c) for c in zip(*specs, strict=True)],
        )


def consumer_group(cur, settings: Settings) -> str:
    """The Kafka consumer group: the setting, else one derived from this inbox's
    database, so that two applications never share a group by accident."""
    if settings.consumer_group:
        return settings.consumer_group
    cur.execute(render("inbox.identity", settings.schema))
    database, ident = cur.fetchone()
    return f"outbox-bridge-{database}-{str(ident)[:8]}"


def consumer_config(settings: Settings, group: str) -> dict[str, Any]:
    conf = kafka_client(
        settings,
        **{
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "topic.metadata.refresh.interval.ms": 5000,
            # a crashed worker's partitions go to the others after 10 s, not 45 s
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 3000,
        },
    )
    conf.update(settings.consumer_config)
    return conf


def message_identity(msg: Any) -> tuple[uuid.UUID, str | None]:
    """The message id and any problem: the ``message_id`` header, else a CloudEvent's
    id (``message.cloudevent_id``), else one derived from its position in Kafka."""
    headers = msg.headers() or []
    raw = [v for k, v in headers if k == MESSAGE_ID_HEADER]
    if raw:
        try:
            return uuid.UUID(raw[-1].decode("ascii")), None
        except (AttributeError, UnicodeDecodeError, ValueError):
            problem = f"broken headers: {MESSAGE_ID_HEADER} is not a UUID: {raw[-1]!r:.80}"
            return _derived_id(msg), problem
    event = {k.lower(): v for k, v in headers if k.lower() in ("ce_id", "ce_source")}
    try:
        if event.get("ce_id"):
            source = event.get("ce_source")
            return cloudevent_id(source and source.decode(), event["ce_id"].decode()), None
    except UnicodeDecodeError:
        return _derived_id(msg), f"broken headers: ce_id or ce_source is not UTF-8: {event!r:.80}"
    return _derived_id(msg), None


def _derived_id(msg: Any) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{msg.topic()}/{msg.partition()}/{msg.offset()}")


def stored_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> list[list[Any]]:
    """A Kafka message's headers as the inbox stores them (``message.as_stored``)."""
    return [[name, as_stored(value)] for name, value in headers or []]


# the milliseconds a timestamptz of the inbox takes: years 1 to 9999, as Python's datetime
_MILLIS = range(-62_135_596_800_000, 253_402_300_800_000)
_MILLIS_2000 = 946_684_800_000  # PostgreSQL's binary timestamps count from 2000-01-01


def _timestamp_micros(msg: Any) -> int | None:
    """The message's timestamp as PostgreSQL's binary timestamptz (microseconds since
    2000), None when Kafka has none or a producer's is absurd (no reason to refuse it)."""
    kind, millis = msg.timestamp()
    if kind == TIMESTAMP_NOT_AVAILABLE or millis not in _MILLIS:
        return None
    return (millis - _MILLIS_2000) * 1000


# COPY's binary format (https://www.postgresql.org/docs/current/sql-copy.html)
_COPY_HEAD = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TAIL = struct.pack("!h", -1)
_NULL = struct.pack("!i", -1)
_ROW = struct.Struct("!hiii")  # field count; n: length, value; the message id's length
_INT4 = struct.Struct("!ii")
_INT8 = struct.Struct("!iq")
_LENGTH = struct.Struct("!i")
_FIELDS = 13  # the columns of inbox.batch_table


def _bytes(value: bytes | None) -> bytes:
    return _NULL if value is None else _LENGTH.pack(len(value)) + value


def _batch_row(
    n: int,
    message_id: uuid.UUID,
    msg: Any,
    headers: str,
    shard: int,
    key: bytes | None,
    problem: str | None,
) -> bytes:
    """One row of the batch table in COPY's binary format."""
    micros = _timestamp_micros(msg)
    return b"".join(
        (
            _ROW.pack(_FIELDS, 4, n, 16),
            message_id.bytes,
            _bytes(msg.topic().encode()),
            _INT4.pack(4, msg.partition()),
            _INT8.pack(8, msg.offset()),
            _bytes(msg.key()),
            _bytes(msg.value()),
            _bytes(b"\x01" + headers.encode()),  # jsonb: its format version, then the text
            _NULL if micros is None else _INT8.pack(8, micros),
            _bytes(key),
            _INT4.pack(4, shard),
            _bytes(b"dead" if problem else b"pending"),
            _bytes(None if problem is None else problem.encode()),
        )
    )


def store(
    cur,
    settings: Settings,
    messages: list,
    broken: str | None = None,
    dead: list[DeadMessage] | None = None,
) -> int:
    """Write a batch to the inbox, with one delivery per registered handler of each
    message's topic; returns how many messages were new.

    The batch goes to a temporary table with one binary ``COPY`` (values as they
    came, never escaped into SQL text), and one statement moves it into the inbox
    and makes the deliveries of what was new (``inbox.store_batch``).

    ``broken``: the messages could not be stored as they are; store them
    without headers, with dead deliveries that give this reason. ``dead``
    collects the deliveries that are dead from the start (for ``fire_dead``
    after the commit).
    """
    seen: set[tuple[str, uuid.UUID]] = set()  # the inbox deduplicates per topic
    rows = [_COPY_HEAD]
    for msg in messages:
        message_id, problem = message_identity(msg)
        if (msg.topic(), message_id) in seen:
            continue  # the same message twice in one batch
        seen.add((msg.topic(), message_id))
        key = msg.key()
        if key is not None and len(key) > MAX_KEY_BYTES:
            problem = (
                f"key of {len(key)} bytes is longer than the {MAX_KEY_BYTES} bytes whose order"
                " outbox-bridge keeps" + (f"; {problem}" if problem else "")
            )
            key = None  # dead, and too long for the held-keys index: it holds nothing
        headers = "[]" if broken else json.dumps(stored_headers(msg.headers()))
        shard = shard_of(msg.topic(), key, settings.shards)
        rows.append(_batch_row(len(rows), message_id, msg, headers, shard, key, broken or problem))
    rows.append(_COPY_TAIL)
    cur.execute(render("inbox.batch_table", settings.schema))
    cur.copy_expert(render("inbox.copy_batch", settings.schema), io.BytesIO(b"".join(rows)))
    cur.execute(render("inbox.store_batch", settings.schema, {"dead_columns": DEAD_COLUMNS}))
    found = cur.fetchall()
    new, delivered = found[0][-2:]
    if dead is not None:  # rare: the deliveries that are dead from the start
        dead += [d for r in found if r[0] is not None for d in dead_messages(r[0], [r[1:-2]])]
    if delivered:
        cur.execute("SELECT pg_notify(%s, 'new')", (channel(settings.schema, "inbox"),))
    return new


def store_each(
    cur, settings: Settings, messages: list, dead: list[DeadMessage] | None = None
) -> int:
    """The slow path after a batch failed: one message at a time, so that one
    message the database refuses becomes a dead entry instead of stopping the loop."""
    stored = 0
    for msg in messages:
        found: list[DeadMessage] = []  # kept only if its savepoint is
        cur.execute("SAVEPOINT outbox_bridge_message")
        try:
            stored += store(cur, settings, [msg], dead=found)
        except psycopg2.Error as exc:
            if is_transient(exc):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT outbox_bridge_message")
            reason = f"cannot be stored as it is: {str(exc).splitlines()[0]}"
            log.warning(
                "inbox: message %s/%d/%d %s", msg.topic(), msg.partition(), msg.offset(), reason
            )
            found = []
            stored += store(cur, settings, [msg], broken=reason, dead=found)
        cur.execute("RELEASE SAVEPOINT outbox_bridge_message")
        if dead is not None:
            dead += found
    return stored


def consume_batch(consumer: Consumer, size: int, timeout: float) -> list:
    """Up to ``size`` messages, as soon as there is one: what is fetched already comes
    along. (``consume(size, timeout)`` alone waits until it has ``size`` messages or
    the timeout ran out: up to ``timeout`` of latency at any rate below that.)"""
    batch = consumer.consume(1, timeout=timeout)
    if batch and size > 1:
        batch += consumer.consume(size - 1, timeout=0)
    return batch


class InboxConsumer:
    """Consumes every topic that has a handler into the inbox, until stopped."""

    def __init__(self, settings: Settings, handlers: list[HandlerRow]):
        self.settings = settings
        self.handlers = handlers  # (name, topic, max_retries) of this worker's handlers
        self.topics = sorted({row[1] for row in handlers})
        self.stored = 0  # new inbox rows written, for tests and logs
        self.heartbeat = Heartbeat(settings, "consumer")
        self.checked_replay = False

    def _warn_replay(self, conf: dict) -> None:
        from confluent_kafka.admin import AdminClient

        try:
            for line in replay_warnings(
                self.settings, AdminClient(kafka_connection(conf)), self.topics
            ):
                log.warning("inbox: %s", line)
        except Exception:  # noqa: BLE001 - a check, never a reason to stop
            log.exception("inbox: could not compare the topics' retention with the window")

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, restarting with backoff after an error."""
        run_forever(self._consume, stop, "inbox consumer", self.heartbeat)

    def _consume(self, stop: threading.Event) -> None:
        # made here, in the thread that uses it, after the worker forked
        conn = connect(self.settings, name="outbox-bridge inbox")
        consumer = None
        try:
            with work(conn, self.settings, "inbox consumer") as cur:
                register_handlers(cur, self.settings, self.handlers)
                group = consumer_group(cur, self.settings)
            conf = consumer_config(self.settings, group)
            consumer = Consumer(conf)
            consumer.subscribe(self.topics, on_assign=self._on_assign, on_lost=self._on_lost)
            log.info("inbox consumer (group %s) subscribed to %s", group, ", ".join(self.topics))
            if not self.checked_replay:  # once, beside the loop: it asks Kafka
                self.checked_replay = True
                threading.Thread(
                    target=self._warn_replay,
                    args=(conf,),
                    daemon=True,
                    name="outbox-bridge replay check",
                ).start()
            while not stop.is_set():
                self.heartbeat.beat()
                batch = consume_batch(consumer, self.settings.batch_size, 0.5)
                messages = []
                for msg in batch:
                    err = msg.error()
                    if err is None:
                        messages.append(msg)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("inbox consumer: %s", err)
                if not messages:
                    continue
                dead: list[DeadMessage] = []
                try:
                    with work(conn, self.settings, "inbox consumer") as cur:
                        self.stored += store(cur, self.settings, messages, dead=dead)
                except psycopg2.Error as exc:
                    if is_transient(exc):
                        raise
                    # one message the database refuses as it is: find it, store it as dead
                    dead = []
                    with work(conn, self.settings, "inbox consumer") as cur:
                        self.stored += store_each(cur, self.settings, messages, dead)
                fire_dead(dead)
                emit("consumed", messages)
                # only now, after the database commit
                commit_offsets(consumer, messages)
        finally:
            conn.close()
            if consumer is not None:
                consumer.close()

    @staticmethod
    def _on_assign(consumer: Consumer, partitions: list) -> None:
        log.info("inbox consumer assigned %s", [(p.topic, p.partition) for p in partitions])

    @staticmethod
    def _on_lost(consumer: Consumer, partitions: list) -> None:
        # never commit for partitions we lost: their new owner may be ahead
        log.warning("inbox consumer lost partitions %s", partitions)


# A commit refused because the group is rebalancing, or its coordinator moved or is
# loading (a broker restart): skipped. The next commit covers these offsets; the
# partitions' next owner re-reads from the last commit, and the inbox ignores what
# it already has. Stopping the loop instead would cost a rebalance each time.
REBALANCE_ERRORS = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError._NO_OFFSET,
        KafkaError._ASSIGNMENT_LOST,
        KafkaError._STATE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._WAIT_COORD,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
    }
)


def commit_offsets(consumer: Consumer, messages: list) -> bool:
    """Commit the offsets after ``messages``; False when a rebalance refused them."""
    try:
        consumer.commit(offsets=_next_offsets(messages), asynchronous=False)
        return True
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if not isinstance(err, KafkaError) or err.code() not in REBALANCE_ERRORS:
            raise
        log.info(
            "inbox consumer: offsets not committed now (%s); the next commit covers them",
            err.name(),
        )
        return False


def _next_offsets(messages: list) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for msg in messages:
        key = (msg.topic(), msg.partition())
        last[key] = max(last.get(key, -1), msg.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def replay_warnings(settings: Settings, admin, topics: list[str], timeout: float = 10.0):
    """A line per topic that can hand out records older than the dedupe window: a group
    whose offsets are reset or expired would read them again, and after the window
    the inbox no longer knows them (their handlers run again)."""
    from confluent_kafka.admin import ConfigResource

    window = settings.dedupe_window
    if window <= 0 or not topics:
        return []
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in sorted(topics)]
    lines = []
    for resource, future in admin.describe_configs(resources, request_timeout=timeout).items():
        try:
            configs = future.result(timeout)
        except Exception as exc:  # noqa: BLE001 - not described: nothing to say about it
            log.debug("topic %s: no configs (%s)", resource.name, exc)
            continue
        retention = int(configs["retention.ms"].value)
        segment = int(configs["segment.ms"].value)
        replay = None if retention < 0 else (retention + segment) / 1000
        if replay is None or replay > window:
            oldest = "records of any age" if replay is None else f"records up to {replay:.0f}s old"
            lines.append(
                f"topic {resource.name} can hand out {oldest} again (retention.ms + segment.ms),"
                f" longer than outbox_bridge_dedupe_window ({window:.0f}s): a message read again"
                " after the window is handled again"
            )
    return lines
