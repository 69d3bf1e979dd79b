"""Settings, read from the Celery app's config with environment overrides.

Every setting is a Celery config key prefixed ``outbox_bridge_`` (set it in
``celeryconfig.py``), and an environment variable ``OUTBOX_BRIDGE_<NAME>``
overrides it (``OUTBOX_BRIDGE_MAX_RETRIES=3``). Defaults match
``scripts/services``. A process that only publishes reads ``celeryconfig``
itself: it never builds the worker's Celery app.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:55432/outbox_bridge"
DEFAULT_KAFKA_BOOTSTRAP_SERVERS = "127.0.0.1:9092"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"


@dataclass(frozen=True)
class Settings:
    """All knobs of outbox-bridge; see the README's configuration reference."""

    # repr=False: a password in a URL or a client setting never reaches a log line
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    kafka_bootstrap_servers: str = DEFAULT_KAFKA_BOOTSTRAP_SERVERS
    # librdkafka settings of every Kafka client, the producer, the consumer and each
    # admin client (security.protocol, sasl.*, ssl.*, client.id, ...); producer_config
    # and consumer_config go on top of it for their client
    kafka_config: dict[str, Any] = field(default_factory=dict, repr=False)
    schema: str = "outbox_bridge"
    # Largest message (value + key + headers) that publish() accepts.
    max_message_bytes: int = 1_000_000
    # Rows are spread over shards by a hash of (topic, key); one task owns a shard.
    shards: int = 16
    batch_size: int = 2000
    # Tasks the fleet runs at once, shared between the busy queues (0: the pool
    # processes of every worker connected to the database, counted).
    parallel_tasks: int = 0
    lease_seconds: float = 30.0
    # A task that found rows keeps its shards while more come: it looks again every
    # linger_poll seconds and gives them back after linger_seconds without rows
    # (0: at once, one task per batch) or after linger_max_seconds in all.
    linger_seconds: float = 0.1
    linger_max_seconds: float = 0.5
    linger_poll: float = 0.005
    # Celery hard time limit of handler tasks, seconds (0: none); per handler: time_limit=
    handler_time_limit: float = 300.0
    # Bytes of message values one fetch of the relay reads at most (rows: batch_size).
    batch_bytes: int = 32_000_000
    # Celery retry settings of the outbox retry task.
    max_retries: int = 5
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    retry_jitter: bool = True
    # Circuit breaker while Kafka is unreachable: pause grows up to the max.
    pause_seconds: float = 1.0
    pause_max_seconds: float = 30.0
    # How the dispatcher learns of new outbox rows: "poll" reads the outbox id sequence
    # every wake_poll seconds, idle or busy (commits pay nothing); "notify": while it
    # is idle, publish()'s INSERT NOTIFYs it and nothing is polled (each publish()
    # then tries the dispatcher's idle lock shared, see docs/benchmarks.md)
    wake: str = "poll"
    # Dispatcher: seconds between reads of the outbox id sequence (with "notify":
    # while busy); 0: never, for writes that bypass publish() with the opt-in trigger
    wake_poll: float = 0.005
    # Dispatcher: the safety net's look at every queue while all are idle, seconds
    poll_interval: float = 5.0
    watcher: bool = True
    # Inbox: the Kafka consumer in the worker, its group, librdkafka overrides.
    consumer: bool = True
    # "" : derived from the inbox's database (outbox-bridge-<database>-<id>)
    consumer_group: str = ""
    consumer_config: dict[str, Any] = field(default_factory=dict, repr=False)
    send_retries: int = 3
    # librdkafka settings on top of outbox-bridge's producer defaults
    producer_config: dict[str, Any] = field(default_factory=dict, repr=False)
    # CloudEvents: set to the events' source (a URI reference such as "/orders") and every
    # message publish() writes is a CloudEvent in Kafka's binary content mode (ce_* headers)
    cloudevents_source: str = ""
    # dotted path of a callable(row) run before each row is produced; raising fails the row
    before_produce: str | None = None
    # dotted path of a callable(DeadMessage) called once per message that becomes dead
    dead_hook: str | None = None
    # Retention: handled inbox messages (and their done deliveries) are forgotten after
    # this many seconds, the window in which a message read again is not handled again
    # (0: kept for ever). Size it to the topics' retention.ms + segment.ms, the age up to
    # which Kafka can hand a record out again (its defaults: 7 + 7 days).
    dedupe_window: float = 14 * 86400.0
    # the worker prunes every prune_interval seconds, prune_batch rows per transaction
    prune_interval: float = 60.0
    prune_batch: int = 5000
    # the part of its time the worker's pruning may spend deleting (it waits the rest)
    prune_share: float = 0.1
    # Prometheus metrics served by the worker on this port (0: off; needs [metrics])
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    # a scrape counts at most this many rows per queue and state (the gauge saturates)
    metrics_count_limit: int = 100_000
    # `outbox-bridge migrate`: each lock is waited for at most this many seconds (writers
    # queue behind a waiting lock request), then the migration is tried again, this often
    migrate_lock_timeout: float = 2.0
    migrate_lock_retries: int = 60
    # Seconds a connection may go without an answer before it counts as dead (a peer
    # gone silent: dropped route, NAT flush, paused VM): libpq's connect timeout,
    # keepalives and tcp_user_timeout (both ends), Kafka's socket.timeout.ms, and the
    # watchdog that closes a connection whose statement waits longer (0: off)
    network_timeout: float = 30.0
    # dotted paths ("module:attribute") of the subscribers of outbox-bridge's events
    # (outbox_bridge.events): metrics and tracing, each a no-op until it is set up
    middleware: list[str] = field(
        default_factory=lambda: [
            "outbox_bridge.contrib.metrics:Metrics",
            "outbox_bridge.contrib.tracing:Tracing",
        ]
    )
    # where the worker's loops touch their heartbeat files for `outbox-bridge health --live`
    # ("": <temp dir>/outbox-bridge-health-<schema>)
    health_dir: str = ""

    @classmethod
    def from_conf(cls, conf: Any = None, environ: dict[str, str] | None = None) -> Settings:
        """Build settings from a Celery config mapping and the environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"outbox_bridge_{f.name}"
            if conf is not None and conf.get(key) is not None:
                values[f.name] = conf.get(key)
            raw = environ.get(f"OUTBOX_BRIDGE_{f.name.upper()}")
            if raw:
                values[f.name] = _parse(f.name, f.type, raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.shards < 1 or self.batch_size < 1:
            raise ValueError("outbox_bridge_shards and outbox_bridge_batch_size must be >= 1")
        if not self.schema:
            raise ValueError("outbox_bridge_schema must not be empty")
        if self.wake not in ("poll", "notify"):
            raise ValueError(f"outbox_bridge_wake must be 'poll' or 'notify', not {self.wake!r}")


def kafka_client(settings: Settings, **defaults: Any) -> dict[str, Any]:
    """What every Kafka client of outbox-bridge is built from: the servers, the network
    deadline, the client's own ``defaults``, then ``kafka_config`` (security, SASL, TLS,
    client.id), which wins over them. The producer and the consumer add their own
    ``*_config`` on top; admin clients use this as it is."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        **kafka_network(settings),
        **defaults,
        **settings.kafka_config,
    }


