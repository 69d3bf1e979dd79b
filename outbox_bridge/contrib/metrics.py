"""Prometheus metrics (``pip install outbox-bridge[metrics]``).

Counters and histograms are recorded where things happen: publish and handler
tasks in the pool's processes, the watcher and the inbox consumer in the
worker's main process. They use prometheus_client's multiprocess mode, so a
scrape adds up every process: the worker sets ``PROMETHEUS_MULTIPROC_DIR`` (a
directory of its own, emptied at start) before its pool starts, and a pool
process that exits is marked dead. Nothing is recorded unless that variable
is set (``outbox_bridge_metrics_port`` > 0, or your own multiprocess setup).

Gauges that need a query (rows per state, oldest pending age, blocked keys,
paused topics) are read from PostgreSQL at scrape time, each count bounded by
``metrics_count_limit`` rows and the whole scrape by a statement timeout;
consumer lag is sampled from Kafka in the background every 15 s, so a scrape
never waits for Kafka.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ..config import Settings
from ..inbox import inbox_queue
from ..ops import scheduled
from ..outbox import outbox_queue
from ..queries import render

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LAG_EVERY = 15.0

_metrics: Any = None  # the metric objects once on; False: off


def _on() -> Any:
    global _metrics
    if _metrics is None:
        _metrics = _make() if os.environ.get(MULTIPROC_ENV) else False
    return _metrics


def _make() -> Any:
    try:
        from prometheus_client import Counter, Histogram
    except ImportError:
        log.warning("%s is set but prometheus-client is not installed: no metrics", MULTIPROC_ENV)
        return False

    class M:
        published = Counter(
            "outbox_bridge_published", "Outbox messages Kafka acknowledged", ["topic"]
        )
        failed = Counter(
            "outbox_bridge_failed_attempts",
            "Failed attempts: outbox rows Kafka refused, deliveries whose handler raised",
            ["queue"],
        )
        retried = Counter(
            "outbox_bridge_retried",
            "Rows and deliveries attempted again by a retry task",
            ["queue"],
        )
        dead = Counter("outbox_bridge_dead", "Messages that became dead", ["queue"])
        out_of_order = Counter(
            "outbox_bridge_out_of_order",
            "Outbox rows Kafka acknowledged after an earlier row of their key was not"
            " (the key is out of order in the topic; alert on any)",
            ["queue"],
        )
        handled = Counter(
            "outbox_bridge_handled",
            "Deliveries handled (the handler's writes committed)",
            ["queue"],
        )
        consumed = Counter(
            "outbox_bridge_consumed",
            "Kafka messages the inbox consumer committed to the inbox",
            ["topic"],
        )
        pruned = Counter("outbox_bridge_pruned", "Handled inbox messages forgotten by retention")
        latency = Histogram(
            "outbox_bridge_commit_to_ack_seconds",
            "From the writer's transaction to Kafka's acknowledgement of the message",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        batch = Histogram(
            "outbox_bridge_batch_size",
            "Rows per batch of a publish or handler task",
            ["queue"],
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000),
        )
        handler_seconds = Histogram(
            "outbox_bridge_handler_seconds", "Time a handler took for one message", ["queue"]
        )

    return M


# -- recording (no-ops while off) ----------------------------------------------
def delivered(rows: Iterable[Any], acked_at: float) -> None:
    """Outbox rows Kafka acknowledged at ``acked_at`` (epoch seconds), committed."""
    m = _on()
    if not m:
        return
    per_topic: dict[str, int] = {}
    for row in rows:
        per_topic[row.topic] = per_topic.get(row.topic, 0) + 1
        if row.created_at is not None:
            m.latency.observe(max(0.0, acked_at - row.created_at))
    for topic, n in per_topic.items():
        m.published.labels(topic).inc(n)


def count(counter: str, queue: str, n: int = 1) -> None:
    """Add ``n`` to the counter ``failed``, ``retried``, ``dead``, ``handled`` or
    ``out_of_order`` of ``queue``."""
    if n and (m := _on()):
        getattr(m, counter).labels(queue).inc(n)


def on() -> bool:
    """Whether metrics are recorded in this process."""
    return bool(_on())


def batch(queue: str, n: int) -> None:
    if n and (m := _on()):
        m.batch.labels(queue).observe(n)


def handler_seconds(queue: str, seconds: float) -> None:
    if m := _on():
        m.handler_seconds.labels(queue).observe(seconds)


def consumed(messages: Iterable[Any]) -> None:
    if m := _on():
        per_topic: dict[str, int] = {}
        for msg in messages:
            per_topic[msg.topic()] = per_topic.get(msg.topic(), 0) + 1
        for topic, n in per_topic.items():
            m.consumed.labels(topic).inc(n)


def pruned(n: int) -> None:
    if n and (m := _on()):
        m.pruned.inc(n)


# -- the worker's side -----------------------------------------------------------
def prepare_worker(settings: Settings) -> str | None:
    """Before the pool starts: multiprocess mode in a fresh directory (the one in
    ``PROMETHEUS_MULTIPROC_DIR``, emptied, or a new one). None while metrics are off."""
    global _metrics
    if not settings.metrics_port:
        return None
    path = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="outbox-bridge-metrics-")
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):  # a former run's counts
        os.remove(stale)
    os.environ[MULTIPROC_ENV] = path
    try:
        from prometheus_client import values

        # imported before the variable was set (by some library): choose again
        values.ValueClass = values.get_value_class()
    except ImportError:
        pass
    _metrics = None
    return path


def process_exited(pid: int) -> None:
    """A pool process exits: its live gauges go (its counters still count)."""
    if os.environ.get(MULTIPROC_ENV):
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)
        except ImportError:
            pass


# compact() and a scrape both read the files: one at a time (a scrape that saw a file
# that compact() then folded would fail, or count it twice)
_files = threading.Lock()
COMPACT_EVERY = 10.0  # seconds between compactions in the worker


def compact(path: str | None = None) -> int:
    """Fold the counter and histogram files of processes that have exited into one
    archive file per kind, so that the directory holds a file per live process and
    kind, not one per process ever started (a crash loop, ``--max-tasks-per-child``
    or autoscaling start thousands over months). Totals stay as they were. Returns
    the files folded."""
    from prometheus_client.mmap_dict import MmapedDict

    path = path or os.environ.get(MULTIPROC_ENV)
    if not path:
        return 0
    folded = 0
    with _files:
        for kind in ("counter", "histogram"):
            gone = [f for f in glob.glob(os.path.join(path, f"{kind}_*.db")) if _exited(f)]
            if not gone:
                continue
            archive = MmapedDict(os.path.join(path, f"{kind}_archive.db"))
            try:
                for name in gone:
                    for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(name):
                        total, _ = archive.read_value(key)
                        archive.write_value(key, total + value, timestamp)
                    os.remove(name)
                    folded += 1
            finally:
                archive.close()
    return folded


def _exited(name: str) -> bool:
    pid = os.path.basename(name)[:-3].rsplit("_", 1)[-1]
    if not pid.isdigit():
        return False  # the archive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def compact_forever(stop: threading.Event) -> None:
    """The worker's compaction loop (``Metrics.worker_started``)."""
    while not stop.wait(COMPACT_EVERY):
        try:
            compact()
        except Exception:  # noqa: BLE001 - metrics never stop the worker
            log.exception("metrics: could not compact the files of exited processes")


