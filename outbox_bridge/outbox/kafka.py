"""One idempotent Kafka producer per task thread, and batch delivery.

A row whose expiry (its ``expires_at`` header) has passed is not produced at all
(*expired*). What Kafka says about a row falls in one of three kinds. *Delivered*. *Failed*:
the message itself is refused (too large, invalid), which costs an attempt and
holds its key. *Later*: the topic cannot take messages right now (unknown
topic, no leader, not enough replicas, not authorized, timed out) or the
producer itself is broken; no attempt is charged: the topic pauses, or the
producer is rebuilt, and the rows wait.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource
from kombu.utils.imports import symbol_by_name

from ..config import Settings, kafka_client, kafka_connection
from ..message import expiry_of, kafka_headers, record_size
from ..shardtask import HeldKeys
from . import Row

log = logging.getLogger(__name__)

# The topic (or its partition) cannot take messages now; not the message's fault.
TOPIC_UNAVAILABLE = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._QUEUE_FULL,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.KAFKA_STORAGE_ERROR,
    }
)

BACKSTOP_SECONDS = 60.0  # librdkafka's message timeout beyond the relay's deadline
ORDER_BROKEN = "key order broken in Kafka"  # the soak looks for it in the workers' logs
PURGE_REPORT_SECONDS = 5.0  # purged messages report at once; more means a broken producer
TOPIC_INFO_SECONDS = 30.0  # how long a topic's limits are trusted
UNDESCRIBED_TOPIC_SECONDS = 2.0  # how soon a topic without an answer is asked again


def describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


def _is_fatal(err: KafkaError) -> bool:
    return err.fatal() or err.code() == KafkaError._FATAL


@dataclass
class Outcome:
    """What Kafka said about a batch of rows."""

    delivered: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # row id -> error, charged
    later: list[int] = field(default_factory=list)  # not charged: wait for the topic/producer
    paused_topics: dict[str, str] = field(default_factory=dict)  # topic -> why
    skipped: list[int] = field(default_factory=list)  # held back behind a failed key
    expired: list[int] = field(default_factory=list)  # past their expiry: not produced
    fatal: str | None = None  # the producer broke; it is rebuilt
    # (row not delivered, a later row of its key that was): Kafka has the key out of order
    out_of_order: list[tuple[int, int]] = field(default_factory=list)


def order_breaks(rows: Sequence[Row], outcome: Outcome) -> list[tuple[int, int]]:
    """Pairs (earlier row, later row) of one key where Kafka acknowledged the later
    row but not the earlier one: the key is out of order in the topic, which
    cannot be undone. The idempotent producer should make this impossible; the
    relay checks every batch so that it is seen (logged, counted) if it is not."""
    if len(outcome.delivered) == len(rows):
        return []  # the usual batch: all of it delivered
    delivered = set(outcome.delivered) | set(outcome.expired)  # expired: never to be sent
    missing: dict[tuple[str, bytes], int] = {}
    breaks = []
    for row in rows:
        if row.key is None:
            continue
        k = (row.topic, row.key)
        if row.id not in delivered:
            missing.setdefault(k, row.id)
        elif k in missing:
            breaks.append((missing[k], row.id))
    return breaks


def producer_config(settings: Settings) -> dict:
    conf = kafka_client(
        settings,
        **{
            "client.id": f"outbox-bridge-{socket.gethostname()}-{os.getpid()}",
            "enable.idempotence": True,
            "acks": "all",
            # one request in flight per broker: a key's later row is never sent while
            # an earlier one's request is open, so a leader change mid-request cannot
            # reorder them (librdkafka's idempotent producer has reordered and duplicated
            # around leader transitions, confluentinc/librdkafka#4953); the relay's
            # backlog drain measured 8% slower (within the run-to-run spread)
            "max.in.flight.requests.per.connection": 1,
            # the Java client's partitioner: same key, same partition as Java producers
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
            # the relay's own delivery deadline (see Relay); the rows stay pending meanwhile
            "message.timeout.ms": 30_000,
            # a missing topic fails its messages soon (its topic pauses) instead of after 30 s
            "topic.metadata.propagation.max.ms": 2_000,
        },
    )
    conf.update(settings.producer_config)
    return conf


@dataclass
class TopicInfo:
    max_message_bytes: int | None = None
    compacted: bool = False
    until: float = 0.0


class Topics:
    """Each topic's own limits (max.message.bytes, compaction), read with the admin
    client and kept for a while: rows that the topic would refuse fail before they
    are produced, so the later rows of their key are never sent ahead of them.
    A topic that cannot be described (missing, not authorized) has no limits
    here: the producer finds out, and the topic pauses."""

    def __init__(self, conf: dict):
        self.admin = AdminClient(kafka_connection(conf))
        self.cache: dict[str, TopicInfo] = {}

    def get(self, topic: str, fresh: bool = False) -> TopicInfo:
        """The topic's limits; ``fresh``: asked now (before refusing a row on them)."""
        info = self.cache.get(topic)
        if fresh or info is None or info.until < time.monotonic():
            info = self.cache[topic] = self._look_up(topic)
        return info

    def _look_up(self, topic: str) -> TopicInfo:
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        try:
            configs = self.admin.describe_configs([resource])[resource].result(5)
        except Exception as exc:  # noqa: BLE001 - no answer: let the producer find out
            log.debug("topic %s: no configs (%s)", topic, exc)
            return TopicInfo(until=time.monotonic() + UNDESCRIBED_TOPIC_SECONDS)
        limit = configs.get("max.message.bytes")
        policy = configs.get("cleanup.policy")
        return TopicInfo(
            max_message_bytes=int(limit.value) if limit is not None else None,
            compacted=policy is not None and "compact" in (policy.value or ""),
            until=time.monotonic() + TOPIC_INFO_SECONDS,
        )


