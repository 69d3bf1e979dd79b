"""What stays true over months (issue 18), against the real PostgreSQL and Kafka."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer, TopicPartition

from outbox_bridge.config import Settings
from outbox_bridge.db import transaction
from outbox_bridge.ops import consumer_lag
from outbox_bridge.outbox.tasks import MAX_PAUSES, pause_topics

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


def test_a_pause_row_at_the_edge_pauses_for_the_maximum_without_overflow(db_url):
    settings = Settings(database_url=db_url, pause_seconds=1.0, pause_max_seconds=30.0)
    with transaction(settings) as cur:
        cur.execute(
            "INSERT INTO outbox_bridge.topic_pauses (topic, until, pauses) VALUES"
            " ('a', now(), 1024), ('b', now(), 2147483647), ('c', now(), 3)"
        )
        paused = dict(pause_topics(cur, settings, {"a": "E", "b": "E", "c": "E", "d": "E"}))
        cur.execute("SELECT topic, pauses FROM outbox_bridge.topic_pauses ORDER BY topic")
        counts = dict(cur.fetchall())
    assert 29 < paused["a"] <= 30 and 29 < paused["b"] <= 30  # 2 ^ 1024 is out of range
    assert 7 < paused["c"] <= 8 and 0 < paused["d"] <= 1  # 1 * 2 ^ 3; a first pause
    assert counts == {"a": 1025, "b": MAX_PAUSES, "c": 4, "d": 1}


def test_consumer_lag_counts_from_the_low_watermark_when_older_records_are_gone(
    services, topic, kafka_admin
):
    bootstrap = services["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"]
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(10):
        producer.produce(topic, value=b"%d" % i, partition=0)
    assert producer.flush(30) == 0
    # as if retention had expired them before the group first read the partition
    deleted = kafka_admin.delete_records([TopicPartition(topic, 0, 10)])
    for future in deleted.values():
        assert future.result(30).low_watermark == 10
    settings = Settings(kafka_bootstrap_servers=bootstrap)
    group = "test-" + uuid.uuid4().hex[:8]  # never committed anything

    def lag_of_partition_0() -> dict:
        return next(p for p in consumer_lag(settings, group, [topic]) if p["partition"] == 0)

    assert lag_of_partition_0() == {
        "topic": topic,
        "partition": 0,
        "committed": None,
        "end": 10,
        "lag": 0,
    }
    for i in range(3):
        producer.produce(topic, value=b"%d" % i, partition=0)
    assert producer.flush(30) == 0
    assert lag_of_partition_0()["lag"] == 3


def test_retention_forgets_old_receipts_and_the_pauses_of_topics_nobody_tried_for_a_day(db_url):
    from outbox_bridge.worker.maintenance import forget

    settings = Settings(database_url=db_url)
    with transaction(settings) as cur:
        cur.execute(
            "INSERT INTO outbox_bridge.send_receipts (message_id, sent_at) VALUES"
            " (gen_random_uuid(), now() - interval '25 hours'), (gen_random_uuid(), now())"
        )
        cur.execute(
            "INSERT INTO outbox_bridge.topic_pauses (topic, until, pauses) VALUES"
            " ('gone', now() - interval '25 hours', 900), ('away', now() + interval '30s', 9)"
        )
    forget(settings)
    with transaction(settings) as cur:
        cur.execute("SELECT count(*) FROM outbox_bridge.send_receipts")
        assert cur.fetchone() == (1,)
        cur.execute("SELECT topic FROM outbox_bridge.topic_pauses")
        assert cur.fetchall() == [("away",)]


def test_metric_files_of_exited_processes_fold_into_one_and_keep_their_totals(tmp_path):
    import os
    import subprocess
    import sys

    from outbox_bridge.contrib import metrics

    count = (
        "from outbox_bridge.contrib import metrics;"
        " metrics.count('handled', 'q', 3); metrics.handler_seconds('q', 0.5)"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(6):  # six pool processes that have come and gone
        done = subprocess.run([sys.executable, "-c", count], env=env, capture_output=True)
        assert done.returncode == 0, done.stderr
    assert len(list(tmp_path.glob("counter_*.db"))) == 6

    def totals() -> dict[str, float]:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        found = CollectorRegistry()
        MultiProcessCollector(found, path=str(tmp_path))
        return {
            s.name: s.value
            for m in found.collect()
            for s in m.samples
            if s.name in ("outbox_bridge_handled_total", "outbox_bridge_handler_seconds_count")
        }

    before = totals()
    assert before == {
        "outbox_bridge_handled_total": 18.0,
        "outbox_bridge_handler_seconds_count": 6.0,
    }
    assert metrics.compact(str(tmp_path)) == 12  # six counter and six histogram files
    assert sorted(p.name for p in tmp_path.glob("*.db")) == [
        "counter_archive.db",
        "histogram_archive.db",
    ]
    assert totals() == before
    subprocess.run([sys.executable, "-c", count], env=env, check=True)  # one more, then fold
    assert metrics.compact(str(tmp_path)) == 2
    assert totals()["outbox_bridge_handled_total"] == 21.0


def test_a_session_of_ours_frozen_inside_a_transaction_ends_and_frees_its_locks(db_url):
    """A client that froze mid-transaction (a paused VM, a flow gone silent while the
    server's side stays up) would hold its row locks for good: the session ends once
    it has been idle in the transaction past every wait of ours (here 1 + 1 s)."""
    import psycopg2

    from outbox_bridge.db import connect
    from tests.conftest import query, wait_for

    settings = Settings(
        database_url=db_url, network_timeout=1.0, handler_time_limit=1.0, lease_seconds=1.0
    )
    frozen = connect(settings, name="outbox-bridge frozen")
    with frozen.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS frozen_rows (id int PRIMARY KEY)")
        cur.execute("INSERT INTO frozen_rows VALUES (1) ON CONFLICT DO NOTHING")
    frozen.commit()
    with frozen.cursor() as cur:
        cur.execute("SELECT id FROM frozen_rows WHERE id = 1 FOR UPDATE")  # holds the row
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
    # the lock is held: another session cannot take the row now
    assert query(db_url, "SELECT id FROM frozen_rows FOR UPDATE SKIP LOCKED") == []
    wait_for(
        lambda: (
            query(db_url, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) == [(0,)]
        ),
        15,
        "the frozen session to end",
    )
    assert query(db_url, "SELECT id FROM frozen_rows FOR UPDATE SKIP LOCKED") == [(1,)]
    # its client learns it at its next statement
    with pytest.raises(psycopg2.Error), frozen.cursor() as cur:
        cur.execute("SELECT 1")
    frozen.close()
