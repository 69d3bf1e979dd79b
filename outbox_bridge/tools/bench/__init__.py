"""``outbox-bridge bench``: the relay measured beside the raw Kafka producer.

Everything runs against the same services, in one run, with the same message
size and keys: the raw producer (the limit), a one-row-at-a-time relay (the
naive outbox), the relay draining a backlog, the relay at a steady offered
rate, end to end into a handler, the cost of the NOTIFY wake-up for writers,
and the drain rate at two table sizes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
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
from confluent_kafka import Consumer, Producer, TopicPartition

from ...config import Settings
from ...db import connect, recreate_database, transaction
from ...inbox.consumer import consume_batch
from ...message import kafka_headers
from ...migrate import migrate, notify_trigger
from ...ops import ensure_topics
from ...outbox.kafka import producer_config
from ...outbox.publish import publish
from ...queries import compose as q
from ...queue import Queue
from ...worker.dispatcher import SequenceWatch
from .drivers import compare as compare_drivers

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
    writers: int = 32
    scale_rows: tuple[int, ...] = (10_000, 1_000_000)
    concurrency: int = 2
    repeat: int = 3
    wake_pairs: int = 7
    wake_seconds: int = 8


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


def _value(size: int, **fields: Any) -> bytes:
    head = json.dumps(fields, separators=(",", ":"))
    pad = max(0, size - len(head) - 10)
    return (head[:-1] + f',"pad":"{"x" * pad}"}}').encode()


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50_ms": round(qs[49] * 1000, 1),
        "p95_ms": round(qs[94] * 1000, 1),
        "p99_ms": round(qs[98] * 1000, 1),
    }


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
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
            peaks["rss_main_mb"] = max(peaks["rss_main_mb"], _rss_mb(pid))
            for child in _children(pid):
                peaks["rss_pool_mb"] = max(peaks["rss_pool_mb"], _rss_mb(child))

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


class Bench:
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

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "OUTBOX_BRIDGE_DATABASE_URL": self.settings.database_url,
            "OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": self.settings.kafka_bootstrap_servers,
            "OUTBOX_BRIDGE_CELERY_QUEUE": f"bench-{self.run_id}",
            "OUTBOX_BRIDGE_CONSUMER_GROUP": f"bench-{self.run_id}",
            "OUTBOX_BRIDGE_BENCH_TOPIC": self.topic("e2e"),
        }

    @contextmanager
    def worker(self, *args: str, poll_interval: str | None = None, env: dict | None = None):
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
                    str(self.opts.concurrency),
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
        value = _value(self.opts.size, n=0)
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

    def wait_count(self, query: str, done, label: str, timeout: float = 1800) -> float:
        """Seconds until ``done(count)`` holds for the count ``query`` returns, with progress."""
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
            time.sleep(0.05)

    # -- the measurements ----------------------------------------------------
    def limit(self) -> dict[str, Any]:
        say("limit: the raw confluent-kafka producer")
        topic = self.topic("limit")
        producer = Producer(producer_config(self.settings))
        value = _value(self.opts.size, n=0)
        producer.produce(topic, b"warm-up")
        producer.flush(30)
        errors = []
        t0 = time.monotonic()
        for i in range(self.opts.count):
            while True:
                try:
                    producer.produce(
                        topic,
                        value=value,
                        key=f"key-{i % self.opts.keys}".encode(),
                        headers=kafka_headers([], uuid.uuid4()),
                        on_delivery=lambda err, _m: err and errors.append(err),
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush(120)
        elapsed = time.monotonic() - t0
        if errors:
            raise click.ClickException(f"limit: {len(errors)} delivery errors, e.g. {errors[0]}")
        return {
            "messages": self.opts.count,
            "seconds": round(elapsed, 2),
            "rate": round(self.opts.count / elapsed),
        }

    def naive(self) -> dict[str, Any]:
        say("naive: one row at a time (claim, produce, wait for the ack, delete, commit)")
        topic = self.topic("naive")
        self.fill(topic, self.opts.naive_count)
        producer = Producer({**producer_config(self.settings), "linger.ms": 0})
        conn = connect(self.settings)
        done = 0
        t0 = time.monotonic()
        while True:
            with conn, conn.cursor() as cur:
                cur.execute(
                    q(
                        "SELECT id, message_id, topic, key, value, headers FROM {outbox}"
                        " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                        self.settings.schema,
                    )
                )
                row = cur.fetchone()
                if row is None:
                    break
                producer.produce(
                    row[2],
                    value=bytes(row[4]),
                    key=bytes(row[3]),
                    headers=kafka_headers(row[5], row[1]),
                )
                producer.flush(30)
                cur.execute(
                    q("DELETE FROM {outbox} WHERE id = %s", self.settings.schema), (row[0],)
                )
                done += 1
        elapsed = time.monotonic() - t0
        conn.close()
        return {"messages": done, "seconds": round(elapsed, 2), "rate": round(done / elapsed)}

    def drain(self, rows: int, bulk: bool, label: str) -> dict[str, Any]:
        say(f"{label}: {rows} committed rows, then the worker")
        topic = self.topic(label)
        self.fill(topic, rows, bulk=bulk)
        out: dict[str, Any] = {}
        # progress from Kafka's end offsets: counting a 1 GB table every few
        # milliseconds would take the CPU that the drain is measured on
        offsets = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap_servers,
                "group.id": f"bench-{self.run_id}-offsets",
            }
        )
        start = self._end_offsets(offsets, topic)
        with self.worker("--without-inbox-consumer") as proc, rss_peaks(proc.pid, out):
            t0 = time.monotonic()
            last = 0.0
            while (sent := self._end_offsets(offsets, topic) - start) < rows:
                if time.monotonic() - last > 5:
                    last = time.monotonic()
                    say(f"  {label}: {sent} in Kafka ({last - t0:.0f}s)")
                if time.monotonic() - t0 > 1800:
                    raise click.ClickException(f"{label}: {sent} of {rows} after 1800s")
                time.sleep(0.05)
            # and every row deleted (each batch's DELETE commits after its acks)
            self.wait_count(
                "SELECT count(*) FROM {outbox}", lambda n: n == 0, f"{label}, rows left"
            )
            elapsed = time.monotonic() - t0
        offsets.close()
        return {
            "messages": rows,
            "seconds": round(elapsed, 2),
            "rate": round(rows / elapsed),
            **out,
        }

    @staticmethod
    def _end_offsets(consumer: Consumer, topic: str) -> int:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts
        )

    def _offer(self, topic: str, seconds: float) -> int:
        """Four writer threads commit one row per transaction at the offered rate,
        the time just before the commit in the value; returns rows written."""
        sent = [0]
        lock = threading.Lock()
        share = self.opts.rate / 4

        def write() -> None:
            conn = connect(self.settings)
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < seconds:
                pause = start + n / share - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing, not waiting for an outcome
                with conn, conn.cursor() as cur:
                    publish(
                        cur,
                        topic,
                        _value(self.opts.size, t=time.time()),
                        key=f"key-{n % self.opts.keys}",
                    )
                n += 1
            with lock:
                sent[0] += n
            conn.close()

        writers = [threading.Thread(target=write) for _ in range(4)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        return sent[0]

    def steady(self) -> dict[str, Any]:
        """Commit -> Kafka ack (as seen by a consumer) at a steady offered rate."""
        rate, seconds = self.opts.rate, self.opts.seconds
        say(f"steady state: writers offer {rate} messages/s for {seconds:.0f}s")
        topic = f"bench.{self.run_id}.steady-{uuid.uuid4().hex[:4]}"
        ensure_topics(self.settings, [topic], config={"message.timestamp.type": "LogAppendTime"})
        self._topics.add(topic)
        latencies: list[float] = []
        appended: list[float] = []
        stop = threading.Event()
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap_servers,
                "group.id": f"bench-{self.run_id}-{topic}",
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 10,
            }
        )
        assigned = threading.Event()
        consumer.subscribe([topic], on_assign=lambda _c, parts: parts and assigned.set())

        def consume() -> None:
            while not stop.is_set():
                for msg in consume_batch(consumer, 1000, 0.1):
                    if msg.error() is None:
                        now = time.time()
                        t = json.loads(msg.value()[:40].split(b",")[0][5:])
                        latencies.append(now - t)
                        # the broker's append time (LogAppendTime): the ack follows it
                        appended.append(msg.timestamp()[1] / 1000 - t)

        with self.worker("--without-inbox-consumer"):
            reader = threading.Thread(target=consume)
            reader.start()
            # the consumer joins its group before the clock starts
            if not assigned.wait(60):
                raise click.ClickException("steady: the measuring consumer got no partitions")
            t0 = time.monotonic()
            sent = self._offer(topic, seconds)
            deadline = time.monotonic() + 60
            while len(latencies) < sent and time.monotonic() < deadline:
                time.sleep(0.1)
            elapsed = time.monotonic() - t0
            stop.set()
            reader.join()
        consumer.close()
        # the figure: commit -> appended in Kafka; beside it, -> a consumer's arrival
        arrival = {f"arrival_{k}": v for k, v in _percentiles(latencies).items()}
        return {
            "offered_rate": rate,
            "written": sent,
            "received": len(latencies),
            "rate": round(len(latencies) / elapsed),
            **_percentiles(appended),
            **arrival,
        }

    def handler_steady(self) -> dict[str, Any]:
        """Commit -> the handler's commit at a steady offered rate, through the relay,
        Kafka, the inbox consumer and a handler that inserts one row."""
        rate, seconds = self.opts.rate, self.opts.seconds
        say(f"steady state into a handler: {rate} messages/s for {seconds:.0f}s")
        self.sql("TRUNCATE bench_done")
        with self.worker("--include", "outbox_bridge.tools.bench.handlers"):
            self._consumer_ready()
            t0 = time.monotonic()
            sent = self._offer(self.topic("e2e"), seconds)
            self.wait_count(
                "SELECT count(*) FROM bench_done",
                lambda n: n >= sent,
                "steady into a handler, handled",
                timeout=120,
            )
            elapsed = time.monotonic() - t0
        lat = [r[0] for r in self.sql("SELECT extract(epoch FROM at) - t FROM bench_done")]
        return {
            "offered_rate": rate,
            "written": sent,
            "handled": len(lat),
            "rate": round(len(lat) / elapsed),
            **_percentiles(lat),
        }

    def _consumer_ready(self) -> None:
        """The worker's inbox consumer has its partitions: a marker message is handled."""
        self.sql("TRUNCATE bench_done")
        self.publish_many(self.topic("e2e"), 1, lambda: _value(64, t=time.time()))
        self.wait_count(
            "SELECT count(*) FROM bench_done",
            lambda n: n >= 1,
            "the inbox consumer's first message",
            timeout=120,
        )
        self.sql("TRUNCATE bench_done")

    def end_to_end(self, *args: str, env: dict | None = None) -> dict[str, Any]:
        """The pipeline's throughput: a backlog committed in one transaction while the
        worker runs, through the relay, Kafka, the inbox and a handler that inserts
        one row per message; from the commit to the last handled message. (Through
        publish() the writer is the limit: one round trip per message, 4-5k/s.)"""
        count = self.opts.e2e_count
        say(f"end to end: {count} messages through Kafka, the inbox and a handler")
        out: dict[str, Any] = {}
        with self.worker("--include", "outbox_bridge.tools.bench.handlers", *args, env=env) as proc:
            self._consumer_ready()
            profile = self._statements_reset() and "db_profile_end_to_end" not in self.results
            with rss_peaks(proc.pid, out):
                t0 = time.monotonic()
                self.sql(
                    "INSERT INTO {outbox} (message_id, topic, key, value, headers, shard)"
                    " SELECT gen_random_uuid(), %(topic)s, convert_to('key-' || (g %% %(keys)s),"
                    " 'UTF8'), convert_to(json_build_object('t', extract(epoch FROM now()),"
                    " 'pad', repeat('x', %(pad)s))::text, 'UTF8'), '[]',"
                    " abs(hashtext('key-' || (g %% %(keys)s))) %% %(shards)s"
                    " FROM generate_series(1, %(count)s) g",
                    {
                        "topic": self.topic("e2e"),
                        "keys": self.opts.keys,
                        "count": count,
                        "pad": max(0, self.opts.size - 40),
                        "shards": self.settings.shards,
                    },
                )
                self.wait_count(
                    "SELECT count(*) FROM bench_done",
                    lambda n: n >= count,
                    "end to end, handled",
                    timeout=900,
                )
                elapsed = time.monotonic() - t0
            done = self.sql("SELECT count(*) FROM bench_done")[0][0]
        if profile:
            self.results["db_profile_end_to_end"] = self._statements_top()
        return {
            "messages": done,
            "seconds": round(elapsed, 2),
            "rate": round(done / elapsed),
            **out,
        }

    # -- operations (issue 12) ------------------------------------------------------
    def autocommit(self, statement: str) -> None:
        conn = connect(self.settings, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(q(statement, self.settings.schema))
        finally:
            conn.close()

    def metrics_scrape(self) -> dict[str, Any]:
        """What a scrape of the database gauges costs with a backlog of SCRAPE_ROWS
        pending rows: fresh, and after VACUUM; with the default count limit and
        counting every row."""
        from ...contrib.metrics import DatabaseCollector

        say(f"metrics scrape: {SCRAPE_ROWS} pending rows, no worker")
        self.fill(self.topic("scrape"), SCRAPE_ROWS, bulk=True)
        out: dict[str, Any] = {"pending": SCRAPE_ROWS}
        for when in ("fresh", "vacuumed"):
            if when == "vacuumed":
                self.autocommit("VACUUM ANALYZE {outbox}")
            for label, cap in (
                ("limited", self.settings.metrics_count_limit),
                ("exact", 2 * SCRAPE_ROWS),
            ):
                collector = DatabaseCollector(
                    replace(self.settings, metrics_count_limit=cap), lag=False
                )
                times, reported = [], None
                for _ in range(10):
                    t0 = time.perf_counter()
                    families = list(collector.collect())
                    times.append((time.perf_counter() - t0) * 1000)
                for family in families:
                    for sample in family.samples:
                        if sample.name == "outbox_bridge_rows" and sample.labels == {
                            "queue": "outbox",
                            "state": "pending",
                        }:
                            reported = sample.value
                collector.close()
                out[f"{when}_{label}"] = {
                    "median_ms": round(statistics.median(times), 1),
                    "max_ms": round(max(times), 1),
                    "pending_reported": reported,
                }
        return out

    def _old_inbox(self, rows: int) -> None:
        """``rows`` handled inbox messages, received 8 days ago: what retention prunes."""
        self.sql("TRUNCATE {inbox} CASCADE")
        self.sql(
            'INSERT INTO {inbox} (message_id, topic, "partition", "offset", value,'
            " received_at) SELECT gen_random_uuid(), 'bench.old', 0, g,"
            " convert_to(repeat('x', %s), 'UTF8'), now() - interval '8 days'"
            " FROM generate_series(1, %s) g",
            (self.opts.size, rows),
        )
        self.sql(
            "INSERT INTO {deliveries} (message_id, handler, topic, shard, state, done_at)"
            " SELECT message_id, 'outbox.bench.record', topic, 0, 'done', now() FROM {inbox}"
        )
        self.autocommit("VACUUM ANALYZE {inbox}")
        self.autocommit("VACUUM ANALYZE {deliveries}")

    def prune_cost(self) -> dict[str, Any]:
        """End to end with the worker pruning PRUNE_ROWS old handled messages at full
        speed beside it (prune_interval 0.1 s), against the same run with retention
        off; interleaved rounds."""
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "pruning": []}
        for _round in range(max(2, self.opts.repeat)):
            for mode in ("off", "pruning"):
                self._old_inbox(PRUNE_ROWS)
                say(f"prune cost ({mode}): {PRUNE_ROWS} old handled messages in the inbox")
                with self.vacuum_samples() as vacuums:
                    if mode == "off":
                        result = self.end_to_end("--without-retention")
                    else:
                        result = self.end_to_end(env={"OUTBOX_BRIDGE_PRUNE_INTERVAL": "0.1"})
                result["vacuum_seconds"] = vacuums
                left = self.sql("SELECT count(*) FROM {inbox} WHERE topic = 'bench.old'")[0][0]
                result["old_pruned"] = PRUNE_ROWS - left
                runs[mode].append(result)
                self.sql("TRUNCATE {outbox}")
        off = statistics.median(r["rate"] for r in runs["off"])
        on = statistics.median(r["rate"] for r in runs["pruning"])
        return {
            "off": runs["off"],
            "pruning": runs["pruning"],
            "rate_off": off,
            "rate_pruning": on,
            "ratio": round(on / off, 3),
        }

    @contextmanager
    def vacuum_samples(self, every: float = 0.25):
        """Seconds (sampled) that (auto)vacuum spent on each table of the bench database
        while the block ran: where the database's time goes besides the pipeline."""
        found: dict[str, float] = {}
        stop = threading.Event()

        def sample() -> None:
            conn = connect(self.settings, autocommit=True, name="outbox-bridge bench vacuum")
            try:
                with conn.cursor() as cur:
                    while not stop.wait(every):
                        cur.execute(
                            "SELECT relid::regclass::text FROM pg_stat_progress_vacuum"
                            " WHERE datname = current_database()"
                        )
                        for (table,) in cur.fetchall():
                            found[table] = round(found.get(table, 0.0) + every, 2)
            finally:
                conn.close()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield found
        finally:
            stop.set()
            sampler.join()

    def retention_steady(self) -> dict[str, Any]:
        """Table sizes while messages flow into a handler at the offered rate with a
        short dedupe window: the inbox stays at about rate x window rows."""
        window, seconds = 5, max(60.0, self.opts.seconds)
        say(f"retention: {self.opts.rate}/s into a handler for {seconds:.0f}s, window {window}s")
        self.sql("TRUNCATE {inbox} CASCADE")
        samples: list[dict[str, Any]] = []
        stop = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.wait(5):
                rows, size = self.sql(
                    "SELECT (SELECT count(*) FROM {inbox}), pg_total_relation_size('{inbox}')"
                    " + pg_total_relation_size('{deliveries}')"
                )[0]
                samples.append(
                    {
                        "s": round(time.monotonic() - t0),
                        "inbox_rows": rows,
                        "mb": round(size / 2**20, 1),
                    }
                )

        env = {"OUTBOX_BRIDGE_DEDUPE_WINDOW": str(window), "OUTBOX_BRIDGE_PRUNE_INTERVAL": "1"}
        with self.worker("--include", "outbox_bridge.tools.bench.handlers", env=env):
            self._consumer_ready()
            sampler = threading.Thread(target=sample)
            sampler.start()
            sent = self._offer(self.topic("e2e"), seconds)
            stop.set()
            sampler.join()
        return {
            "offered_rate": self.opts.rate,
            "written": sent,
            "window_s": window,
            "samples": samples,
        }

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

    def wake_cost(self) -> dict[str, Any]:
        """What the wake-up costs writers: pgbench with no wake-up at all, with the
        opt-in NOTIFY trigger, and with the watcher's sequence reads running."""
        pairs, seconds = self.opts.wake_pairs, self.opts.wake_seconds
        say(
            f"wake-up cost: {self.opts.writers} writer connections, one row per transaction"
            f" (pgbench, {pairs} interleaved rounds of {seconds} s runs)"
        )
        pgbench = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
        dsn = psycopg2.extensions.parse_dsn(self.settings.database_url)
        topic = self.topic("notify")
        script = self.logdir / "insert.sql"
        schema = self.settings.schema.replace('"', '""')
        script.write_text(
            "\\set k random(0, 99)\n"
            f'INSERT INTO "{schema}".outbox (message_id, topic, key, value, headers, shard)'
            f" VALUES (gen_random_uuid(), '{topic}', convert_to('key-' || :k, 'UTF8'),"
            f" convert_to(repeat('x', {self.opts.size}), 'UTF8'), '[]', :k % 16);\n"
        )

        def run() -> float:
            out = subprocess.run(
                [
                    pgbench,
                    "-n",
                    "-f",
                    str(script),
                    "-c",
                    str(self.opts.writers),
                    "-j",
                    "2",
                    "-T",
                    str(seconds),
                    "-h",
                    dsn.get("host", "127.0.0.1"),
                    "-p",
                    str(dsn.get("port", 5432)),
                    "-U",
                    dsn.get("user", "postgres"),
                    BENCH_DB,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            for line in out.stdout.splitlines():
                if line.startswith("tps"):
                    return float(line.split()[2])
            raise click.ClickException("pgbench printed no tps:\n" + out.stdout + out.stderr)

        def trigger(on: bool) -> None:
            with transaction(self.settings, "outbox-bridge bench") as cur:
                notify_trigger(cur, self.settings.schema, on)

        looks = [0, 0.0]  # sequence reads, seconds

        @contextmanager
        def sequence_watch():
            """The watcher's wake-up queries, as often as it makes them: the sequence
            read every wake_poll, and the outbox look (ready shards) when it moved."""
            stop = threading.Event()
            conn = connect(self.settings, autocommit=True)
            cur = conn.cursor()
            watch = SequenceWatch(cur, self.settings.schema)
            queue = Queue(name="outbox", table="outbox", schema=self.settings.schema)

            def loop() -> None:
                t0 = time.monotonic()
                while not stop.wait(self.settings.wake_poll):
                    looks[0] += 1
                    if watch.moved(cur):
                        queue.ready_shards(cur)
                looks[1] += time.monotonic() - t0

            thread = threading.Thread(target=loop)
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join()
                conn.close()

        samples: dict[str, list[float]] = {"none": [], "trigger": [], "sequence": []}
        # interleaved and repeated: runs drift (WAL, autovacuum) as much as a wake-up costs
        for _ in range(pairs):
            for kind in samples:
                self.sql("TRUNCATE {outbox}")
                self.sql("CHECKPOINT")
                trigger(kind == "trigger")
                if kind == "sequence":
                    with sequence_watch():
                        samples[kind].append(run())
                else:
                    samples[kind].append(run())
        trigger(False)
        self.sql("TRUNCATE {outbox}")
        out: dict[str, Any] = {}
        for kind, values in samples.items():
            out[f"tps {kind}"] = round(statistics.median(values))
            out[f"tps {kind} runs"] = [round(v) for v in values]
        for kind in ("trigger", "sequence"):
            # loss per interleaved round against the run without a wake-up just before it
            losses = [
                (1 - on / off) * 100 for on, off in zip(samples[kind], samples["none"], strict=True)
            ]
            out[f"loss {kind} %"] = round(statistics.median(losses), 1)
            out[f"loss {kind} % min"] = round(min(losses), 1)
            out[f"loss {kind} % max"] = round(max(losses), 1)
        out["sequence reads per second"] = round(looks[0] / looks[1]) if looks[1] else 0
        return out

    def run(self, only: set[str] | None = None) -> dict[str, Any]:
        self.fresh_database()
        repeated = [
            ("limit", self.limit),
            ("naive", self.naive),
            ("relay_backlog", lambda: self.drain(self.opts.count, False, "relay_backlog")),
            ("relay_steady", self.steady),
            ("handler_steady", self.handler_steady),
            ("end_to_end", self.end_to_end),
        ]
        for rows in self.opts.scale_rows:
            repeated.append(
                (f"scaling_{rows}", lambda rows=rows: self.drain(rows, True, f"scaling_{rows}"))
            )
        once = [
            ("metrics_scrape", self.metrics_scrape),
            ("prune_cost", self.prune_cost),
            ("retention_steady", self.retention_steady),
            ("wake_cost", self.wake_cost),
            ("drivers", lambda: compare_drivers(self.settings, size=self.opts.size)),
        ]
        self.samples: dict[str, list[dict[str, Any]]] = {}
        # round by round, so that each round has every figure (ratios within a round)
        for round_ in range(self.opts.repeat):
            for name, step in repeated:
                if only and name not in only:
                    continue
                say(f"[round {round_ + 1}/{self.opts.repeat}]")
                self.samples.setdefault(name, []).append(step())
                say(f"  -> {name}: {self.samples[name][-1]}")
                self.sql("TRUNCATE {outbox}")
        for name, samples in self.samples.items():
            self.results[name] = combine(samples)
        for name, step in once:
            if only and name not in only:
                continue
            self.results[name] = step()
            say(f"  -> {name}: {self.results[name]}")
            self.sql("TRUNCATE {outbox}")
        self.ratios()
        return self.results

    def ratios(self) -> None:
        """Ratios within each round, then their median, min and max."""
        s = self.samples

        def ratio(key: str, top: str, bottom: str, digits: int) -> None:
            pairs = zip(s.get(top, []), s.get(bottom, []), strict=False)
            values = [a["rate"] / b["rate"] for a, b in pairs if b["rate"]]
            if values:
                self.results[key] = {
                    "ratio": round(statistics.median(values), digits),
                    "min": round(min(values), digits),
                    "max": round(max(values), digits),
                }

        ratio("relay_vs_limit", "relay_backlog", "limit", 3)
        ratio("relay_vs_naive", "relay_backlog", "naive", 1)
        small, big = (f"scaling_{n}" for n in (self.opts.scale_rows + (0, 0))[:2])
        ratio("scaling_ratio", big, small, 2)


def _spread(value: dict[str, Any], key: str) -> str:
    """``median (min-max)`` of a repeated figure, or the value alone."""
    if value.get(key) is None:
        return ""
    low, high = value.get(f"{key}_min"), value.get(f"{key}_max")
    return f"{value[key]} ({low}-{high})" if low is not None else f"{value[key]}"


_SHOWN = ("rate", "p50_ms", "p95_ms", "p99_ms", "rss_main_mb", "rss_pool_mb")


def table(results: dict[str, Any]) -> str:
    """The results as Markdown: each figure as median (min-max) of its runs."""
    lines = [
        "| measurement | messages/s | latency p50 / p99 (ms) | RSS main / pool (MB) | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, value in results.items():
        if not isinstance(value, dict) or "rate" not in value or name == "options":
            continue
        lat = ""
        if value.get("p50_ms") is not None:
            lat = f"{_spread(value, 'p50_ms')} / {_spread(value, 'p99_ms')}"
        rss = ""
        if value.get("rss_main_mb") is not None:
            rss = f"{_spread(value, 'rss_main_mb')} / {_spread(value, 'rss_pool_mb')}"
        notes = ", ".join(
            f"{k} {v}"
            for k, v in value.items()
            if k in ("messages", "offered_rate", "written", "received", "handled", "runs")
        )
        lines.append(f"| {name} | {_spread(value, 'rate')} | {lat} | {rss} | {notes} |")
    for key in ("relay_vs_limit", "relay_vs_naive", "scaling_ratio"):
        if key in results:
            r = results[key]
            lines.append(f"| {key} | {r['ratio']} ({r['min']}-{r['max']}) | | | |")
    if "wake_cost" in results:
        lines += ["", "| wake-up cost (pgbench, 32 writers) | value |", "| --- | --- |"]
        for k, v in results["wake_cost"].items():
            lines.append(f"| {k} | {v} |")
    return "\n".join(lines)
