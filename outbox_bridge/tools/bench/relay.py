"""The relay measured beside the raw producer: the limit, a naive outbox, a backlog's
drain, a steady offered rate."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import click
from confluent_kafka import Consumer, Producer

from ...config import kafka_client
from ...db import connect
from ...inbox.consumer import consume_batch
from ...message import kafka_headers
from ...outbox.kafka import producer_config
from ...outbox.publish import publish
from ...queries import compose as q
from .harness import (
    Harness,
    message_value,
    percentiles,
    rss_peaks,
    say,
)


def stamped(msg) -> float:
    """The time a bench value starts with (``message_value(size, t=...)``), read cheaply."""
    return json.loads(msg.value()[:40].split(b",")[0][5:])


class RelayFigures(Harness):
    # -- the measurements ----------------------------------------------------
    def limit(self) -> dict[str, Any]:
        say("limit: the raw confluent-kafka producer")
        topic = self.topic("limit")
        producer = Producer(producer_config(self.settings))
        value = message_value(self.opts.size, n=0)
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
            kafka_client(self.settings, **{"group.id": f"bench-{self.run_id}-offsets"})
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
                        message_value(self.opts.size, t=time.time()),
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
        topic, consumer, assigned = self.timing_consumer("steady")
        latencies: list[float] = []
        appended: list[float] = []
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                for msg in consume_batch(consumer, 1000, 0.1):
                    if msg.error() is None:
                        now = time.time()
                        t = stamped(msg)
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
        arrival = {f"arrival_{k}": v for k, v in percentiles(latencies).items()}
        return {
            "offered_rate": rate,
            "written": sent,
            "received": len(latencies),
            "rate": round(len(latencies) / elapsed),
            **percentiles(appended),
            **arrival,
        }

    def delayed(self) -> dict[str, Any]:
        """Lateness of ``delayed_count`` delayed messages due within the same second:
        Kafka's append time (LogAppendTime) less each one's ``deliver_at``."""
        count = self.opts.delayed_count
        say(f"delayed: {count} messages due within one second, then how late each goes")
        topic, consumer, assigned = self.timing_consumer("delayed")
        late: list[float] = []
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                for msg in consume_batch(consumer, 1000, 0.1):
                    if msg.error() is None:
                        due = stamped(msg)
                        late.append(msg.timestamp()[1] / 1000 - due)

        with self.worker("--without-inbox-consumer"):
            reader = threading.Thread(target=consume)
            reader.start()
            if not assigned.wait(60):
                raise click.ClickException("delayed: the measuring consumer got no partitions")
            first_due = time.time() + 10.0  # publishing 10,000 takes a few seconds
            conn = connect(self.settings)
            try:
                for start in range(0, count, 1000):
                    with conn, conn.cursor() as cur:
                        for i in range(start, min(count, start + 1000)):
                            due = first_due + i / count  # spread over one second
                            publish(
                                cur,
                                topic,
                                message_value(self.opts.size, t=due),
                                key=f"key-{i % self.opts.keys}",
                                deliver_at=datetime.fromtimestamp(due, timezone.utc),
                            )
            finally:
                conn.close()
            if time.time() > first_due - 1.0:
                raise click.ClickException("delayed: publishing took past the due time")
            deadline = first_due + 120
            while len(late) < count and time.time() < deadline:
                time.sleep(0.1)
            stop.set()
            reader.join()
        consumer.close()
        if len(late) < count:
            raise click.ClickException(f"delayed: {len(late)} of {count} in Kafka after 120 s")
        early = sum(1 for x in late if x < -0.001)  # ms timestamps: within a millisecond
        span = max(late) + 1.0  # from the first due time to the last append
        return {
            "messages": count,
            "rate": round(count / span),
            "early": early,
            **percentiles([max(0.0, x) for x in late]),
            "max_ms": round(max(late) * 1000, 1),
        }
