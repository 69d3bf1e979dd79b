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
from confluent_kafka import Consumer, Producer

from .bench_drivers import compare as compare_drivers
from .config import Settings
from .db import connect, q, recreate_database, transaction
from .message import kafka_headers
from .migrate import migrate
from .ops import ensure_topics
from .outbox import publish
from .producer import producer_config

BENCH_DB = "outbox_bridge_bench"


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
        self.sql("CREATE TABLE bench_done (message_id uuid, t double precision,"
                 " at timestamptz NOT NULL DEFAULT clock_timestamp())")  # fmt: skip

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
    def worker(self, *args: str, poll_interval: str | None = None):
        """``celery -A outbox_bridge worker`` for the bench database; yields when ready."""
        log = self.logdir / f"worker-{time.monotonic_ns()}.log"
        env = self.env()
        if poll_interval:
            env["OUTBOX_BRIDGE_POLL_INTERVAL"] = poll_interval
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "outbox_bridge", "worker", "-l", "info",
                 "-c", str(self.opts.concurrency), "-n", f"bench-{uuid.uuid4().hex[:6]}@%h",
                 "--without-mingle", "--without-gossip", *args],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
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
                (topic, self.opts.keys, self.opts.size, self.opts.keys, self.settings.shards,
                 rows),
            )  # fmt: skip
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
                        topic, value=value, key=f"key-{i % self.opts.keys}".encode(),
                        headers=kafka_headers([], uuid.uuid4()),
                        on_delivery=lambda err, _m: err and errors.append(err),
                    )  # fmt: skip
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush(120)
        elapsed = time.monotonic() - t0
        if errors:
            raise click.ClickException(f"limit: {len(errors)} delivery errors, e.g. {errors[0]}")
        return {"messages": self.opts.count, "seconds": round(elapsed, 2),
                "rate": round(self.opts.count / elapsed)}  # fmt: skip

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
                    q("SELECT id, message_id, topic, key, value, headers FROM {outbox}"
                      " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED", self.settings.schema)
                )  # fmt: skip
                row = cur.fetchone()
                if row is None:
                    break
                producer.produce(row[2], value=bytes(row[4]), key=bytes(row[3]),
                                 headers=kafka_headers(row[5], row[1]))  # fmt: skip
                producer.flush(30)
                cur.execute(q("DELETE FROM {outbox} WHERE id = %s", self.settings.schema),
                            (row[0],))  # fmt: skip
                done += 1
        elapsed = time.monotonic() - t0
        conn.close()
        return {"messages": done, "seconds": round(elapsed, 2), "rate": round(done / elapsed)}

    def drain(self, rows: int, bulk: bool, label: str) -> dict[str, Any]:
        say(f"{label}: {rows} committed rows, then the worker")
        self.fill(self.topic(label), rows, bulk=bulk)
        with self.worker("--without-inbox-consumer"):
            elapsed = self.wait_count(
                "SELECT count(*) FROM {outbox}", lambda n: n == 0, f"{label}, rows left"
            )
        return {"messages": rows, "seconds": round(elapsed, 2), "rate": round(rows / elapsed)}

    def steady(self) -> dict[str, Any]:
        rate, seconds = self.opts.rate, self.opts.seconds
        say(f"steady state: writers offer {rate} messages/s for {seconds:.0f}s")
        topic = self.topic("steady")
        latencies: list[float] = []
        stop = threading.Event()
        consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap_servers,
                             "group.id": f"bench-{self.run_id}-steady",
                             "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})  # fmt: skip
        consumer.subscribe([topic])

        def consume() -> None:
            while not stop.is_set():
                for msg in consumer.consume(1000, timeout=0.1):
                    if msg.error() is None:
                        now = time.time()
                        latencies.append(now - json.loads(msg.value()[:40].split(b",")[0][5:]))

        sent = [0]

        def write(share: int) -> None:
            conn = connect(self.settings)
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < seconds:
                due = start + n / share
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                with conn, conn.cursor() as cur:
                    publish(cur, topic, _value(self.opts.size, t=time.time()),
                            key=f"key-{n % self.opts.keys}")  # fmt: skip
                n += 1
            sent[0] += n
            conn.close()

        with self.worker("--without-inbox-consumer"):
            reader = threading.Thread(target=consume)
            reader.start()
            # let the consumer join its group before the clock starts
            time.sleep(3)
            writers = [threading.Thread(target=write, args=(rate / 4,)) for _ in range(4)]
            t0 = time.monotonic()
            for w in writers:
                w.start()
            for w in writers:
                w.join()
            deadline = time.monotonic() + 60
            while len(latencies) < sent[0] and time.monotonic() < deadline:
                time.sleep(0.1)
            elapsed = time.monotonic() - t0
            stop.set()
            reader.join()
        consumer.close()
        return {"offered_rate": rate, "written": sent[0], "received": len(latencies),
                "rate": round(len(latencies) / elapsed), **_percentiles(latencies)}  # fmt: skip

    def end_to_end(self) -> dict[str, Any]:
        count = self.opts.e2e_count
        say(f"end to end: {count} messages through Kafka, the inbox and a handler")
        with self.worker("--include", "outbox_bridge.bench_handlers"):
            time.sleep(3)  # the consumer joins its group
            t0 = time.monotonic()
            self.publish_many(
                self.topic("e2e"), count, lambda: _value(self.opts.size, t=time.time()), 500
            )
            self.wait_count(
                "SELECT count(*) FROM bench_done", lambda n: n >= count,
                "end to end, handled", timeout=900,
            )  # fmt: skip
            elapsed = time.monotonic() - t0
            done = self.sql("SELECT count(*) FROM bench_done")[0][0]
        lat = [r[0] for r in self.sql(
            "SELECT extract(epoch FROM at) - t FROM bench_done")]  # fmt: skip
        return {"messages": done, "seconds": round(elapsed, 2), "rate": round(done / elapsed),
                **_percentiles(lat)}  # fmt: skip

    def notify_cost(self) -> dict[str, Any]:
        say(
            f"NOTIFY cost: {self.opts.writers} writer connections, one row per transaction"
            " (pgbench, median of 3 interleaved 5 s runs each)"
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
        seconds = 5

        def run() -> float:
            out = subprocess.run(
                [pgbench, "-n", "-f", str(script), "-c", str(self.opts.writers), "-j", "2",
                 "-T", str(seconds), "-h", dsn.get("host", "127.0.0.1"),
                 "-p", str(dsn.get("port", 5432)), "-U", dsn.get("user", "postgres"), BENCH_DB],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            for line in out.stdout.splitlines():
                if line.startswith("tps"):
                    return float(line.split()[2])
            raise click.ClickException("pgbench printed no tps:\n" + out.stdout + out.stderr)

        def trigger(on: bool) -> None:
            self.sql(f"ALTER TABLE {{outbox}} {'ENABLE' if on else 'DISABLE'}"
                     " TRIGGER outbox_wakeup")  # fmt: skip

        def sample(relay: str, on: bool) -> None:
            trigger(on)
            self.sql("TRUNCATE {outbox}")
            self.sql("CHECKPOINT")
            label = f"relay {relay}, wake-up {'on' if on else 'off'}"
            samples.setdefault(label, []).append(run())

        samples: dict[str, list[float]] = {}
        # interleaved and repeated: runs drift (WAL, autovacuum) more than the trigger costs
        for _ in range(3):
            for on in (False, True):
                sample("idle", on)
        for _ in range(3):
            for on in (False, True):
                # without the wake-up the relay polls as often as it looks while busy, so
                # that both runs carry the same relay load and only the wake-up differs
                with self.worker("--without-inbox-consumer", poll_interval=None if on else "0.05"):
                    sample("running", on)
        trigger(True)
        self.sql("TRUNCATE {outbox}")
        out: dict[str, Any] = {k: round(statistics.median(v)) for k, v in samples.items()}
        for relay in ("idle", "running"):
            off, on = out[f"relay {relay}, wake-up off"], out[f"relay {relay}, wake-up on"]
            out[f"loss with relay {relay}"] = f"{(1 - on / off) * 100:.1f}%"
        return out

    def run(self, only: set[str] | None = None) -> dict[str, Any]:
        self.fresh_database()
        steps = [
            ("limit", self.limit),
            ("naive", self.naive),
            ("relay_backlog", lambda: self.drain(self.opts.count, False, "relay_backlog")),
            ("relay_steady", self.steady),
            ("end_to_end", self.end_to_end),
            ("notify_cost", self.notify_cost),
            ("drivers", lambda: compare_drivers(self.settings, size=self.opts.size)),
        ]
        for rows in self.opts.scale_rows:
            steps.append(
                (f"scaling_{rows}", lambda rows=rows: self.drain(rows, True, f"scaling_{rows}"))
            )
        for name, step in steps:
            if only and name not in only:
                continue
            self.results[name] = step()
            say(f"  -> {name}: {self.results[name]}")
            self.sql("TRUNCATE {outbox}")
        self.ratios()
        return self.results

    def ratios(self) -> None:
        r = self.results
        rate = lambda name: r.get(name, {}).get("rate")  # noqa: E731
        if rate("relay_backlog") and rate("limit"):
            r["relay_vs_limit"] = round(rate("relay_backlog") / rate("limit"), 3)
        if rate("relay_backlog") and rate("naive"):
            r["relay_vs_naive"] = round(rate("relay_backlog") / rate("naive"), 1)
        small, big = (f"scaling_{n}" for n in (self.opts.scale_rows + (0, 0))[:2])
        if rate(small) and rate(big):
            r["scaling_ratio"] = round(rate(big) / rate(small), 2)


def table(results: dict[str, Any]) -> str:
    lines = ["| measurement | messages/s | latency p50 / p95 / p99 (ms) | notes |",
             "| --- | ---: | --- | --- |"]  # fmt: skip
    for name, value in results.items():
        if not isinstance(value, dict) or name in ("machine", "options", "notify_cost"):
            continue
        lat = ""
        if value.get("p50_ms") is not None:
            lat = f"{value['p50_ms']} / {value['p95_ms']} / {value['p99_ms']}"
        notes = ", ".join(f"{k} {v}" for k, v in value.items()
                          if k not in ("rate", "p50_ms", "p95_ms", "p99_ms"))  # fmt: skip
        lines.append(f"| {name} | {value.get('rate', '')} | {lat} | {notes} |")
    for key in ("relay_vs_limit", "relay_vs_naive", "scaling_ratio"):
        if key in results:
            lines.append(f"| {key} | {results[key]} | | |")
    if "notify_cost" in results:
        lines.append("")
        lines.append("| NOTIFY cost (pgbench, writes/s) | value |")
        lines.append("| --- | ---: |")
        for k, v in results["notify_cost"].items():
            lines.append(f"| {k} | {v} |")
    return "\n".join(lines)
