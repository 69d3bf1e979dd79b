"""The bench's harness: a database of its own, workers, topics, waits and samples."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import psycopg2
from confluent_kafka import Consumer, TopicPartition

from ...config import Settings, kafka_client
from ...db import connect, recreate_database, transaction
from ...migrate import migrate
from ...ops import ensure_topics
from ...outbox.publish import publish
from ...queries import compose as q

BENCH_DB = "outbox_bridge_bench"


SCRAPE_ROWS = 1_000_000  # pending rows while the metrics scrape is timed


PRUNE_ROWS = 300_000  # old handled inbox messages the worker prunes during end to end


@dataclass
class Options:
    count: int = 200_000
    naive_count: int = 5_000
    size: int = 1024
    keys: int = 100
    rate: int = 1_000
    seconds: float = 20.0
    e2e_count: int = 50_000
    e2e_batch_count: int = 200_000  # into the batch handler
    writers: int = 32
    scale_rows: tuple[int, ...] = (10_000, 1_000_000)
    concurrency: int = 2
    repeat: int = 3
    wake_pairs: int = 7
    wake_seconds: int = 8
    delayed_count: int = 10_000  # delayed messages due within the same second


def say(text: str) -> None:
    click.echo(text, err=True)


def machine() -> dict[str, Any]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def message_value(size: int, **fields: Any) -> bytes:
    head = json.dumps(fields, separators=(",", ":"))
    pad = max(0, size - len(head) - 10)
    return (head[:-1] + f',"pad":"{"x" * pad}"}}').encode()


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50_ms": round(qs[49] * 1000, 1),
        "p95_ms": round(qs[94] * 1000, 1),
        "p99_ms": round(qs[98] * 1000, 1),
    }


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


@contextmanager
def rss_peaks(pid: int, into: dict[str, Any]):
    """Peak resident memory of the worker's main process and of its largest pool
    process while the block runs (sampled every 0.25 s), in MB, into ``into``."""
    peaks = {"rss_main_mb": 0.0, "rss_pool_mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            peaks["rss_main_mb"] = max(peaks["rss_main_mb"], rss_mb(pid))
            for child in children(pid):
                peaks["rss_pool_mb"] = max(peaks["rss_pool_mb"], rss_mb(child))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        into.update({k: round(v) for k, v in peaks.items()})


def combine(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure from repeated runs: the median of each number, with its min and max."""
    out: dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [s.get(key) for s in samples]
        if isinstance(first, bool) or not all(isinstance(v, (int, float)) for v in values):
            out[key] = first
            continue
        med = statistics.median(values)
        out[key] = round(med, 1) if isinstance(med, float) and med % 1 else int(med)
        if len(samples) > 1:
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    out["runs"] = len(samples)
    return out