def registry(settings: Settings, database: bool = True) -> Any:
    """A registry with every process's counters (multiprocess mode) and, with
    ``database``, the gauges read from PostgreSQL and Kafka at scrape time."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    class Collector(MultiProcessCollector):
        def collect(self):  # noqa: D102
            with _files:
                return list(super().collect())

    found = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        Collector(found)
    if database:
        found.register(DatabaseCollector(settings))
    return found


def serve(settings: Settings, port: int, address: str, database: bool = True):
    """Serve /metrics on ``address:port`` in a thread; returns the server (``shutdown()``)."""
    try:
        from prometheus_client import start_http_server
    except ImportError:
        raise RuntimeError(
            "outbox_bridge_metrics_port is set but prometheus-client is not installed:"
            " pip install 'outbox-bridge[metrics]'"
        ) from None

    server, _thread = start_http_server(port, address, registry(settings, database))
    return server


class Metrics:
    """The middleware (``outbox_bridge.events``) that records Prometheus metrics: no-ops
    unless ``PROMETHEUS_MULTIPROC_DIR`` is set; the worker serves them on
    ``metrics_port`` and folds exited processes' files together."""

    def __init__(self) -> None:
        self.server: Any = None
        self.compaction: Any = None

    def active(self) -> bool:
        return on()

    def delivered(self, rows: Iterable[Any], acked_at: float) -> None:
        delivered(rows, acked_at)

    def counted(self, counter: str, queue: str, n: int) -> None:
        count(counter, queue, n)

    def dead(self, message: Any) -> None:
        count("dead", message.queue)

    def batch(self, queue: str, n: int) -> None:
        batch(queue, n)

    def handled_in(self, queue: str, seconds: float) -> None:
        handler_seconds(queue, seconds)

    def consumed(self, messages: Iterable[Any]) -> None:
        consumed(messages)

    def pruned(self, n: int) -> None:
        pruned(n)

    def worker_starting(self, settings: Settings) -> None:
        prepare_worker(settings)  # multiprocess mode needs its directory before the fork

    def worker_started(self, settings: Settings) -> None:
        from ..loops import LoopThread

        if not settings.metrics_port:
            return
        self.server = serve(settings, settings.metrics_port, settings.metrics_address)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_address, settings.metrics_port)
        # exited pool processes' files folded into one: the directory stays small
        self.compaction = LoopThread(compact_forever, "outbox-bridge-metrics")
        self.compaction.start()

    def worker_stopping(self) -> None:
        if self.compaction is not None:
            self.compaction.stop()
            self.compaction = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def process_exited(self, pid: int) -> None:
        process_exited(pid)


