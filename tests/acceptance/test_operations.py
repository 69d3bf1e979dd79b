"""`outbox-bridge dead purge` with each filter, and `status` with work waiting,
against the real PostgreSQL and Kafka."""

from __future__ import annotations

import json
import subprocess
import uuid

import psycopg2
import pytest
from confluent_kafka import Producer

from outbox_bridge import publish
from tests.conftest import ROOT, query, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["outbox-bridge", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def _dead(env: dict) -> list[tuple]:
    out = cli(env, "dead", "list", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    return sorted((d["queue"], d["topic"], d["key"]) for d in listed)


def test_dead_purge_with_every_filter(worker_env, db_url):
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        ids = {(t, k): publish(cur, t, {"n": 1}, key=k) for t in ("t1", "t2") for k in "ab"}
        cur.execute("UPDATE outbox_bridge.outbox SET state = 'dead', dead_at = now()")
        for handler in ("h1", "h2"):  # a dead delivery of key "a" for each of two handlers
            message_id = uuid.uuid4()
            cur.execute(
                'INSERT INTO outbox_bridge.inbox (message_id, topic, "partition",'
                " \"offset\", key) VALUES (%s, 't3', 0, 0, 'a')",
                (message_id,),
            )
            cur.execute(
                "INSERT INTO outbox_bridge.deliveries (message_id, handler, topic, key,"
                " shard, state, dead_at) VALUES (%s, %s, 't3', 'a', 0, 'dead', now())",
                (message_id, handler),
            )
    c.close()
    outbox = [("outbox", t, k) for t in ("t1", "t2") for k in "ab"]
    assert _dead(worker_env) == sorted(outbox + [("h1", "t3", "a"), ("h2", "t3", "a")])

    def purge(*args: str, count: int) -> None:
        out = cli(worker_env, "dead", "purge", *args)
        assert f"purged {count} dead messages" in out.stdout, out.stdout + out.stderr

    purge("--topic", "t1", "--key", "a", count=1)
    purge("--id", str(ids[("t2", "b")]), count=1)
    purge("--handler", "h1", count=1)
    assert _dead(worker_env) == [("h2", "t3", "a"), ("outbox", "t1", "b"), ("outbox", "t2", "a")]
    purge("--key", "a", count=2)  # the outbox row and the delivery of key "a"
    assert _dead(worker_env) == [("outbox", "t1", "b")]
    purge("--topic", "nothing-here", count=0)
    purge(count=1)
    assert _dead(worker_env) == []


def test_status_reports_the_consumer_lag_and_the_oldest_pending_age(
    worker_env, db_url, topic, services
):
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        publish(cur, topic, {"n": 1})  # no worker runs: it stays pending
        cur.execute("UPDATE outbox_bridge.outbox SET created_at = now() - interval '90 seconds'")
        cur.execute("INSERT INTO outbox_bridge.handlers (name, topic) VALUES ('h', %s)", (topic,))
    c.close()
    producer = Producer({"bootstrap.servers": services["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"]})
    for n in range(5):
        producer.produce(topic, value=json.dumps({"n": n}).encode(), partition=0)
    assert producer.flush(30) == 0
    status = json.loads(cli(worker_env, "status", "--json").stdout)
    outbox = status["outbox"]
    assert outbox["counts"]["pending"] == 1
    assert 90 <= outbox["oldest_pending_seconds"] < 150
    lag = wait_for(
        lambda: json.loads(cli(worker_env, "status", "--json").stdout)["inbox"]["consumer_lag"],
        30,
        "the lag report",
    )
    assert {(p["topic"], p["partition"]): p["lag"] for p in lag}[(topic, 0)] == 5
    assert sum(p["lag"] for p in lag) == 5
    text = cli(worker_env, "status").stdout
    assert "lag" in text and topic in text, text


def test_the_worker_refuses_a_schema_older_than_it_needs(start_worker, db_url):
    """Part of issue 12: a worker against a database that lacks a migration exits at
    start, naming the migration and the command, instead of failing every task."""
    (newest,) = query(db_url, "SELECT max(version) FROM outbox_bridge.migrations")[0]
    query(db_url, "DELETE FROM outbox_bridge.migrations WHERE version = %s", (newest,))
    with pytest.raises(AssertionError, match="worker exited") as refused:
        start_worker()
    assert f"lacks outbox-bridge migrations {newest:04d}_" in str(refused.value)
    assert "outbox-bridge migrate" in str(refused.value)