class Harness:
    """What every measurement uses."""

    def __init__(self, settings: Settings, options: Options):
        self.opts = options
        self.run_id = uuid.uuid4().hex[:6]
        self._topics: set[str] = set()
        dsn = psycopg2.extensions.parse_dsn(settings.database_url)
        self.admin_dsn = settings.database_url
        dsn["dbname"] = BENCH_DB
        self.settings = replace(settings, database_url=psycopg2.extensions.make_dsn(**dsn))
        self.logdir = Path(tempfile.mkdtemp(prefix="outbox-bridge-bench-"))
        self.results: dict[str, Any] = {"machine": machine(), "options": options.__dict__}

    # -- set-up ---------------------------------------------------------------
    def fresh_database(self) -> None:
        recreate_database(self.admin_dsn, BENCH_DB)
        migrate(self.settings)
        self.sql(
            "CREATE TABLE bench_done (message_id uuid, t double precision,"
            " at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )

    def sql(self, statement: str, params: Any = None) -> list:
        with transaction(self.settings, "outbox-bridge bench") as cur:
            cur.execute(q(statement, self.settings.schema), params)
            return cur.fetchall() if cur.description else []

    def topic(self, name: str) -> str:
        topic = f"bench.{self.run_id}.{name}"
        if topic not in self._topics:  # the cluster may not create topics on first use
            ensure_topics(self.settings, [topic])
            self._topics.add(topic)
        return topic

    def timing_consumer(self, name: str) -> tuple[str, Consumer, threading.Event]:
        """A new topic whose records carry the broker's append time (LogAppendTime), a
        consumer subscribed to it, and an event set once it has its partitions."""
        topic = f"bench.{self.run_id}.{name}-{uuid.uuid4().hex[:4]}"
        ensure_topics(self.settings, [topic], config={"message.timestamp.type": "LogAppendTime"})
        self._topics.add(topic)
        consumer = Consumer(
            kafka_client(
                self.settings,
                **{
                    "group.id": f"bench-{self.run_id}-{topic}",
                    "auto.offset.reset": "earliest",
                    "fetch.wait.max.ms": 10,
                },
            )
        )
        assigned = threading.Event()
        consumer.subscribe([topic], on_assign=lambda _c, parts: parts and assigned.set())
        return topic, consumer, assigned

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "OUTBOX_BRIDGE_DATABASE_URL": self.settings.database_url,
            "OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": self.settings.kafka_bootstrap_servers,
            "OUTBOX_BRIDGE_CELERY_QUEUE": f"bench-{self.run_id}",
            "OUTBOX_BRIDGE_CONSUMER_GROUP": f"bench-{self.run_id}",
            "OUTBOX_BRIDGE_BENCH_TOPIC": self.topic("e2e"),
            "OUTBOX_BRIDGE_BENCH_BATCH_TOPIC": self.topic("e2e-batch"),
            "OUTBOX_BRIDGE_BENCH_WAIT_TOPIC": self.topic("waits"),
        }

    @contextmanager
    def worker(
        self,
        *args: str,
        poll_interval: str | None = None,
        env: dict | None = None,
        concurrency: int | None = None,
    ):
        """``celery -A outbox_bridge worker`` for the bench database; yields when ready."""
        log = self.logdir / f"worker-{time.monotonic_ns()}.log"
        env = {**self.env(), **(env or {})}
        if poll_interval:
            env["OUTBOX_BRIDGE_POLL_INTERVAL"] = poll_interval
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "outbox_bridge",
                    "worker",
                    "-l",
                    "info",
                    "-c",
                    str(concurrency or self.opts.concurrency),
                    "-n",
                    f"bench-{uuid.uuid4().hex[:6]}@%h",
                    "--without-mingle",
                    "--without-gossip",
                    *args,
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while b" ready." not in log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise click.ClickException(f"bench worker did not start; see {log}")
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def fill(self, topic: str, rows: int, bulk: bool = False) -> None:
        """``rows`` committed outbox rows: through publish(), or one SQL insert when ``bulk``."""
        if bulk:
            self.sql(
                "INSERT INTO {outbox} (message_id, topic, key, value, headers, shard)"
                " SELECT gen_random_uuid(), %s, convert_to('key-' || (g %% %s), 'UTF8'),"
                " convert_to(repeat('x', %s), 'UTF8'), '[]',"
                " abs(hashtext('key-' || (g %% %s))) %% %s FROM generate_series(1, %s) g",
                (topic, self.opts.keys, self.opts.size, self.opts.keys, self.settings.shards, rows),
            )
            self.sql("ANALYZE {outbox}")
            return
        value = message_value(self.opts.size, n=0)
        self.publish_many(topic, rows, lambda: value)

    def publish_many(self, topic: str, rows: int, value, per_transaction: int = 1000) -> None:
        """``rows`` messages through publish(), ``value()`` each, in transactions of many."""
        conn = connect(self.settings)
        try:
            for start in range(0, rows, per_transaction):
                with conn, conn.cursor() as cur:
                    for i in range(start, min(rows, start + per_transaction)):
                        publish(cur, topic, value(), key=f"key-{i % self.opts.keys}")
        finally:
            conn.close()

    def wait_count(
        self, query: str, done, label: str, timeout: float = 1800, every: float = 0.05
    ) -> float:
        """Seconds until ``done(count)`` holds for the count ``query`` returns (asked
        every ``every`` seconds), with progress."""
        t0 = time.monotonic()
        last = 0.0
        while True:
            count = self.sql(query)[0][0]
            now = time.monotonic()
            if now - last > 2:
                say(f"  {label}: {count} ({now - t0:.0f}s)")
                last = now
            if done(count):
                return now - t0
            if now - t0 > timeout:
                raise click.ClickException(f"{label}: still {count} after {timeout}s")
            time.sleep(every)

    @staticmethod
    def _end_offsets(consumer: Consumer, topic: str) -> int:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts
        )

    def _consumer_ready(self, topic: str = "e2e") -> None:
        """The worker's inbox consumer has its partitions: a marker message is handled."""
        self.sql("TRUNCATE bench_done")
        self.publish_many(self.topic(topic), 1, lambda: message_value(64, t=time.time()))
        self.wait_count(
            "SELECT count(*) FROM bench_done",
            lambda n: n >= 1,
            "the inbox consumer's first message",
            timeout=120,
        )
        self.sql("TRUNCATE bench_done")

    # -- operations (issue 12) ------------------------------------------------------
    def autocommit(self, statement: str) -> None:
        conn = connect(self.settings, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(q(statement, self.settings.schema))
        finally:
            conn.close()

    def _statements_reset(self) -> bool:
        """Start counting statements (pg_stat_statements, loaded by scripts/services)."""
        try:
            self.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self.sql("SELECT pg_stat_statements_reset()")
            return True
        except psycopg2.Error as exc:
            say(f"  (no database profile: {str(exc).splitlines()[0]})")
            return False

    def _statements_top(self, limit: int = 10) -> list[dict[str, Any]]:
        """The statements of the bench database that took the most time."""
        rows = self.sql(
            "SELECT calls, total_exec_time, rows,"
            " left(regexp_replace(query, '\\s+', ' ', 'g'), 110) FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database()) ORDER BY total_exec_time DESC LIMIT %s",
            (limit,),
        )
        return [{"calls": c, "ms": round(t), "rows": n, "query": text} for c, t, n, text in rows]
