"""End to end into handlers: at a steady rate, and as fast as they go."""

from __future__ import annotations

import time
from typing import Any

from .harness import (
    Harness,
    percentiles,
    rss_peaks,
    say,
)


class InboxFigures(Harness):
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
            **percentiles(lat),
        }

    def end_to_end(
        self, *args: str, env: dict | None = None, topic: str = "e2e", count: int | None = None
    ) -> dict[str, Any]:
        """The pipeline's throughput: a backlog committed in one transaction while the
        worker runs, through the relay, Kafka, the inbox and a handler that inserts
        one row per message (``topic`` "e2e-batch": a batch handler, one INSERT per
        batch); from the commit to the last handler's commit, both read from
        PostgreSQL's clock (``insert_seconds``: the backlog's INSERT before it). (Through publish()
        the writer is the limit: one round trip per message, 4-5k/s.)"""
        count = count or self.opts.e2e_count
        say(f"end to end: {count} messages through Kafka, the inbox and a handler ({topic})")
        out: dict[str, Any] = {}
        with self.worker("--include", "outbox_bridge.tools.bench.handlers", *args, env=env) as proc:
            self._consumer_ready(topic)
            key = "db_profile_end_to_end" + ("_batch" if topic == "e2e-batch" else "")
            profile = self._statements_reset() and key not in self.results
            with rss_peaks(proc.pid, out):
                started = time.monotonic()
                self.sql(
                    "INSERT INTO {outbox} (message_id, topic, key, value, headers, shard)"
                    " SELECT gen_random_uuid(), %(topic)s, convert_to('key-' || (g %% %(keys)s),"
                    " 'UTF8'), convert_to(json_build_object('t', extract(epoch FROM now()),"
                    " 'pad', repeat('x', %(pad)s))::text, 'UTF8'), '[]',"
                    " abs(hashtext('key-' || (g %% %(keys)s))) %% %(shards)s"
                    " FROM generate_series(1, %(count)s) g",
                    {
                        "topic": self.topic(topic),
                        "keys": self.opts.keys,
                        "count": count,
                        "pad": max(0, self.opts.size - 40),
                        "shards": self.settings.shards,
                    },
                )
                t0 = time.monotonic()
                ((committed,),) = self.sql("SELECT clock_timestamp()")
                # looked at rarely: the count is a scan of the rows so far, on the same CPUs
                self.wait_count(
                    "SELECT count(*) FROM bench_done",
                    lambda n: n >= count,
                    "end to end, handled",
                    timeout=900,
                    every=0.5,
                )
            # the last handler commit's own clock, not the look that saw it
            ((done, elapsed),) = self.sql(
                "SELECT count(*), extract(epoch FROM max(at) - %s) FROM bench_done", (committed,)
            )
            elapsed = float(elapsed)
        if profile:
            self.results[key] = self._statements_top()
        return {
            "messages": done,
            "insert_seconds": round(t0 - started, 2),
            "seconds": round(elapsed, 2),
            "rate": round(done / elapsed),
            **out,
        }

    def end_to_end_batch(self) -> dict[str, Any]:
        """``end_to_end`` into a batch handler that writes each call's rows with one
        INSERT (``--e2e-batch-count`` messages)."""
        return self.end_to_end(topic="e2e-batch", count=self.opts.e2e_batch_count)
