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
from tests.conftest import ROOT, rows, wait_for, watcher_idle

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
    worker = start_worker(
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
    # the faults did happen: rows failed and were retried
    assert "injected failure of" in worker.log_path.read_text()
    wait_for(lambda: rows(db_url) == [], 30, "every row to be deleted")


@pytest.mark.services
def test_kafka_down_longer_than_the_retry_schedule_turns_nothing_dead(
    start_worker, db_url, topic, kafka_admin, kafka_reader, native_services
):
    worker = start_worker(
        OUTBOX_BRIDGE_MAX_RETRIES="2",
        OUTBOX_BRIDGE_PRODUCER_CONFIG='{"message.timeout.ms": 3000}',
        OUTBOX_BRIDGE_PAUSE_MAX_SECONDS="2",
    )
    commit(db_url, topic, [{"n": 0}], key="k")
    kafka_reader(topic).read(1, timeout=60)
    native_services.down("kafka")  # checked: its port refuses connections
    try:
        ids = commit(db_url, topic, [{"n": i} for i in range(1, 51)], key="k")
        ids += commit(db_url, topic, [{"n": i} for i in range(51, 61)])
        # retry schedule: 2 retries, backoff <= 2s; stay down well past it
        wait_for(lambda: "paused for" in worker.log_tail(), 30, "the circuit breaker to open")
        threading.Event().wait(12)
        assert rows(db_url, "state <> 'pending'") == []
    finally:
        native_services.up("kafka")
    reader = kafka_reader(topic)
    reader.read_message_ids({str(i) for i in ids}, timeout=120)  # every one, duplicates or not
    keyed = [json.loads(m.value())["n"] for m in reader.messages if m.key() == b"k"]
    assert sorted(set(keyed)) == list(range(51))
    firsts = list(dict.fromkeys(keyed))  # first occurrences: in publish order
    assert firsts == sorted(firsts)
    wait_for(lambda: rows(db_url) == [], 30, "every row to be deleted")


@pytest.mark.kafka_topic(partitions=1, config={"max.message.bytes": "2000"})
def test_a_message_the_broker_rejects_turns_dead_holds_its_key_and_dead_retry_delivers_in_order(
    start_worker, worker_env, db_url, topic, kafka_admin, kafka_reader
):
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    worker = start_worker(OUTBOX_BRIDGE_MAX_RETRIES="2")
    commit(db_url, topic, [{"n": 0}], key="k")
    reader = kafka_reader(topic)
    reader.read(1, timeout=60)
    commit(db_url, topic, [{"n": 1, "pad": "x" * 5000}], key="k")
    wait_for(lambda: rows(db_url, "state = 'retrying'"), 30, "the large message to fail")
    commit(db_url, topic, [{"n": 2}, {"n": 3}], key="k")
    commit(db_url, topic, [{"n": "other key"}], key="other")

    dead = wait_for(lambda: rows(db_url, "state = 'dead'"), 60, "the large message to be dead")
    (_id, _topic, key, _state, attempts, error) = dead[0]
    assert (key, attempts) == ("k", 3)  # the first try and exactly max_retries retries
    assert "MSG_SIZE_TOO_LARGE" in error and "too large" in error
    # its key waits; other keys do not
    assert [json.loads(m.value())["n"] for m in reader.read(2, timeout=30)] == [0, "other key"]
    # behind the dead head: pending, or parked as waiting out of the fetch's way
    assert [r[3] for r in rows(db_url)][0] == "dead"
    assert {r[3] for r in rows(db_url)[1:]} <= {"pending", "waiting"}

    status = json.loads(cli(worker_env, "status", "--json").stdout)["outbox"]
    counts = status["counts"]
    assert (counts["pending"] + counts["waiting"], counts["retrying"], counts["dead"]) == (2, 0, 1)
    assert status["blocked_keys"][0]["key"] == "k" and status["blocked_keys"][0]["waiting"] == 2
    listed = json.loads(cli(worker_env, "dead", "list", "--topic", topic, "--json").stdout)
    assert [d["key"] for d in listed] == ["k"]
    assert worker.proc.poll() is None

    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    resource.add_incremental_config(
        ConfigEntry("max.message.bytes", "100000", incremental_operation=AlterConfigOpType.SET)
    )
    kafka_admin.incremental_alter_configs([resource])[resource].result(30)
    out = cli(worker_env, "dead", "retry", "--key", "k")
    assert out.returncode == 0 and "retried 1" in out.stdout, out.stderr

    values = [json.loads(m.value())["n"] for m in reader.read(5, timeout=60)]
    assert values == [0, "other key", 1, 2, 3]
    wait_for(lambda: rows(db_url) == [], 30, "every row to be deleted")


def test_a_worker_killed_mid_batch_loses_nothing(start_worker, db_url, topic, kafka_reader):
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        ids = [publish(cur, topic, {"n": i}, key=f"k{i % 50}") for i in range(20000)]
    c.close()
    worker = start_worker(concurrency=2, OUTBOX_BRIDGE_BATCH_SIZE="200")
    wait_for(lambda: len(rows(db_url)) < 19000, 60, "delivery to be under way")
    for pid in [*worker.children(), worker.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    assert worker.proc.wait(10) == -signal.SIGKILL  # it was killed, not stopped
    assert rows(db_url), "the worker was killed too late to test anything"
    start_worker(concurrency=2)
    # duplicates allowed, loss not
    kafka_reader(topic).read_message_ids({str(i) for i in ids}, timeout=180)
    wait_for(lambda: rows(db_url) == [], 60, "every row to be deleted")


@pytest.mark.services
def test_watcher_survives_a_postgres_restart_and_catches_up(
    start_worker, db_url, topic, kafka_reader, native_services
):
    worker = start_worker()
    reader = kafka_reader(topic)
    commit(db_url, topic, [{"n": 0}])
    reader.read(1, timeout=60)
    native_services.down("postgres")  # checked: its port refuses connections
    native_services.up("postgres")
    # committed as soon as PostgreSQL is back, likely before the watcher reconnected
    commit(db_url, topic, [{"n": i} for i in range(1, 11)])
    reader.read(11, timeout=60)
    wait_for(lambda: "watcher lost PostgreSQL" in worker.log_tail(200), 10, "the reconnect log")
    # and it keeps listening afterwards
    commit(db_url, topic, [{"n": 11}])
    reader.read(12, timeout=60)


def test_rows_committed_while_no_watcher_runs_are_sent_when_it_starts(
    start_worker, db_url, topic, kafka_reader
):
    commit(db_url, topic, [{"n": i} for i in range(5)], key="k")
    start_worker()
    assert len(kafka_reader(topic).read(5, timeout=60)) == 5


def test_a_missed_wake_up_is_caught_by_the_fallback_timer(
    start_worker, db_url, topic, kafka_reader
):
    # no sequence reads and no NOTIFY trigger: only the fallback timer can find a row
    start_worker(OUTBOX_BRIDGE_POLL_INTERVAL="1", OUTBOX_BRIDGE_WAKE_POLL="0")
    # the watcher has looked (the flag went off at its first look), found nothing for
    # IDLE_AFTER and waits idle
    wait_for(lambda: watcher_idle(db_url), 30, "the watcher to be idle")
    commit(db_url, topic, [{"n": 1}])
    assert len(kafka_reader(topic).read(1, timeout=10)) == 1


def test_rows_committed_out_of_id_order_are_all_delivered(
    start_worker, db_url, topic, kafka_reader
):
    start_worker()
    early = psycopg2.connect(db_url)
    late = psycopg2.connect(db_url)
    cur_early = early.cursor()
    publish(cur_early, topic, {"n": "lower id, committed last"})
    with late, late.cursor() as cur:
        publish(cur, topic, {"n": "higher id, committed first"})
    reader = kafka_reader(topic)
    reader.read(1, timeout=60)
    early.commit()
    values = sorted(json.loads(m.value())["n"] for m in reader.read(2, timeout=60))
    assert values == ["higher id, committed first", "lower id, committed last"]
    early.close()
    late.close()


@pytest.mark.services
def test_a_rabbitmq_restart_loses_nothing(
    start_worker, db_url, topic, kafka_reader, native_services
):
    worker = start_worker()
    reader = kafka_reader(topic)
    commit(db_url, topic, [{"n": 0}])
    reader.read(1, timeout=60)
    native_services.down("rabbitmq")  # checked: its port refuses connections
    try:
        # committed while the Celery broker is away: PostgreSQL keeps them
        ids = commit(db_url, topic, [{"n": i} for i in range(1, 21)], key="k")
        # and the worker noticed that its broker was gone
        wait_for(
            lambda: "Connection to broker lost" in worker.log_path.read_text(),
            30,
            "the worker to lose RabbitMQ",
        )
    finally:
        native_services.up("rabbitmq")
    reader.read_message_ids({str(i) for i in ids}, timeout=120)
    wait_for(lambda: rows(db_url) == [], 60, "every row to be deleted")


def test_two_dispatchers_one_elected_hand_over_under_traffic_and_deliver_each_row_once(
    start_worker, worker_env, db_url, topic, kafka_reader, tmp_path
):
    start_worker(args=("--without-outbox-watcher",))
    logs = [tmp_path / f"watcher-{i}.log" for i in range(2)]
    watchers = []
    for log in logs:
        with open(log, "wb") as out:
            watchers.append(
                subprocess.Popen(
                    ["outbox-bridge", "watch"], env=worker_env, cwd=ROOT, stdout=out, stderr=out
                )
            )
    try:
        for log in logs:  # both stand before the first commit
            wait_for(lambda log=log: b"standing by" in log.read_bytes(), 30, "a dispatcher")
        wait_for(
            lambda: sum(b"dispatcher elected" in log.read_bytes() for log in logs) == 1,
            30,
            "one of them to be elected",
        )
        leader = next(i for i, log in enumerate(logs) if b"elected" in log.read_bytes())
        ids = []
        for start in range(0, 2000, 100):
            if start == 1000:  # half way: the leader dies, the other takes over
                watchers[leader].kill()
                watchers[leader].wait(10)
            ids += commit(
                db_url, topic, [{"n": i} for i in range(start, start + 100)], key=f"k{start % 7}"
            )
        reader = kafka_reader(topic)
        reader.read_message_ids({str(i) for i in ids}, timeout=120)
        reader.drain(quiet=2)
        assert len(reader.messages) == len(ids)  # no duplicates: one owner per shard
        assert b"dispatcher elected" in logs[1 - leader].read_bytes()
        assert watchers[1 - leader].poll() is None  # the standby dispatched to the end
    finally:
        for w in watchers:
            w.terminate()
            w.wait(20)