def kafka_network(settings: Settings) -> dict[str, Any]:
    """librdkafka's deadline for an answer from a broker (then it reconnects), from
    ``network_timeout``; ``producer_config``/``consumer_config`` may override it."""
    if settings.network_timeout <= 0:
        return {}
    return {"socket.timeout.ms": max(10, min(300_000, round(settings.network_timeout * 1000)))}


def kafka_connection(conf: dict[str, Any]) -> dict[str, Any]:
    """The settings of a librdkafka config that say how to reach the cluster (servers,
    client id, security, SASL, TLS): what an admin client beside it needs too."""
    return {
        k: v
        for k, v in conf.items()
        if k.split(".")[0] in ("bootstrap", "client", "security", "sasl", "ssl")
    }


def _parse(name: str, kind: str, raw: str) -> Any:
    try:
        if kind == "bool":
            return raw.strip().lower() not in ("0", "false", "no", "off")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("dict"):
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            return value
        if kind.startswith("list"):  # a JSON list, or names separated by commas
            return (
                json.loads(raw)
                if raw.lstrip().startswith("[")
                else [part.strip() for part in raw.split(",") if part.strip()]
            )
    except ValueError:
        # a client config may hold a password: it is not repeated in the error
        shown = "" if kind.startswith("dict") else f"={raw!r}"
        raise ValueError(f"OUTBOX_BRIDGE_{name.upper()}{shown}: not a valid {kind}") from None
    return raw


_current: Settings | None = None
_conf: Any = None


_module_conf: dict[str, Any] | None = None


def use_conf(conf: Any) -> None:
    """Read settings from this mapping from now on (``outbox_bridge.worker.app`` hands in
    its app's config, the Django app an overlay); None: the ``celeryconfig`` module."""
    global _conf, _current
    _conf, _current = conf, None


def celeryconfig() -> dict[str, Any]:
    """The ``outbox_bridge_*`` names of the top-level ``celeryconfig`` module, as the
    worker's app reads them (``config_from_object("celeryconfig", silent=True)``)."""
    global _module_conf
    if _module_conf is None:
        try:
            module = importlib.import_module("celeryconfig")
        except ImportError:
            module = None
        _module_conf = {
            name: getattr(module, name) for name in dir(module) if name.startswith("outbox_bridge_")
        }
    return _module_conf


def current_conf() -> Any:
    """The mapping settings are read from."""
    return celeryconfig() if _conf is None else _conf


def get_settings() -> Settings:
    """The current settings, read once per process."""
    global _current
    if _current is None:
        _current = Settings.from_conf(current_conf())
    return _current


def reset_settings() -> None:
    """Forget cached settings (after the config or the environment changed)."""
    global _current, _module_conf
    _current = _module_conf = None
