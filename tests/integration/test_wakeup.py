"""The watcher's wake-up (reads of the outbox id sequence) and the inbox consumer's
batches, against real PostgreSQL and Kafka."""

import time
import uuid

import psycopg2
import pytest
from confluent_kafka import Consumer, Producer

from outbox_bridge import publish
from outbox_bridge.config import get_settings
from outbox_bridge.inbox.consumer import consume_batch
from outbox_bridge.worker.dispatcher import SequenceWatch

pytestmark = pytest.mark.postgres


def test_the_sequence_says_look_until_the_writer_that_moved_it_has_ended(db_url, conn):
    watcher = psycopg2.connect(db_url)
    watcher.autocommit = True
    cur = watcher.cursor()
    watch = SequenceWatch(cur, get_settings().schema)
    assert watch.moved(cur) is True  # its first read: look
    assert watch.moved(cur) is True  # and once more after asking who ran then
    assert watch.moved(cur) is False  # nothing written since
    writer = conn.cursor()
    publish(writer, "t", 1)  # takes an id; not committed yet
    assert watch.moved(cur) is True  # the move
    assert watch.moved(cur) is True  # the writer still runs: its row may show any time
    assert watch.moved(cur) is True
    conn.commit()
    assert watch.moved(cur) is True  # one last look, after the writer ended
    assert watch.moved(cur) is False
    conn.rollback()
    publish(writer, "t", 2)
    conn.rollback()  # a rolled-back id moved it too: a look, one more, then quiet
    assert watch.moved(cur) is True
    assert watch.moved(cur) is True
    assert watch.moved(cur) is False
    watcher.close()


@pytest.mark.kafka
def test_a_consumer_batch_comes_as_soon_as_there_is_a_message(services, topic):
    """``consume(n, timeout)`` waits for n messages or the timeout; the inbox's batch
    must not: one message is there, and it comes well before a 60 s timeout."""
    servers = services["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"]
    consumer = Consumer(
        {
            "bootstrap.servers": servers,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    producer = Producer({"bootstrap.servers": servers})
    producer.produce(topic, b"one")
    assert producer.flush(30) == 0
    started = time.monotonic()
    batch = consume_batch(consumer, 2000, timeout=60)
    assert [m.value() for m in batch] == [b"one"]
    assert time.monotonic() - started < 30  # not the timeout: the message ended the wait
    consumer.close()