def refusal(row: Row, info: TopicInfo) -> str | None:
    """Why the topic would refuse this row, or None."""
    if info.compacted and row.key is None:
        return "INVALID_RECORD: a compacted topic needs a key"
    if info.max_message_bytes is None:
        return None
    size = record_size(row.key, row.value, row.headers or [])
    if size > info.max_message_bytes:
        return (
            f"MSG_SIZE_TOO_LARGE: a record of about {size} bytes is too large for topic"
            f" {row.topic} (max.message.bytes {info.max_message_bytes})"
        )
    return None


class Relay:
    """Produces outbox rows to Kafka and reports, per row, what happened."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pid = os.getpid()
        conf = producer_config(settings)
        # ``message.timeout.ms`` is the relay's deadline, kept by purging the whole
        # batch at once; librdkafka's own timer, which fails queued messages one by
        # one (a key's later message could go out after an earlier one failed), is
        # set beyond it and only bounds a producer that is being dropped.
        self.timeout = int(conf.get("message.timeout.ms", 30_000)) / 1000 or float("inf")
        if self.timeout != float("inf"):  # 0: no deadline but the lease's
            conf["message.timeout.ms"] = round((self.timeout + BACKSTOP_SECONDS) * 1000)
        self.producer = Producer(conf)
        self.topics = Topics(conf)
        # a callable(row) that may raise to fail a row: validation, fault injection
        self.before_produce: Callable[[Row], None] | None = (
            symbol_by_name(settings.before_produce) if settings.before_produce else None
        )
        self.broken = False

    def deliver(self, rows: Sequence[Row], until: float | None = None) -> Outcome:
        """Produce ``rows`` in order and wait for every delivery report, at most
        ``message.timeout.ms`` and never past ``until`` (a ``time.monotonic()``
        value: the caller's lease on the rows, less a margin).

        A row that fails before it is sent holds back the later rows of its key
        in this batch (they are ``skipped``), so per-key order is kept; rows of
        a topic that cannot take messages now wait (``later``). What is not
        delivered by the deadline is purged from the producer all at once (so
        nothing of this batch goes out after the caller's lease, when the rows
        may have a new owner) and waits (``later``).
        """
        outcome = Outcome()
        held = HeldKeys()
        pending = 0

        def report(row: Row, err: KafkaError | None, _msg) -> None:
            nonlocal pending
            pending -= 1
            if err is None:
                outcome.delivered.append(row.id)
            else:
                self._classify(outcome, row, err)

        hook = self.before_produce
        for row in rows:
            expires = expiry_of(row.headers) if row.headers is not None else None
            if expires is not None and expires <= time.time():
                outcome.expired.append(row.id)  # holds no key: the later rows go on
                continue
            if held.holds(row.topic, row.key):
                outcome.skipped.append(row.id)
                continue
            if row.topic in outcome.paused_topics or outcome.fatal:
                outcome.later.append(row.id)
                continue
            try:
                refused = refusal(row, self.topics.get(row.topic))
                if refused:  # the limits may have changed since: ask again first
                    refused = refusal(row, self.topics.get(row.topic, fresh=True))
                if refused:
                    raise _Refused(refused)
                if hook is not None:
                    hook(row)
                # asked again: a topic's limits may have taken seconds to read (Kafka away)
                if expires is not None and expires <= time.time():
                    outcome.expired.append(row.id)
                    continue
                self._produce(row, functools.partial(report, row))
                pending += 1
            except Exception as exc:  # a message that cannot even be queued
                err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
                if isinstance(err, KafkaError):
                    self._classify(outcome, row, err)
                else:
                    outcome.failed[row.id] = (
                        str(exc) if isinstance(exc, _Refused) else (f"{type(exc).__name__}: {exc}")
                    )
                if row.id not in outcome.later:
                    held.add(row.topic, row.key)
        deadline = time.monotonic() + self.timeout
        if until is not None:
            deadline = min(deadline, until)
        while pending > 0 and time.monotonic() < deadline:
            # flush, not poll: it sends what linger.ms would still hold back
            self.producer.flush(min(0.05, max(0.0, deadline - time.monotonic())))
        if pending > 0:
            log.warning(
                "%d of %d rows not delivered in time: purged together, they wait;"
                " the producer is made again",
                pending,
                len(rows),
            )
            self.producer.purge(in_queue=True, in_flight=True, blocking=True)
            reports_by = time.monotonic() + PURGE_REPORT_SECONDS
            while pending > 0 and time.monotonic() < reports_by:
                self.producer.poll(0.05)  # the purged ones report _PURGE_QUEUE/_INFLIGHT
            # a new producer, new connections: the purged requests no longer count
            # towards socket.timeout.ms, so a silent connection would be kept for ever
            self.broken = True
            if pending > 0:
                raise RuntimeError(f"{pending} delivery reports missing after a purge")
        if outcome.fatal:
            self.broken = True
            log.error("the Kafka producer hit a fatal error (%s); it is rebuilt", outcome.fatal)
        outcome.out_of_order = order_breaks(rows, outcome)
        if outcome.out_of_order:
            topic_of = {row.id: row.topic for row in rows}
            for earlier, later in outcome.out_of_order:
                why = outcome.failed.get(earlier) or outcome.paused_topics.get(
                    topic_of[earlier], outcome.fatal or "held back or not sent"
                )
                log.error(
                    "%s: row %d was not delivered (%s) but row %d of its key, after it, was",
                    ORDER_BROKEN,
                    earlier,
                    why,
                    later,
                )
        return outcome

    @staticmethod
    def _classify(outcome: Outcome, row: Row, err: KafkaError) -> None:
        if _is_fatal(err):
            outcome.fatal = outcome.fatal or describe(err)
            outcome.later.append(row.id)
        elif err.code() in TOPIC_UNAVAILABLE:
            outcome.paused_topics.setdefault(row.topic, describe(err))
            outcome.later.append(row.id)
        else:
            outcome.failed[row.id] = describe(err)

    def _produce(self, row: Row, callback) -> None:
        while True:
            try:
                self.producer.produce(
                    row.topic,
                    value=row.value,
                    key=row.key,
                    headers=kafka_headers(row.headers, row.message_id),
                    on_delivery=callback,
                )
                return
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.1)

    def close(self, timeout: float = 10.0) -> None:
        # deliver() waits for every report: what is still queued here belongs to an
        # interrupted round whose rows stay pending; it must not go out later
        self.producer.purge(in_queue=True, in_flight=True, blocking=False)
        self.producer.flush(timeout)


class _Refused(Exception):
    """The topic would refuse this row (checked before producing)."""


_local = threading.local()


def get_relay(settings: Settings) -> Relay:
    """This thread's relay, made on first use (after the worker forked), and made
    again after its producer broke (a fatal error)."""
    relay = getattr(_local, "relay", None)
    if relay is not None and relay.broken:
        reset_relay()
        relay = None
    if relay is None or relay.pid != os.getpid():
        relay = _local.relay = Relay(settings)
    return relay


def reset_relay() -> None:
    """Drop this thread's producer; the next use makes a new one."""
    relay = getattr(_local, "relay", None)
    _local.relay = None
    if relay is not None and relay.pid == os.getpid():
        try:
            relay.close(1.0)
        except Exception:  # noqa: BLE001 - best effort on a broken producer
            log.exception("closing the Kafka producer failed")
