"""Each real service answers, and a real Celery worker runs a task."""

import uuid

import pytest
from celery.contrib.testing.worker import start_worker

from outbox_bridge import app
from tests.conftest import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq]


def test_postgres_transaction_commits_and_rolls_back(conn):
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE smoke (v int)")
        cur.execute("INSERT INTO smoke VALUES (1)")
    with pytest.raises(RuntimeError), conn, conn.cursor() as cur:
        cur.execute("INSERT INTO smoke VALUES (2)")
        raise RuntimeError("roll back")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT array_agg(v) FROM smoke")
        assert cur.fetchone()[0] == [1]


def test_kafka_produce_and_consume_round_trip(services, topic, kafka_reader):
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": services["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"]})
    producer.produce(topic, key=b"k", value=b"hello", headers=[("h", b"1")])
    assert producer.flush(30) == 0
    (msg,) = kafka_reader(topic).read(1, timeout=30)
    assert (msg.key(), msg.value(), msg.headers()) == (b"k", b"hello", [("h", b"1")])


SEEN: list = []


@app.task(name="tests.smoke.echo")
def echo(value):
    SEEN.append(value)


def test_in_process_celery_worker_runs_a_task_over_rabbitmq(services, db_url, monkeypatch):
    queue = "smoke-" + uuid.uuid4().hex[:8]
    monkeypatch.setitem(app.conf, "broker_url", services["CELERY_BROKER_URL"])
    with start_worker(
        app,
        pool="solo",
        perform_ping_check=False,
        queues=[queue],
        # this process may have imported test handlers: no consumer for them here
        without_outbox_watcher=True,
        without_inbox_consumer=True,
        shutdown_timeout=30,
    ):
        echo.apply_async((queue,), queue=queue)
        wait_for(lambda: queue in SEEN, 30, "the task to run in the worker")


def test_celery_worker_subprocess_runs_a_task(start_worker, db_url, topic, kafka_reader):
    """`celery -A outbox_bridge worker` runs a publish task sent over RabbitMQ."""
    import psycopg2

    from outbox_bridge import publish

    worker = start_worker(concurrency=1, args=("--without-outbox-watcher",))
    token = str(uuid.uuid4())
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        publish(cur, topic, {"n": 1})
        cur.execute("UPDATE outbox_bridge.outbox SET shard = 0")
        cur.execute(
            "INSERT INTO outbox_bridge.claims (queue, shard, token, lease_until)"
            " VALUES ('outbox', 0, %s, now() + interval '1 minute')",
            (token,),
        )
    c.close()
    app.send_task(
        "outbox_bridge.outbox.publish", ([0], token), queue=worker.env["OUTBOX_BRIDGE_CELERY_QUEUE"]
    )
    (msg,) = kafka_reader(topic).read(1, timeout=30)
    assert msg.value() == b'{"n":1}'
