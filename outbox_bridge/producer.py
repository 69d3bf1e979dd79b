"""One idempotent Kafka producer per worker process, and batch delivery."""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Producer
from kombu.utils.imports import symbol_by_name

from .config import Settings
from .message import kafka_headers
from .queue import Row

log = logging.getLogger(__name__)

# Errors that say "Kafka is not reachable right now", not "this message is bad":
# they never count as an attempt (the circuit breaker pauses instead).
UNREACHABLE = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._FATAL,
        KafkaError._QUEUE_FULL,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    }
)


def describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


@dataclass
class Outcome:
    """What Kafka said about a batch of rows."""

    delivered: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # row id -> error, on its own
    unreachable: list[int] = field(default_factory=list)  # Kafka down: try again later
    skipped: list[int] = field(default_factory=list)  # held back behind a failed key


def producer_config(settings: Settings) -> dict:
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "client.id": f"outbox-bridge-{socket.gethostname()}-{os.getpid()}",
        "enable.idempotence": True,
        "acks": "all",
        # the Java client's partitioner: same key, same partition as Java producers
        "partitioner": "murmur2_random",
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 500_000,
        # bounded wait while Kafka is away; the rows stay pending meanwhile
        "message.timeout.ms": 30_000,
    }
    conf.update(settings.producer_config)
    return conf


class Relay:
    """Produces outbox rows to Kafka and reports, per row, what happened."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pid = os.getpid()
        self.producer = Producer(producer_config(settings))
        # a callable(row) that may raise to fail a row: validation, fault injection
        self.before_produce: Callable[[Row], None] | None = (
            symbol_by_name(settings.before_produce) if settings.before_produce else None
        )
        self.timeout = producer_config(settings).get("message.timeout.ms", 300_000) / 1000 + 10

    def deliver(self, rows: Sequence[Row]) -> Outcome:
        """Produce ``rows`` in order and wait for every delivery report.

        A row that fails before it is sent holds back the later rows of its key
        in this batch (they are ``skipped``), so per-key order is kept.
        """
        outcome = Outcome()
        held: set[tuple[str, bytes]] = set()
        pending = 0

        def report(row_id: int, err: KafkaError | None, _msg) -> None:
            nonlocal pending
            pending -= 1
            if err is None:
                outcome.delivered.append(row_id)
            elif err.code() in UNREACHABLE:
                outcome.unreachable.append(row_id)
            else:
                outcome.failed[row_id] = describe(err)

        hook = self.before_produce
        for row in rows:
            keyed = row.key is not None
            if keyed and (row.topic, row.key) in held:
                outcome.skipped.append(row.id)
                continue
            try:
                if hook is not None:
                    hook(row)
                self._produce(row, functools.partial(report, row.id))
                pending += 1
            except Exception as exc:  # a message that cannot even be queued
                err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
                if isinstance(err, KafkaError) and err.code() in UNREACHABLE:
                    outcome.unreachable.append(row.id)
                else:
                    outcome.failed[row.id] = (
                        describe(err)
                        if isinstance(err, KafkaError)
                        else (f"{type(exc).__name__}: {exc}")
                    )
                if keyed:
                    held.add((row.topic, row.key))
        deadline = time.monotonic() + self.timeout
        while pending > 0:
            if time.monotonic() > deadline:
                # librdkafka should have timed them out: treat as unreachable
                raise RuntimeError(f"{pending} delivery reports missing after the timeout")
            self.producer.poll(0.05)
        return outcome

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
        self.producer.flush(timeout)


_relay: Relay | None = None


def get_relay(settings: Settings) -> Relay:
    """This process's relay, made on first use (after the worker forked)."""
    global _relay
    if _relay is None or _relay.pid != os.getpid():
        _relay = Relay(settings)
    return _relay


def reset_relay() -> None:
    """Drop the producer (after a fatal error); the next use makes a new one."""
    global _relay
    if _relay is not None and _relay.pid == os.getpid():
        try:
            _relay.close(1.0)
        except Exception:  # noqa: BLE001 - best effort on a broken producer
            log.exception("closing the Kafka producer failed")
    _relay = None
