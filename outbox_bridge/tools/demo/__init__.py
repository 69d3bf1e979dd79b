"""``outbox-bridge demo``: a sample orders service publishing through the outbox."""

from __future__ import annotations

import time
from decimal import Decimal

import click
from confluent_kafka import Consumer, TopicPartition

from ...config import Settings, kafka_client
from ...db import connect
from ...ops import ensure_topics
from ...outbox.publish import publish
from ...queries import compose as q


def _kafka_total(settings: Settings, topic: str) -> int:
    """Messages in ``topic`` so far (sum of high watermarks); 0 if it does not exist yet."""
    consumer = Consumer(kafka_client(settings, **{"group.id": "outbox-bridge-demo"}))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.partitions
        )
    finally:
        consumer.close()


def run_demo(settings: Settings, count: int, topic: str, timeout: float = 120) -> int:
    """Write ``count`` orders, each with its outbox message, and wait until the demo
    handler has recorded a shipment for each. Returns how many are still missing."""
    ensure_topics(settings, [topic])
    before = _kafka_total(settings, topic)
    conn = connect(settings, name="outbox-bridge demo")
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE SCHEMA IF NOT EXISTS demo")
            cur.execute(
                "CREATE TABLE IF NOT EXISTS demo.orders (id bigserial PRIMARY KEY,"
                " customer text NOT NULL, total numeric NOT NULL)"
            )
            cur.execute(
                "CREATE TABLE IF NOT EXISTS demo.shipments (order_id bigint PRIMARY KEY,"
                " customer text NOT NULL, shipped_at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT coalesce(max(id), 0) FROM demo.orders")
            (first_order,) = cur.fetchone()
        click.echo(f"orders service: writing {count} orders, each with its outbox message")
        for i in range(count):
            with conn, conn.cursor() as cur:  # the order and its message: one transaction
                customer = f"customer-{i % 20}"
                total = Decimal(10 + i % 90) + Decimal("0.90")
                cur.execute(
                    "INSERT INTO demo.orders (customer, total) VALUES (%s, %s) RETURNING id",
                    (customer, total),
                )
                (order_id,) = cur.fetchone()
                publish(
                    cur,
                    topic,
                    {"order_id": order_id, "customer": customer, "total": str(total)},
                    key=customer,
                    headers={"type": "OrderCreated"},
                )
        deadline = time.monotonic() + timeout
        waiting = shipped = count
        while time.monotonic() < deadline:
            with conn, conn.cursor() as cur:
                cur.execute(
                    q("SELECT count(*) FROM {outbox} WHERE topic = %s", settings.schema), (topic,)
                )
                waiting = cur.fetchone()[0]
                cur.execute(
                    "SELECT count(*) FROM demo.shipments WHERE order_id > %s", (first_order,)
                )
                shipped = cur.fetchone()[0]
            click.echo(
                f"\r  in the outbox: {waiting:5d}   sent to Kafka: {count - waiting:5d}"
                f"   handled (shipped): {shipped:5d}",
                nl=False,
            )
            if waiting == 0 and shipped >= count:
                break
            time.sleep(0.2)
        click.echo()
    finally:
        conn.close()
    arrived = _kafka_total(settings, topic) - before
    click.echo(
        f"done: {count} orders written, {arrived} messages on Kafka topic {topic!r},"
        f" {shipped} shipments recorded by the handler outbox.{topic}.ship"
    )
    return count - min(shipped, count) + waiting
