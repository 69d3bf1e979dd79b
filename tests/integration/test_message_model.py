"""Delayed, expiring and reply messages against a real PostgreSQL: what publish() and
``Message.reply`` write, what they refuse, and how due messages join the outbox (the
dispatcher's ``MoveDue``)."""

import json
import uuid
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest

from outbox_bridge import (
    InvalidHeaders,
    InvalidTime,
    InvalidTopic,
    Message,
    NoReplyTo,
    publish,
    send,
)
from outbox_bridge.config import get_settings
from outbox_bridge.worker.maintenance import MoveDue
from tests.conftest import query, rows, wait_for

pytestmark = pytest.mark.postgres

UTC = timezone.utc


def scheduled(url: str) -> list[tuple]:
    return query(
        url,
        "SELECT id, message_id::text, topic, convert_from(key, 'UTF8'), deliver_at"
        " FROM outbox_bridge.scheduled ORDER BY deliver_at, id",
    )


def queued(url: str) -> list[str]:
    """Message ids of the outbox rows, in id order."""
    return [
        r[0] for r in query(url, "SELECT message_id::text FROM outbox_bridge.outbox ORDER BY id")
    ]


def test_a_delayed_message_waits_out_of_the_outbox_with_an_id_from_its_sequence(conn, db_url):
    with conn, conn.cursor() as cur:
        before = publish(cur, "orders", {"n": 0}, key="k")
        later = datetime.now(UTC) + timedelta(minutes=5)
        delayed = publish(cur, "orders", {"n": 1}, key="k", deliver_at=later)
        by_delay = publish(cur, "orders", {"n": 2}, key="k", delay=timedelta(seconds=30))
        after = publish(cur, "orders", {"n": 3}, key="k")
    waiting = scheduled(db_url)
    assert [r[1] for r in waiting] == [str(by_delay), str(delayed)]
    assert abs((waiting[1][4] - later).total_seconds()) < 0.001
    assert queued(db_url) == [str(before), str(after)]
    ids = query(db_url, "SELECT id FROM outbox_bridge.outbox ORDER BY id")
    # one sequence: the ids interleave in publish order
    assert ids[0][0] < waiting[1][0] < waiting[0][0] < ids[1][0]


def test_send_delays_and_expires_too(db_url):
    message_id = send("orders", {"n": 1}, key="k", delay=60, ttl=timedelta(minutes=2))
    (row,) = scheduled(db_url)
    assert row[1] == str(message_id)
    (headers,) = query(db_url, "SELECT headers FROM outbox_bridge.scheduled")[0]
    expires = datetime.fromisoformat(dict(headers)["expires_at"].replace("Z", "+00:00"))
    assert abs((expires - row[4]).total_seconds() - 120) < 0.01  # the ttl counts from delivery


def test_a_delivery_time_just_past_or_a_zero_delay_is_an_ordinary_message(conn, db_url):
    with conn, conn.cursor() as cur:
        publish(cur, "orders", {"n": 1}, deliver_at=datetime.now(UTC) - timedelta(seconds=30))
        publish(cur, "orders", {"n": 2}, delay=0)
    assert scheduled(db_url) == []
    assert len(rows(db_url)) == 2


def test_the_expiry_is_a_header_in_iso_8601_utc(conn, db_url):
    at = datetime(2099, 1, 2, 3, 4, 5, 678000, tzinfo=timezone(timedelta(hours=2)))
    with conn, conn.cursor() as cur:
        publish(cur, "orders", {"n": 1}, headers={"type": "A"}, expires_at=at)
    (headers,) = query(db_url, "SELECT headers FROM outbox_bridge.outbox")[0]
    assert headers == [["type", "A"], ["expires_at", "2099-01-02T01:04:05.678Z"]]


def _now():
    return datetime.now(UTC)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"deliver_at": datetime.now() + timedelta(hours=1)}, InvalidTime, "no time zone"),
        ({"expires_at": datetime.now() + timedelta(hours=1)}, InvalidTime, "no time zone"),
        ({"deliver_at": "tomorrow"}, InvalidTime, "must be a datetime"),
        ({"deliver_at": _now() - timedelta(minutes=5)}, InvalidTime, "in the past"),
        ({"delay": -1}, InvalidTime, "zero or more seconds"),
        ({"delay": timedelta(seconds=-5)}, InvalidTime, "zero or more seconds"),
        ({"delay": float("nan")}, InvalidTime, "zero or more seconds"),
        ({"delay": True}, InvalidTime, "timedelta or seconds"),
        ({"delay": 5, "deliver_at": _now()}, InvalidTime, "not both"),
        ({"ttl": 0}, InvalidTime, "more than zero"),
        ({"ttl": -3}, InvalidTime, "zero or more"),
        ({"ttl": 5, "expires_at": _now() + timedelta(hours=1)}, InvalidTime, "not both"),
        ({"expires_at": _now() - timedelta(seconds=1)}, InvalidTime, "not after now"),
        ({"delay": 60, "expires_at": _now() + timedelta(seconds=30)}, InvalidTime, "deliver_at"),
        ({"ttl": 5, "headers": {"expires_at": "2099-01-01T00:00:00Z"}}, InvalidHeaders, "not both"),
        ({"headers": {"expires_at": "soon"}}, InvalidHeaders, "ISO 8601"),
    ],
)
def test_times_it_cannot_keep_are_refused_and_write_nothing(conn, db_url, kwargs, error, words):
    with conn, conn.cursor() as cur:
        with pytest.raises(error, match=words):
            publish(cur, "orders", {"n": 1}, **kwargs)
        publish(cur, "orders", {"n": 2})  # the caller's transaction goes on
    assert scheduled(db_url) == []
    assert len(rows(db_url)) == 1


