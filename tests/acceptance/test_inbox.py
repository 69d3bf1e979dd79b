"""The inbox end to end: Kafka -> inbox -> @outbox_handler tasks in
`celery -A outbox_bridge worker` subprocesses, against the real services."""

import json
import os
import signal
import uuid
from collections import defaultdict

import psycopg2
import pytest

from outbox_bridge import publish
from tests.conftest import create_topic, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]


def _id_header(message_id):
    return [("message_id", str(message_id).encode())]


def test_publish_to_handler_end_to_end_exactly_once(inbox, db_url, topic):
    inbox.start()
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:  # the sending service's transaction
        ids = [publish(cur, topic, {"k": "a", "seq": i}, key="a") for i in range(5)]
    c.close()
    wait_for(lambda: len(inbox.effects()) == 5, 60, "the handler's writes")
    assert [r[0] for r in inbox.effects()] == ids
    wait_for(lambda: len(inbox.effects("switchable")) == 5, 30, "the second handler")
    states = inbox.query(
        "SELECT handler, state, count(*) FROM outbox_bridge.deliveries GROUP BY 1, 2 ORDER BY 1"
    )
    assert set(states) == {
        ("outbox.tests.switchable", "done", 5),
        (f"outbox.{topic}.record", "done", 5),
    }
    status = json.loads(inbox.cli("status", "--json").stdout)["inbox"]
    assert status["handlers"][f"outbox.{topic}.record"]["counts"]["done"] == 5
    lag = wait_for(
        lambda: (
            (s := json.loads(inbox.cli("status", "--json").stdout)["inbox"]["consumer_lag"])
            and sum(p["end"] for p in s) == 5
            and s
        ),
        30,
        "the consumer lag report",
    )
    # every topic a registered handler consumes: this test's and the slow handler's
    assert {p["topic"] for p in lag} == {topic, topic + "-slow"}
    assert sum(p["lag"] for p in lag) == 0


def test_the_same_message_twice_runs_each_handler_once(inbox, topic, kafka_admin):
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    worker = inbox.start()
    message_id = uuid.uuid4()
    body = json.dumps({"k": "a", "seq": 1}).encode()
    inbox.produce([(b"a", body, _id_header(message_id))] * 2)  # re-produced, same id
    wait_for(lambda: len(inbox.effects()) == 1, 60, "the handler")
    # a consumer restart before its offset commit: rewind the group, consume again
    worker.stop()
    group = worker.env["OUTBOX_BRIDGE_CONSUMER_GROUP"]
    meta = kafka_admin.list_topics(topic, timeout=10).topics[topic]
    rewind = [TopicPartition(topic, p, 0) for p in meta.partitions]
    futures = kafka_admin.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, rewind)]
    )
    futures[group].result(30)
    inbox.produce([(b"a", json.dumps({"k": "a", "seq": 2}).encode(), None)])
    inbox.start()
    wait_for(lambda: len(inbox.effects()) == 2, 60, "the message after the rewind")
    wait_for(lambda: len(inbox.effects("switchable")) == 2, 30, "the other handler")
    assert [r[2] for r in inbox.effects()] == [1, 2]
    assert [r[2] for r in inbox.effects("switchable")] == [1, 2]
    assert inbox.query("SELECT count(*) FROM outbox_bridge.inbox") == [(2,)]


def test_one_handler_dead_the_other_done_and_dead_retry_reruns_only_the_failed(inbox, topic):
    inbox.query("INSERT INTO switches VALUES ('broken', true) RETURNING name")
    inbox.start()
    inbox.produce([(b"a", json.dumps({"k": "a", "seq": 1}).encode(), None)])
    wait_for(lambda: len(inbox.effects()) == 1, 60, "the healthy handler")
    dead = wait_for(
        lambda: inbox.query(
            "SELECT handler, attempts, last_error FROM outbox_bridge.deliveries"
            " WHERE state = 'dead'"
        ),
        60,
        "the failing handler's delivery to be dead",
    )
    assert dead == [("outbox.tests.switchable", 3, "RuntimeError: the switch 'broken' is on")]
    listed = json.loads(inbox.cli("dead", "list", "--json").stdout)
    assert [(d["queue"], d["key"]) for d in listed] == [("outbox.tests.switchable", "a")]

    inbox.query("UPDATE switches SET on_ = false RETURNING name")
    out = inbox.cli("dead", "retry", "--handler", "outbox.tests.switchable")
    assert "retried 1" in out.stdout, out.stderr
    wait_for(lambda: len(inbox.effects("switchable")) == 1, 60, "the re-run")
    assert len(inbox.effects()) == 1  # the healthy handler did not run again