# -- gauges read at scrape time ----------------------------------------------------
class DatabaseCollector:
    """Gauges read from PostgreSQL when Prometheus scrapes (see the module doc)."""

    def __init__(self, settings: Settings, lag: bool = True):
        self.settings = settings
        self.conn = None
        self.lock = threading.Lock()
        self.lag: list[dict] = []
        self.lag_thread: threading.Thread | None = None
        self.sample_lag = lag  # False: no consumer lag (the benchmark's scrapes)

    def close(self) -> None:
        with self.lock:
            self._drop()

    def describe(self) -> list:
        return []  # computed on scrape: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        started = time.monotonic()
        up = GaugeMetricFamily(
            "outbox_bridge_database_up", "Whether the scrape could read the database"
        )
        with self.lock:
            try:
                families = self._read()
                up.add_metric([], 1)
            except Exception as exc:  # noqa: BLE001 - a scrape must answer anyway
                log.warning("metrics: cannot read the database: %s", str(exc).strip())
                self._drop()
                families = []
                up.add_metric([], 0)
        yield up
        yield from families
        yield from self._lag_families()
        took = GaugeMetricFamily(
            "outbox_bridge_scrape_seconds", "Time the last scrape took to read the database"
        )
        took.add_metric([], time.monotonic() - started)
        yield took

    def _cursor(self):
        from ..db import connect

        if self.conn is None or self.conn.closed:
            self.conn = connect(self.settings, autocommit=True, name="outbox-bridge metrics")
            with self.conn.cursor() as cur:
                cur.execute("SET statement_timeout = '5s'")
        return self.conn.cursor()

    def _drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    def _read(self) -> list:
        from prometheus_client.core import GaugeMetricFamily

        schema = self.settings.schema
        rows = GaugeMetricFamily(
            "outbox_bridge_rows",
            "Rows per queue and state (exact up to outbox_bridge_metrics_count_limit)",
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "outbox_bridge_oldest_pending_seconds",
            "Age of the oldest pending row per queue",
            labels=["queue"],
        )
        blocked = GaugeMetricFamily(
            "outbox_bridge_blocked_keys",
            "Keys held back by a retrying or dead head, per queue",
            labels=["queue"],
        )
        paused = GaugeMetricFamily(
            "outbox_bridge_topic_paused",
            "1 while the circuit breaker pauses the topic",
            labels=["topic"],
        )
        pauses = GaugeMetricFamily(
            "outbox_bridge_topic_pauses",
            "Consecutive pauses of the topic (breaker state)",
            labels=["topic"],
        )
        overdue = GaugeMetricFamily(
            "outbox_bridge_scheduled_overdue_seconds",
            "How long the oldest due delayed message has waited past its deliver_at (0: none)",
        )
        cap, shards = self.settings.metrics_count_limit, self.settings.shards
        with self._cursor() as cur:
            cur.execute(render("ops.handler_names", schema))
            queues = [("outbox", outbox_queue(self.settings))] + [
                (name, inbox_queue(self.settings, name)) for (name,) in cur.fetchall()
            ]
            for name, queue in queues:
                for state, n in queue.counts(cur, cap).items():
                    rows.add_metric([name, state], n)
                age = queue.oldest_pending(cur, shards)
                if age is not None:
                    oldest.add_metric([name], age)
                blocked.add_metric([name], float(queue.blocked_count(cur, cap)))
            count, next_due = scheduled(cur, self.settings, cap)
            rows.add_metric(["outbox", "scheduled"], count)
            overdue.add_metric([], max(0.0, -(next_due if next_due is not None else 0.0)))
            cur.execute(render("metrics.topic_pauses", schema))
            for topic, active, n in cur.fetchall():
                paused.add_metric([topic], 1 if active else 0)
                pauses.add_metric([topic], n)
        self._start_lag()
        return [rows, oldest, blocked, paused, pauses, overdue]

    # consumer lag: sampled in a thread, so a scrape never waits for Kafka
    def _start_lag(self) -> None:
        if self.lag_thread is None and self.sample_lag:
            self.lag_thread = threading.Thread(
                target=self._sample_lag, daemon=True, name="outbox-bridge metrics lag"
            )
            self.lag_thread.start()

    def _sample_lag(self) -> None:
        from ..db import transaction
        from ..inbox.consumer import consumer_group
        from ..ops import consumer_lag

        while True:
            try:
                with transaction(self.settings, "outbox-bridge metrics lag", bounded=True) as cur:
                    cur.execute(render("ops.handler_topics", self.settings.schema))
                    topics = [r[0] for r in cur.fetchall()]
                    group = consumer_group(cur, self.settings)
                self.lag = consumer_lag(self.settings, group, topics)
            except Exception as exc:  # noqa: BLE001 - the last sample stays
                log.info("metrics: consumer lag not sampled now: %s", exc)
            time.sleep(LAG_EVERY)

    def _lag_families(self) -> list:
        from prometheus_client.core import GaugeMetricFamily

        lag = GaugeMetricFamily(
            "outbox_bridge_consumer_lag",
            "Messages the inbox consumer group has not committed yet",
            labels=["topic", "partition"],
        )
        for p in self.lag:
            lag.add_metric([p["topic"], str(p["partition"])], p["lag"])
        return [lag]
