"""Delayed, expiring and reply messages end to end (the saga example too): real
PostgreSQL, Kafka, RabbitMQ and `celery -A outbox_bridge worker` subprocesses."""

import importlib
import json
import math
import subprocess
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg2
import pytest

from outbox_bridge import publish
from outbox_bridge.config import reset_settings
from tests.conftest import ROOT, create_topic, query, wait_for, watcher_idle
from tests.observe_app import DEAD_TABLE

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]

UTC = timezone.utc


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["outbox-bridge", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def in_tx(db_url: str, *messages: tuple) -> list[uuid.UUID]:
    """Publish (topic, value, kwargs) messages in one transaction."""
    c = psycopg2.connect(db_url)
    try:
        with c, c.cursor() as cur:
            return [publish(cur, topic, value, **kwargs) for topic, value, kwargs in messages]
    finally:
        c.close()


def header(message, name: str) -> str | None:
    found = dict(message.headers() or [])
    return found[name].decode() if found.get(name) is not None else None


def ms(when: datetime) -> int:
    return math.floor(when.timestamp() * 1000)


def dead_seen(url: str) -> list[tuple]:
    return query(url, "SELECT queue, message_id::text, last_error FROM dead_seen ORDER BY id")


@pytest.mark.parametrize("wake", ["poll", "notify"])
def test_a_delayed_message_goes_at_its_time_and_does_not_hold_its_key(
    start_worker, worker_env, db_url, topic, kafka_reader, wake, monkeypatch
):
    monkeypatch.setenv("OUTBOX_BRIDGE_WAKE", wake)  # this process's publish() too
    reset_settings()
    # the safety net is ten minutes away: what sends it in time is the dispatcher's timer
    start_worker(OUTBOX_BRIDGE_POLL_INTERVAL="600", OUTBOX_BRIDGE_WAKE=wake)
    if wake == "notify":
        wait_for(lambda: watcher_idle(db_url), 60, "the dispatcher to go idle")
    reader = kafka_reader(topic)
    (delayed,) = in_tx(db_url, (topic, {"n": "delayed"}, {"key": "k", "delay": 4}))
    ((deliver_at,),) = query(db_url, "SELECT deliver_at FROM outbox_bridge.scheduled")
    (plain,) = in_tx(db_url, (topic, {"n": "plain"}, {"key": "k"}))

    first = reader.read(1, timeout=30)[0]
    assert header(first, "message_id") == str(plain)  # its key was not held
    status = json.loads(cli(worker_env, "status", "--json", "--no-kafka").stdout)["outbox"]
    assert status["counts"]["scheduled"] == 1 and status["next_due_seconds"] > 0

    second = reader.read(2, timeout=60)[1]
    assert header(second, "message_id") == str(delayed)
    assert second.timestamp()[1] >= ms(deliver_at)  # no earlier than its time
    assert query(db_url, "SELECT count(*) FROM outbox_bridge.scheduled") == [(0,)]
    wait_for(
        lambda: query(db_url, "SELECT count(*) FROM outbox_bridge.outbox") == [(0,)],
        30,
        "the outbox to be empty",
    )
    assert len(reader.drain(quiet=2)) == 2


def test_delayed_messages_go_in_due_order_and_one_due_time_keeps_publish_order(
    start_worker, db_url, topic, kafka_reader
):
    start_worker()
    base = datetime.now(UTC) + timedelta(seconds=3)
    together = [(topic, {"n": i}, {"key": "same", "deliver_at": base}) for i in range(30)]
    ids = in_tx(db_url, *together)
    # published first, due last: it goes last
    late, early = in_tx(
        db_url,
        (topic, {"n": "late"}, {"key": "two", "deliver_at": base + timedelta(seconds=1)}),
        (topic, {"n": "early"}, {"key": "two", "deliver_at": base}),
    )
    messages = kafka_reader(topic).read(32, timeout=60)
    by_key: dict[bytes, list[str]] = {}
    for m in messages:
        by_key.setdefault(m.key(), []).append(header(m, "message_id"))
    assert by_key[b"same"] == [str(i) for i in ids]
    assert by_key[b"two"] == [str(early), str(late)]
    for m in messages:
        due = base + timedelta(seconds=1) if header(m, "message_id") == str(late) else base
        assert m.timestamp()[1] >= ms(due)


def test_a_message_past_its_expiry_is_not_sent_is_dead_as_expired_and_holds_no_key(
    start_worker, worker_env, db_url, topic, kafka_reader
):
    query(db_url, DEAD_TABLE)
    expired, after, lasting = in_tx(
        db_url,
        (topic, {"n": "expires"}, {"key": "k", "ttl": 1}),
        (topic, {"n": "after"}, {"key": "k"}),
        (topic, {"n": "lasting"}, {"key": "k", "ttl": timedelta(hours=1)}),
    )
    ((expires_at,),) = query(
        db_url,
        "SELECT h->>1 FROM outbox_bridge.outbox, jsonb_array_elements(headers) h"
        " WHERE message_id = %s AND h->>0 = 'expires_at'",
        (str(expired),),
    )
    # no worker yet: the message stays unsent past its expiry
    wait_for(
        lambda: datetime.now(UTC) > datetime.fromisoformat(expires_at.replace("Z", "+00:00")),
        10,
        "the expiry to pass",
    )
    start_worker(OUTBOX_BRIDGE_DEAD_HOOK="tests.observe_app.record_dead")
    reader = kafka_reader(topic)
    got = reader.read(2, timeout=60)
    assert [header(m, "message_id") for m in got] == [str(after), str(lasting)]
    assert header(got[1], "expires_at") is not None  # other consumers can honour it
    assert len(reader.drain(quiet=2)) == 2  # the expired one never comes

    assert query(
        db_url, "SELECT message_id::text, state, last_error FROM outbox_bridge.outbox"
    ) == [(str(expired), "expired", "expired")]
    seen = wait_for(lambda: dead_seen(db_url), 30, "the dead hook")
    assert seen == [("outbox", str(expired), "expired")]
    listed = json.loads(cli(worker_env, "dead", "list", "--json").stdout)
    assert [(r["message_id"], r["state"]) for r in listed] == [(str(expired), "expired")]
    retried = cli(worker_env, "dead", "retry", "--json")
    assert json.loads(retried.stdout) == {"retried": 0}, retried.stderr  # its time has passed
    purged = cli(worker_env, "dead", "purge", "--id", str(expired), "--json")
    assert json.loads(purged.stdout) == {"purged": 1}
    assert query(db_url, "SELECT count(*) FROM outbox_bridge.outbox") == [(0,)]


def test_a_retrying_head_that_expires_releases_its_key(start_worker, db_url, topic, kafka_reader):
    start_worker(
        OUTBOX_BRIDGE_BEFORE_PRODUCE="tests.faults.fail_marked",
        OUTBOX_BRIDGE_MAX_RETRIES="100",
        OUTBOX_BRIDGE_RETRY_BACKOFF_MAX="1",
    )
    head, behind = in_tx(
        db_url,
        (topic, {"fail_always": True}, {"key": "k", "ttl": 5}),
        (topic, {"n": "behind"}, {"key": "k"}),
    )
    # the fault happened: the head failed and was retried while the other one waited
    wait_for(
        lambda: (
            query(
                db_url,
                "SELECT attempts >= 2 FROM outbox_bridge.outbox WHERE message_id = %s",
                (str(head),),
            )
            == [(True,)]
        ),
        30,
        "the head to be retried",
    )
    assert query(
        db_url, "SELECT state FROM outbox_bridge.outbox WHERE message_id = %s", (str(behind),)
    ) in ([("waiting",)], [("pending",)])
    (m,) = kafka_reader(topic).read(1, timeout=60)
    assert header(m, "message_id") == str(behind)
    ((state, error, expires),) = query(
        db_url,
        "SELECT state, last_error, (SELECT h->>1 FROM jsonb_array_elements(headers) h"
        " WHERE h->>0 = 'expires_at') FROM outbox_bridge.outbox",
    )
    assert (state, error) == ("expired", "expired")
    # it waited for its head: it went once the head had expired
    assert m.timestamp()[1] >= ms(datetime.fromisoformat(expires.replace("Z", "+00:00")))


def test_a_delivery_past_its_expiry_is_not_handled_and_holds_no_key(inbox, topic):
    inbox.start()
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    ids = [uuid.uuid4() for _ in range(3)]

    def message(i, expires):
        headers = [("message_id", str(ids[i]).encode())]
        if expires:
            headers.append(("expires_at", expires.encode()))
        return (b"a", json.dumps({"k": "a", "seq": i}).encode(), headers)

    inbox.produce([message(0, past), message(1, None), message(2, future)])
    wait_for(lambda: len(inbox.effects()) == 2, 60, "the handler to handle the live ones")
    assert [r[0] for r in inbox.effects()] == ids[1:]
    found = wait_for(
        lambda: (
            (
                r := inbox.query(
                    "SELECT handler, state, last_error FROM outbox_bridge.deliveries"
                    " WHERE message_id = %s ORDER BY handler",
                    (str(ids[0]),),
                )
            )
            and all(s == "expired" for _h, s, _e in r)
            and r
        ),
        30,
        "the expired deliveries",
    )
    assert {h for h, _s, _e in found} == {"outbox.tests.switchable", f"outbox.{topic}.record"}
    assert {e for _h, _s, e in found} == {"expired"}
    listed = json.loads(inbox.cli("dead", "list", "--json").stdout)
    assert {(r["message_id"], r["state"]) for r in listed} == {(str(ids[0]), "expired")}


def test_the_saga_example_confirms_a_paid_order_and_cancels_a_declined_one(
    start_worker, db_url, topic, kafka_admin, kafka_reader, monkeypatch
):
    payments, replies = topic + "-payments", topic + "-replies"
    for name in (payments, replies):
        create_topic(kafka_admin, name)
    monkeypatch.setenv("SAGA_PAYMENTS_TOPIC", payments)
    monkeypatch.setenv("SAGA_REPLIES_TOPIC", replies)
    from outbox_bridge.inbox import handlers

    # this process only places orders: its handlers registry stays as it was
    monkeypatch.setattr(handlers, "REGISTRY", dict(handlers.REGISTRY))
    saga = importlib.reload(importlib.import_module("examples.saga"))
    query(db_url, saga.SCHEMA)
    start_worker(
        2,
        ("--include", "examples.saga"),
        SAGA_PAYMENTS_TOPIC=payments,
        SAGA_REPLIES_TOPIC=replies,
        OUTBOX_BRIDGE_CONSUMER_GROUP="test-" + uuid.uuid4().hex[:8],
    )
    c = psycopg2.connect(db_url)
    try:
        paid = saga.place_order(c, Decimal("9.90"))
        declined = saga.place_order(c, Decimal("250.00"))
    finally:
        c.close()

    def states():
        found = dict(query(db_url, "SELECT id, state FROM saga_orders"))
        return "awaiting payment" not in found.values() and found

    assert wait_for(states, 60, "both orders settled") == {paid: "confirmed", declined: "cancelled"}
    assert query(db_url, "SELECT order_id, accepted FROM saga_payments ORDER BY 1") == [
        (paid, True),
        (declined, False),
    ]
    requests = dict(query(db_url, "SELECT id, request::text FROM saga_orders"))
    got = kafka_reader(replies).read(2, timeout=30)
    by_order = {json.loads(m.value())["order"]: m for m in got}
    for order, m in by_order.items():  # the reply answers its request, with its key
        assert header(m, "correlation_id") == requests[order]
        assert m.key() == f"order-{order}".encode()


def _sdk_message(m):
    from cloudevents.core.bindings.kafka import KafkaMessage

    return KafkaMessage(headers=dict(m.headers() or []), key=m.key(), value=m.value())


def test_in_cloudevents_mode_kafka_has_cloudevents_the_sdk_reads(
    start_worker, db_url, topic, kafka_reader, monkeypatch
):
    from cloudevents.core.bindings.kafka import from_binary
    from cloudevents.core.formats.json import JSONFormat

    monkeypatch.setenv("OUTBOX_BRIDGE_CLOUDEVENTS_SOURCE", "/shop/orders")  # publish() reads it
    reset_settings()
    start_worker()
    (message_id,) = in_tx(db_url, (topic, {"n": 7}, {"key": "order-7", "type": "OrderCreated"}))
    (m,) = kafka_reader(topic).read(1, timeout=60)
    event = from_binary(_sdk_message(m), JSONFormat())
    attributes = event.get_attributes()
    assert {k: attributes[k] for k in ("specversion", "id", "source", "type")} == {
        "specversion": "1.0",
        "id": str(message_id),
        "source": "/shop/orders",
        "type": "OrderCreated",
    }
    assert attributes["datacontenttype"] == "application/json"
    assert abs((attributes["time"] - datetime.now(UTC)).total_seconds()) < 120
    assert event.get_data() == {"n": 7}
    assert header(m, "message_id") == str(message_id)  # still deduplicable the usual way


def test_cloudevents_from_another_producer_are_handled_once(inbox, topic):
    from cloudevents.core.bindings.kafka import to_binary
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    from outbox_bridge.message import cloudevent_id

    inbox.start()
    event = CloudEvent(
        attributes={"type": "com.example.OrderCreated", "source": "/other", "id": "evt-42"},
        data={"cloudevent": True, "seq": 1},
    )
    sent = to_binary(event, JSONFormat())
    copy = (b"order-42", sent.value, list(sent.headers.items()))
    assert "message_id" not in sent.headers
    inbox.produce([copy, copy])  # the same event twice, as a producer's retry would

    def both_read():  # the consumer committed past both copies
        lag = json.loads(inbox.cli("status", "--json").stdout)["inbox"]["consumer_lag"]
        mine = [p for p in lag if p["topic"] == topic]
        return sum(p["end"] for p in mine) == 2 and sum(p["lag"] for p in mine) == 0

    wait_for(lambda: len(inbox.effects()) >= 1, 60, "the handler to handle the event")
    wait_for(both_read, 60, "the consumer to read both copies")
    ((message_id, event_type, seq),) = inbox.effects()
    assert (str(message_id), event_type, seq) == (
        str(cloudevent_id("/other", "evt-42")),
        "com.example.OrderCreated",
        1,
    )
    assert inbox.query("SELECT count(*) FROM outbox_bridge.inbox") == [(1,)]
