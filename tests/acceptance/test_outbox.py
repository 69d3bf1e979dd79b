"""The outbox relay end to end: real PostgreSQL, Kafka, RabbitMQ and
`celery -A outbox_bridge worker` subprocesses."""

import json
import os
import signal
import subprocess
import threading
from collections import defaultdict

import psycopg2
import pytest

from outbox_bridge import publish
from tests.conftest import ROOT, create_topic, rows, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]


def commit(db_url: str, topic: str, values, key=None, headers=None) -> list:
    c = psycopg2.connect(db_url)
    try:
        with c, c.cursor() as cur:
            return [publish(cur, topic, v, key=key, headers=headers) for v in values]
    finally:
        c.close()


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["outbox-bridge", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_committed_rows_reach_kafka_with_key_value_headers_and_are_deleted(
    start_worker, db_url, topic, kafka_reader
):
    start_worker()
    ids = commit(db_url, topic, [{"n": 1}, {"n": 2}], key="order-7", headers={"type": "Created"})
    c = psycopg2.connect(db_url)
    with pytest.raises(RuntimeError), c, c.cursor() as cur:
        publish(cur, topic, {"n": "rolled back"}, key="order-7")
        raise RuntimeError("roll back")
    c.close()
    ids += commit(db_url, topic, [{"n": 3}], key="order-7")

    reader = kafka_reader(topic)
    messages = reader.read(3, timeout=60)
    assert [json.loads(m.value()) for m in messages] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert {m.key() for m in messages} == {b"order-7"}
    assert [dict(m.headers())["message_id"].decode() for m in messages] == [str(i) for i in ids]
    assert dict(messages[0].headers())["type"] == b"Created"
    wait_for(lambda: rows(db_url) == [], 30, "published rows to be deleted")
    assert len(reader.drain(quiet=2)) == 3  # the rolled-back message never comes


def test_per_key_order_with_four_worker_processes_and_injected_failures(
    start_worker, db_url, topic, kafka_reader
):
    keys, per_key = 40, 30
    start_worker(
        concurrency=4,
        OUTBOX_BRIDGE_BEFORE_PRODUCE="tests.faults.fail_once_per_process",
        OUTBOX_BRIDGE_BATCH_SIZE="25",
        OUTBOX_BRIDGE_MAX_RETRIES="5",
    )

    def writer(first_key: int) -> None:
        for seq in range(per_key):
            for k in range(first_key, keys, 4):
                fail = (seq * 7 + k) % 13 == 0
                commit(db_url, topic, [{"k": k, "seq": seq, "fail": fail}], key=f"key-{k}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # keyless messages never wait
    commit(db_url, topic, [{"k": None, "seq": i, "fail": False} for i in range(20)])

    total = keys * per_key + 20
    messages = kafka_reader(topic).read(total, timeout=180)
    seen = defaultdict(list)
    for m in messages:
        v = json.loads(m.value())
        if v["k"] is not None:
            seen[v["k"]].append(v["seq"])
    for k in range(keys):
        assert seen[k] == list(range(per_key)), f"key-{k} out of order or duplicated"
    wait_for(lambda: rows(db_url) == [], 30, "every row to be deleted")


def test_kafka_down_longer_than_the_retry_schedule_turns_nothing_dead(
    start_worker, db_url, topic, kafka_admin, kafka_reader, services
):
    create_topic(kafka_admin, topic)
    worker = start_worker(
        OUTBOX_BRIDGE_MAX_RETRIES="2",
        OUTBOX_BRIDGE_PRODUCER_CONFIG='{"message.timeout.ms": 3000}',
        OUTBOX_BRIDGE_PAUSE_MAX_SECONDS="2",
    )
    commit(db_url, topic, [{"n": 0}], key="k")
    kafka_reader(topic).read(1, timeout=60)
    services_cmd = [str(ROOT / "scripts" / "services")]
    subprocess.run([*services_cmd, "down", "kafka"], check=True, timeout=120)
    try:
        commit(db_url, topic, [{"n": i} for i in range(1, 51)], key="k")
        commit(db_url, topic, [{"n": i} for i in range(51, 61)])
        # retry schedule: 2 retries, backoff <= 2s; stay down well past it
        wait_for(
            lambda: "Kafka unreachable" in worker.log_tail(), 30, "the circuit breaker to open"
        )
        threading.Event().wait(12)
        assert rows(db_url, "state <> 'pending'") == []
    finally:
        subprocess.run([*services_cmd, "up", "kafka"], check=True, timeout=300)
    reader = kafka_reader(topic)
    messages = reader.read(61, timeout=120)
    keyed = [json.loads(m.value())["n"] for m in messages if m.key() == b"k"]
    assert sorted(set(keyed)) == list(range(51))
    assert keyed == sorted(keyed)
    wait_for(lambda: rows(db_url) == [], 30, "every row to be deleted")