def test_due_messages_join_the_outbox_in_due_order_with_new_ids(conn, db_url, monkeypatch):
    monkeypatch.setenv("OUTBOX_BRIDGE_POLL_INTERVAL", "30")
    from outbox_bridge.config import reset_settings

    reset_settings()
    soon = datetime.now(UTC) + timedelta(seconds=1)
    with conn, conn.cursor() as cur:
        second = publish(cur, "orders", {"n": "second"}, key="k", deliver_at=soon)
        first = publish(
            cur, "orders", {"n": "first"}, key="k", deliver_at=soon - timedelta(milliseconds=500)
        )
        third = publish(cur, "orders", {"n": "third"}, key="k", deliver_at=soon)
        never = publish(cur, "orders", {"n": "later"}, key="k", delay=3600)
        waited = publish(cur, "orders", {"n": "queued"}, key="k")
    job = MoveDue(get_settings())
    mover = psycopg2.connect(db_url)
    mover.autocommit = True
    try:
        with mover.cursor() as cur:
            job.run_once(cur)
            assert job.take_moved() == 0
            assert 0 < job.interval <= 1.0  # its timer: the next due message
            wait_for(lambda: datetime.now(UTC) > soon, 5, "the first due time")
            job.run_once(cur)
            assert job.take_moved() == 3
            assert job.interval == 30  # the next is due in an hour: poll_interval, at most
    finally:
        mover.close()
    assert [r[1] for r in scheduled(db_url)] == [str(never)]
    # behind what the key had queued, in due order (same time: publish order)
    assert queued(db_url) == [str(waited), str(first), str(second), str(third)]
    values = query(
        db_url, "SELECT convert_from(value, 'UTF8') FROM outbox_bridge.outbox ORDER BY id"
    )
    assert [json.loads(v[0])["n"] for v in values] == ["queued", "first", "second", "third"]
    reset_settings()


def test_a_request_names_its_reply_topic_in_a_header(conn, db_url):
    with conn, conn.cursor() as cur:
        publish(cur, "orders", {"n": 1}, key="k", reply_to="order-replies")
    (headers,) = query(db_url, "SELECT headers FROM outbox_bridge.outbox")[0]
    assert headers == [["reply_to", "order-replies"]]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"reply_to": "bad topic"}, InvalidTopic, "reply_to: illegal Kafka topic name"),
        ({"reply_to": ""}, InvalidTopic, "reply_to: topic must be a non-empty string"),
        ({"reply_to": "r", "headers": {"reply_to": "s"}}, InvalidHeaders, "not both"),
    ],
)
def test_a_reply_topic_it_cannot_use_is_refused(conn, db_url, kwargs, error, words):
    with conn, conn.cursor() as cur, pytest.raises(error, match=words):
        publish(cur, "orders", {"n": 1}, **kwargs)
    assert rows(db_url) == []


def test_a_reply_goes_to_the_reply_topic_with_the_key_and_the_correlation_id(conn, db_url):
    request = Message(uuid.uuid4(), "orders", b"order-7", {}, [("reply_to", b"replies")])
    with conn, conn.cursor() as cur:
        reply_id = request.reply(cur, {"ok": True}, headers={"type": "Paid"}, ttl=60)
    ((message_id, topic, key, headers),) = query(
        db_url,
        "SELECT message_id, topic, convert_from(key, 'UTF8'), headers FROM outbox_bridge.outbox",
    )
    assert (str(message_id), topic, key) == (str(reply_id), "replies", "order-7")
    assert headers[:2] == [["type", "Paid"], ["correlation_id", str(request.message_id)]]
    assert headers[2][0] == "expires_at"  # publish()'s own options apply


