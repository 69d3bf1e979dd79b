"""Property: every input that publish() accepts reaches Kafka byte for byte;
everything else raises an InvalidMessage subclass and leaves the caller's
transaction usable. Real PostgreSQL, Kafka and a `celery -A outbox_bridge worker`."""

from __future__ import annotations

import json

import psycopg2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from outbox_bridge import InvalidMessage, publish
from outbox_bridge.config import get_settings
from outbox_bridge.message import RECORD_OVERHEAD
from tests.conftest import rows, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]

# any code point, lone surrogates and NUL included
texts = st.text(st.characters(codec=None, min_codepoint=0), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)
keys = st.none() | texts | st.binary(max_size=40) | st.binary(min_size=1990, max_size=2010)
header_values = st.none() | texts | st.binary(max_size=20)
headers = st.none() | st.lists(st.tuples(texts, header_values), max_size=4)


def expected_record(key, value, hdrs):
    as_bytes = key.encode() if isinstance(key, str) else key
    data = (
        value
        if isinstance(value, bytes)
        else json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    )
    pairs = [(n, v.encode() if isinstance(v, str) else v) for n, v in hdrs or []]
    return as_bytes, data, pairs


def test_what_publish_accepts_reaches_kafka_byte_for_byte(
    db_url, topic, start_worker, kafka_reader
):
    accepted: dict[str, tuple] = {}
    refused: list[str] = []
    conn = psycopg2.connect(db_url)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(key=keys, value=json_values | st.binary(max_size=50), hdrs=headers)
    # the inputs that once aborted the caller's transaction or were sent as non-JSON
    @example(key=None, value=float("nan"), hdrs=None)
    @example(key="\ud800", value=1, hdrs=None)
    @example(key=b"k", value=1, hdrs=[("a\x00b", "v")])
    @example(key=b"k", value=1, hdrs=[("n", "\udc80")])
    @example(key=b"k", value=1, hdrs=[("n", "a\x00b")])
    def publish_one(key, value, hdrs):
        with conn.cursor() as cur:
            try:
                message_id = publish(cur, topic, value, key=key, headers=hdrs)
            except InvalidMessage as exc:
                refused.append(type(exc).__name__)
                cur.execute("SELECT 1")  # the caller's transaction is still usable
                return
        accepted[str(message_id)] = expected_record(key, value, hdrs)

    publish_one()
    # the largest value the limit allows also goes through librdkafka and the broker
    limit = get_settings().max_message_bytes
    with conn.cursor() as cur:
        big = b"x" * (limit - RECORD_OVERHEAD - len("message_id") - 36)
        accepted[str(publish(cur, topic, big))] = (None, big, [])
    conn.commit()
    conn.close()
    assert refused and len(accepted) > 50, (len(accepted), refused)

    start_worker()
    reader = kafka_reader(topic)
    reader.read_message_ids(set(accepted), timeout=120)
    for msg in reader.messages:
        hdrs = msg.headers() or []
        assert hdrs[0][0] == "message_id"
        key, value, pairs = accepted[hdrs[0][1].decode()]
        assert (msg.key(), msg.value(), hdrs[1:]) == (key, value, pairs)
    wait_for(lambda: rows(db_url) == [], 30, "every row to be deleted")
