"""Fixtures of the acceptance tests: the inbox's handler topics and tables."""

import subprocess
import uuid

import psycopg2
import pytest
from confluent_kafka import Producer

from tests.conftest import ROOT, create_topic


@pytest.fixture
def inbox(db_url, topic, worker_env, start_worker, services, kafka_admin):
    """Set up this test's handler topics and tables; returns helpers."""
    db_url_ = db_url
    from tests.handlers_app import SCHEMA

    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        cur.execute(SCHEMA)
    c.close()
    chained, slow, waits = topic + "-chained", topic + "-slow", topic + "-waits"
    for name in (chained, slow, waits):
        create_topic(kafka_admin, name)
    env = {
        "TEST_TOPIC": topic,
        "TEST_CHAINED_TOPIC": chained,
        "TEST_SLOW_TOPIC": slow,
        "OUTBOX_BRIDGE_CONSUMER_GROUP": "test-" + uuid.uuid4().hex[:8],
        "OUTBOX_BRIDGE_LEASE_SECONDS": "5",
    }
    worker_env.update(env)

    class Inbox:
        topic_chained = chained
        topic_waits = waits
        db_url = db_url_

        def start(self, concurrency=2, args_extra=(), include=(), **extra):
            args = ("--include", ",".join(("tests.handlers_app", *include)), *args_extra)
            return start_worker(concurrency, args, **extra)

        def query(self, sql, params=()):
            conn = psycopg2.connect(db_url)
            try:
                with conn, conn.cursor() as cur:
                    cur.execute(sql, params)
                    return cur.fetchall()
            finally:
                conn.close()

        def effects(self, handler="record"):
            return self.query(
                "SELECT message_id, k, seq FROM effects WHERE handler = %s ORDER BY at, seq",
                (handler,),
            )

        def produce(self, messages, topic=topic):
            """Produce (key, value bytes, headers) straight to the topic, like another service."""
            p = Producer({"bootstrap.servers": services["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"]})
            for key, value, headers in messages:
                p.produce(topic, key=key, value=value, headers=headers)
            assert p.flush(30) == 0

        def cli(self, *args):
            return subprocess.run(
                ["outbox-bridge", *args],
                env=worker_env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )

    return Inbox()