def test_per_key_order_per_handler_with_four_processes_and_failures(inbox, topic):
    keys, per_key = 20, 25
    inbox.start(concurrency=4, OUTBOX_BRIDGE_BATCH_SIZE="20")
    messages = []
    for seq in range(per_key):
        for k in range(keys):
            value = {"k": str(k), "seq": seq, "fail": (seq * 5 + k) % 11 == 0}
            messages.append((str(k).encode(), json.dumps(value).encode(), None))
    inbox.produce(messages)
    for handler in ("record", "switchable"):
        wait_for(
            lambda h=handler: len(inbox.effects(h)) >= keys * per_key,
            180,
            f"every message handled by {handler}",
        )
    # the faults did happen: deliveries of "record" failed and were retried
    assert inbox.query("SELECT count(*) FROM outbox_bridge.deliveries WHERE attempts > 0")[0][0]
    for handler in ("record", "switchable"):
        seen = defaultdict(list)
        for _mid, k, seq in inbox.effects(handler):
            seen[k].append(seq)
        for k in range(keys):
            assert seen[str(k)] == list(range(per_key)), f"{handler} key {k} out of order"


def test_a_worker_killed_inside_a_handler_reruns_it_after_the_lease_once(inbox, topic):
    worker = inbox.start(concurrency=1)
    inbox.produce([(b"a", json.dumps({"k": "a", "seq": 1, "sleep": 6}).encode(), None)])
    wait_for(lambda: inbox.query("SELECT 1 FROM started"), 60, "the handler to start")
    for pid in [*worker.children(), worker.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    worker.proc.wait(10)
    assert inbox.effects() == []
    inbox.query("DELETE FROM started RETURNING 1")
    # after the lease (5 s here) the delivery runs again, sleeps again, and commits once
    inbox.start(concurrency=1)
    wait_for(lambda: len(inbox.effects()) == 1, 90, "the re-run to commit")
    wait_for(lambda: len(inbox.effects("switchable")) == 1, 30, "the other handler")
    assert len(inbox.effects()) == 1


def test_undecodable_messages_become_dead_deliveries_and_the_consumer_goes_on(inbox, topic):
    inbox.start()
    inbox.produce(
        [
            (None, b"\xff not json", None),
            (None, json.dumps({"k": "x", "seq": 0}).encode(), [("message_id", b"\x00broken")]),
            (b"ok", json.dumps({"k": "ok", "seq": 1}).encode(), None),
        ]
    )
    wait_for(lambda: len(inbox.effects()) == 1, 60, "the good message after the bad ones")
    dead = wait_for(
        lambda: (
            (
                r := inbox.query(
                    "SELECT d.handler, d.last_error FROM outbox_bridge.deliveries d"
                    " WHERE d.state = 'dead' ORDER BY d.id"
                )
            )
            and len(r) == 4
            and r
        ),
        60,
        "four dead deliveries (two messages, two handlers)",
    )
    errors = sorted({e.split(":")[0] + ":" + e.split(":")[1] for _h, e in dead})
    assert errors == [
        "broken headers: message_id is not a UUID",
        "cannot decode the value: not JSON",
    ]
    assert inbox.effects()[0][1:] == ("ok", 1)


def test_a_handler_that_publishes_chains_the_message_once(inbox, topic, kafka_reader):
    inbox.start()
    inbox.produce([(b"c", json.dumps({"k": "c", "seq": 1, "chain": True}).encode(), None)])
    reader = kafka_reader(inbox.topic_chained)
    (msg,) = reader.read(1, timeout=60)
    assert msg.key() == b"c"
    assert len(reader.drain(quiet=3)) == 1
    assert len(inbox.effects()) == 1


def test_a_handler_with_a_sqlalchemy_session_writes_once_and_chains(
    inbox, topic, kafka_admin, kafka_reader
):
    """@outbox_handler(..., session=sessionmaker()): the handler gets a Session bound to
    the delivery's transaction; a failed attempt's ORM writes are undone, the retry's
    commit with "done", and publish(session, ...) chains in the same transaction."""
    orm_topic = topic + "-orm"
    create_topic(kafka_admin, orm_topic, 2)
    inbox.start(TEST_ORM_TOPIC=orm_topic)
    values = [{"k": k, "seq": s} for k in "ab" for s in range(3)]
    values[1]["fail_first"] = True
    values[4]["chain"] = True
    inbox.produce(
        [(v["k"].encode(), json.dumps(v).encode(), None) for v in values], topic=orm_topic
    )
    wait_for(
        lambda: (
            inbox.query(
                "SELECT count(*) FROM outbox_bridge.deliveries"
                " WHERE handler = 'outbox.tests.orm' AND state = 'done'"
            )[0][0]
            == 6
        ),
        60,
        "six deliveries done",
    )
    assert len(inbox.query("SELECT * FROM failures")) == 1  # the first attempt did fail
    assert sorted(inbox.query("SELECT k, seq FROM orm_effects")) == sorted(
        (v["k"], v["seq"]) for v in values
    )  # each write once: the failed attempt's was rolled back
    reader = kafka_reader(inbox.topic_chained)
    (msg,) = reader.read(1, timeout=60)
    assert msg.key() == b"b"
    assert len(reader.drain(quiet=3)) == 1
