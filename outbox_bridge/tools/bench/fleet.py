"""A fleet of workers: capacity that adds up, what an idle fleet costs, and how soon the
first commit after a quiet spell reaches Kafka (issue 20)."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from contextlib import ExitStack
from typing import Any

import click
from confluent_kafka.admin import AdminClient

from ...config import kafka_client
from ...db import connect
from ...inbox.consumer import consume_batch
from ...outbox.publish import publish
from .harness import Harness, children, percentiles, say

TICKS = os.sysconf("SC_CLK_TCK")
FLEET_SIZES = (1, 2, 4)
FLEET_MESSAGES = 3000
FLEET_KEYS = 96


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its children that have ended (they are waited for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / TICKS  # utime stime cutime cstime


def tree_seconds(pid: int) -> float:
    """CPU time of a process and its living children (theirs that ended is in cutime)."""
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class FleetFigures(Harness):
    def _group_stable(self, members: int, timeout: float = 120) -> None:
        """The bench's consumer group has ``members`` members and is stable: no rebalance
        will move partitions while the clock runs."""
        admin = AdminClient(kafka_client(self.settings))
        group = self.env()["OUTBOX_BRIDGE_CONSUMER_GROUP"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = admin.describe_consumer_groups([group])[group].result(10)
            if len(found.members) == members and str(found.state).endswith("STABLE"):
                return
            time.sleep(0.2)
        raise click.ClickException(f"consumer group {group}: not {members} stable members")

    def _fleet(self, stack: ExitStack, size: int, concurrency: int, waits: bool = False) -> list:
        include = "outbox_bridge.tools.bench.handlers"
        if waits:
            include += ",outbox_bridge.tools.bench.waiting"
        procs = [
            stack.enter_context(self.worker("--include", include, concurrency=concurrency))
            for _ in range(size)
        ]
        self._group_stable(size)
        self._consumer_ready()
        return procs

    def fleet_capacity(self) -> dict[str, Any]:
        """3,000 messages over 96 keys into a handler that waits 10 ms in PostgreSQL per
        message (I/O: the cores are not the limit), committed at once as a backlog;
        1, 2 and 4 workers of 4 processes: seconds from the commit to the last handled."""
        out: dict[str, Any] = {}
        topic = self.topic("waits")
        for size in FLEET_SIZES:
            say(f"fleet capacity: {size} worker(s) -c 4, {FLEET_MESSAGES} messages x 10 ms")
            runs = []
            with ExitStack() as stack:
                self._fleet(stack, size, 4, waits=True)
                for _ in range(self.opts.repeat):
                    self.sql("TRUNCATE bench_done")
                    self.sql(  # committed at once; the clock starts at the commit
                        "INSERT INTO {outbox} (message_id, topic, key, value, headers, shard)"
                        " SELECT gen_random_uuid(), %(topic)s,"
                        " convert_to('key-' || (g %% %(keys)s), 'UTF8'), %(value)s, '[]',"
                        " abs(hashtext('key-' || (g %% %(keys)s))) %% %(shards)s"
                        " FROM generate_series(1, %(count)s) g",
                        {
                            "topic": topic,
                            "value": b'{"n": 1}',
                            "keys": FLEET_KEYS,
                            "count": FLEET_MESSAGES,
                            "shards": self.settings.shards,
                        },
                    )
                    runs.append(
                        self.wait_count(
                            "SELECT count(*) FROM bench_done",
                            lambda n: n >= FLEET_MESSAGES,
                            f"{size} worker(s), handled",
                            timeout=300,
                        )
                    )
                    say(f"  {size} worker(s): {runs[-1]:.2f}s")
            out[f"workers_{size}"] = {
                "seconds": round(statistics.median(runs), 2),
                "min": round(min(runs), 2),
                "max": round(max(runs), 2),
                "busy_processes": round(FLEET_MESSAGES * 0.010 / statistics.median(runs), 2),
            }
        one = out["workers_1"]["seconds"]
        for size in FLEET_SIZES[1:]:
            out[f"workers_{size}"]["of_one"] = round(out[f"workers_{size}"]["seconds"] / one, 2)
        return out

    def idle_fleet(self) -> dict[str, Any]:
        """Three idle workers (-c 2, consumers on) and PostgreSQL: CPU over 60 s, then the
        first commit after 10 s of quiet -> Kafka, round after round."""
        seconds, workers = 60.0, 3
        out: dict[str, Any] = {}
        postmaster = parent_of(self.sql("SELECT pg_backend_pid()")[0][0])
        say("idle fleet: PostgreSQL alone first (its own background work), 30 s")
        alone = tree_seconds(postmaster), time.monotonic()
        time.sleep(30)  # the measurement window
        alone_pct = 100 * (tree_seconds(postmaster) - alone[0]) / (time.monotonic() - alone[1])
        with ExitStack() as stack:
            procs = self._fleet(stack, workers, 2)
            say(f"idle fleet: {workers} workers; quiet for 15 s, then {seconds:.0f} s measured")
            time.sleep(15)  # the flip to idle and its watch are over; nothing is asked of it
            profile = self._statements_reset()
            before = [tree_seconds(p.pid) for p in procs], tree_seconds(postmaster)
            t0 = time.monotonic()
            time.sleep(seconds)  # the measurement window
            took = time.monotonic() - t0
            after = [tree_seconds(p.pid) for p in procs], tree_seconds(postmaster)
            used_workers = sum(a - b for a, b in zip(after[0], before[0], strict=True))
            used_pg = after[1] - before[1]
            out["idle"] = {
                "workers": workers,
                "seconds": round(took),
                "workers_pct_of_core": round(100 * used_workers / took, 2),
                "postgres_pct_of_core": round(100 * used_pg / took, 2),
                "total_pct_of_core": round(100 * (used_workers + used_pg) / took, 2),
                "postgres_alone_pct_of_core": round(alone_pct, 2),
                "fleet_adds_pct_of_core": round(
                    100 * (used_workers + used_pg) / took - alone_pct, 2
                ),
            }
            if profile:
                top = self._statements_top(8)
                out["idle"]["statements_per_s"] = round(sum(t["calls"] for t in top) / took, 2)
                out["idle_statements"] = top
            out["wake"] = self._wake_latency()
        return out

    def _wake_latency(self, rounds: int = 8, quiet: float = 10.0) -> dict[str, Any]:
        topic, consumer, assigned = self.timing_consumer("wake")
        appended: list[float] = []
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                for msg in consume_batch(consumer, 100, 0.1):
                    if msg.error() is None:
                        t = json.loads(msg.value())["t"]
                        appended.append(msg.timestamp()[1] / 1000 - t)

        reader = threading.Thread(target=consume)
        reader.start()
        try:
            if not assigned.wait(60):
                raise click.ClickException("wake: the measuring consumer got no partitions")
            conn = connect(self.settings)
            for n in range(rounds):
                say(f"  wake-up round {n + 1}/{rounds}: {quiet:.0f} s quiet, one commit")
                time.sleep(quiet)  # the quiet spell is the point of the figure
                with conn, conn.cursor() as cur:
                    # the time just before the commit, as the steady figure takes it
                    publish(cur, topic, {"t": time.time()}, key=f"k{n}")
                deadline = time.monotonic() + 30
                while len(appended) <= n and time.monotonic() < deadline:
                    time.sleep(0.01)
            conn.close()
        finally:
            stop.set()
            reader.join()
            consumer.close()
        ms = [round(v * 1000, 1) for v in appended]
        return {"rounds": rounds, "quiet_s": quiet, **percentiles(appended), "max_ms": max(ms)}