def test_a_reply_to_a_message_without_reply_to_is_a_clear_error(conn, db_url):
    request = Message(uuid.uuid4(), "orders", None, {})
    with conn, conn.cursor() as cur:
        with pytest.raises(NoReplyTo, match="has no 'reply_to' header"):
            request.reply(cur, {"ok": True})
        with pytest.raises(InvalidHeaders, match="set by reply"):
            Message(uuid.uuid4(), "o", None, {}, [("reply_to", b"r")]).reply(
                cur, {}, headers=[("correlation_id", "x")]
            )
        cur.execute("SELECT 1")  # the transaction is still usable
    assert rows(db_url) == []


@pytest.fixture
def cloudevents_mode(monkeypatch):
    monkeypatch.setenv("OUTBOX_BRIDGE_CLOUDEVENTS_SOURCE", "/shop/orders")
    from outbox_bridge.config import reset_settings

    reset_settings()
    yield
    monkeypatch.delenv("OUTBOX_BRIDGE_CLOUDEVENTS_SOURCE")
    reset_settings()


def _headers(url: str) -> list:
    return [r[0] for r in query(url, "SELECT headers FROM outbox_bridge.outbox ORDER BY id")]


def test_in_cloudevents_mode_every_message_carries_the_attributes(conn, db_url, cloudevents_mode):
    with conn, conn.cursor() as cur:
        first = publish(cur, "orders", {"n": 1}, type="OrderCreated", headers={"x": "y"})
        publish(cur, "orders", b"\x00", headers={"type": "Raw", "ce_subject": "order-7"})
        publish(cur, "orders", {"n": 3}, type="T", headers={"content-type": "application/x+json"})
    one, two, three = _headers(db_url)
    attributes = {n: v for n, v in one}
    assert attributes["x"] == "y" and "type" not in attributes  # type= is ce_type only
    assert {k: v for k, v in attributes.items() if k != "ce_time"} == {
        "x": "y",
        "ce_specversion": "1.0",
        "ce_id": str(first),
        "ce_source": "/shop/orders",
        "ce_type": "OrderCreated",
        "content-type": "application/json",
    }
    assert datetime.fromisoformat(attributes["ce_time"].replace("Z", "+00:00")).tzinfo
    two = dict((n, v) for n, v in two)
    assert (two["type"], two["ce_type"], two["ce_subject"]) == ("Raw", "Raw", "order-7")
    assert two["content-type"] == "application/octet-stream"
    assert [v for n, v in three if n == "content-type"] == ["application/x+json"]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({}, "needs each message's type"),
        ({"type": "A", "headers": {"ce_id": "mine"}}, "'ce_id' is set by outbox-bridge"),
        ({"type": "A", "headers": {"type": "B"}}, "not both"),
        ({"type": ""}, "non-empty string"),
    ],
)
def test_a_cloudevent_it_cannot_make_is_refused(conn, db_url, cloudevents_mode, kwargs, words):
    with conn, conn.cursor() as cur, pytest.raises(InvalidHeaders, match=words):
        publish(cur, "orders", {"n": 1}, **kwargs)
    assert rows(db_url) == []


def test_outside_cloudevents_mode_type_is_a_header(conn, db_url):
    with conn, conn.cursor() as cur:
        publish(cur, "orders", {"n": 1}, type="OrderCreated")
    assert _headers(db_url) == [[["type", "OrderCreated"]]]


def test_the_sdk_reads_what_the_relay_would_send_as_a_cloudevent(conn, db_url, cloudevents_mode):
    from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
    from cloudevents.core.formats.json import JSONFormat

    from outbox_bridge.message import kafka_headers

    with conn, conn.cursor() as cur:
        message_id = publish(cur, "orders", {"n": 1}, key="order-7", type="OrderCreated")
    (stored,) = _headers(db_url)
    sent = KafkaMessage(
        headers=dict(kafka_headers(stored, message_id)), key=b"order-7", value=b'{"n":1}'
    )
    event = from_binary(sent, JSONFormat())
    assert (event.get_id(), event.get_source(), event.get_type()) == (
        str(message_id),
        "/shop/orders",
        "OrderCreated",
    )
    assert event.get_data() == {"n": 1}


def test_a_cloudevent_id_is_the_message_id_when_it_is_a_uuid_else_derived():
    from outbox_bridge.message import cloudevent_id

    same = uuid.uuid4()
    assert cloudevent_id("/a", str(same)) == same
    assert cloudevent_id("/a", "evt-1") == cloudevent_id("/a", "evt-1")
    assert cloudevent_id("/a", "evt-1") != cloudevent_id("/b", "evt-1")
    message = Message(
        same,
        "t",
        None,
        {},
        [("ce_specversion", b"1.0"), ("ce_type", b"T"), ("content-type", b"application/json")],
    )
    assert message.cloudevent == {
        "specversion": "1.0",
        "type": "T",
        "datacontenttype": "application/json",
    }
    assert Message(same, "t", None, {}).cloudevent is None
