"""What the pipeline costs besides moving messages: a metrics scrape, pruning,
the wake-up of an idle dispatcher."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import click
import psycopg2

from ...db import connect, transaction
from ...migrate import notify_trigger
from ...queries import plain, statement
from ...queue import Queue
from ...worker.dispatcher import SequenceWatch
from .harness import (
    BENCH_DB,
    PRUNE_ROWS,
    SCRAPE_ROWS,
    Harness,
    say,
)


class CostFigures(Harness):
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
        values = (
            f"gen_random_uuid(), '{topic}', convert_to('key-' || :k, 'UTF8'),"
            f" convert_to(repeat('x', {self.opts.size}), 'UTF8'), '[]', :k % 16"
        )
        script.write_text(
            "\\set k random(0, 99)\n"
            f'INSERT INTO "{schema}".outbox (message_id, topic, key, value, headers, shard)'
            f" VALUES ({values});\n"
        )
        # publish()'s statement for wake = "notify": it tries the idle lock shared (free
        # while the dispatcher is busy: taken, no NOTIFY); bench values for its parameters
        insert = statement("outbox.insert_notify")
        params = insert[
            insert.index("VALUES (") + len("VALUES (") : insert.index("CAST(%s AS smallint)")
        ]
        published = self.logdir / "publish.sql"
        published.write_text(
            "\\set k random(0, 99)\n"
            + plain(
                insert.replace(params, values.removesuffix(":k % 16") + " ").replace(
                    "CAST(%s AS smallint)", "CAST(:k % 16 AS smallint)"
                ),
                self.settings.schema,
            ).replace("\n", " ")
            + ";\n"
        )

        def run(kind: str) -> float:
            chosen = published if kind == "publish" else script
            out = subprocess.run(
                [
                    pgbench,
                    "-n",
                    "-f",
                    str(chosen),
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

        samples: dict[str, list[float]] = {"none": [], "publish": [], "trigger": [], "sequence": []}
        # no dispatcher holds the idle lock: as while busy (commits skip NOTIFY)
        # interleaved and repeated: runs drift (WAL, autovacuum) as much as a wake-up costs
        for _ in range(pairs):
            for kind in samples:
                self.sql("TRUNCATE {outbox}")
                self.sql("CHECKPOINT")
                trigger(kind == "trigger")
                if kind == "sequence":
                    with sequence_watch():
                        samples[kind].append(run(kind))
                else:
                    samples[kind].append(run(kind))
        trigger(False)
        self.sql("TRUNCATE {outbox}")
        out: dict[str, Any] = {}
        for kind, values in samples.items():
            out[f"tps {kind}"] = round(statistics.median(values))
            out[f"tps {kind} runs"] = [round(v) for v in values]
        for kind in ("publish", "trigger", "sequence"):
            # loss per interleaved round against the run without a wake-up just before it
            losses = [
                (1 - on / off) * 100 for on, off in zip(samples[kind], samples["none"], strict=True)
            ]
            out[f"loss {kind} %"] = round(statistics.median(losses), 1)
            out[f"loss {kind} % min"] = round(min(losses), 1)
            out[f"loss {kind} % max"] = round(max(losses), 1)
        out["sequence reads per second"] = round(looks[0] / looks[1]) if looks[1] else 0
        return out
