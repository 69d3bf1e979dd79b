"""The relay fetches its next round while Kafka acknowledges the current one (issue 22),
against the real PostgreSQL and Kafka: the publish task run in this process on
claimed shards. The rows fetched ahead are used, every row goes out once, in key
order; after a round with a failure they are not used, and the key waits."""

from __future__ import annotations

from collections import defaultdict

import pytest

from outbox_bridge import publish as publish_message
from outbox_bridge.config import get_settings, reset_settings
from outbox_bridge.outbox import OutboxQueue
from outbox_bridge.outbox import tasks as outbox_tasks
from outbox_bridge.outbox.kafka import reset_relay
from outbox_bridge.outbox.tasks import outbox_queue
from outbox_bridge.tools.soak.reconcile import read_topic

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
def small_rounds(monkeypatch, db_url):
    monkeypatch.setenv("OUTBOX_BRIDGE_BATCH_SIZE", "40")
    monkeypatch.setenv("OUTBOX_BRIDGE_LINGER_MAX_SECONDS", "30")  # one task drains it all
    reset_settings()
    reset_relay()
    yield get_settings()
    reset_relay()
    reset_settings()


@pytest.fixture
def fetches(monkeypatch):
    """Every fetch of the relay: (during a round, ``exclude`` given; rows found)."""
    seen: list[tuple[bool, int]] = []
    original = OutboxQueue.fetch

    def spy(self, cur, shards, limit, max_bytes=2**62, skip_topics=(), exclude=()):
        rows, full = original(self, cur, shards, limit, max_bytes, skip_topics, exclude)
        seen.append((bool(exclude), len(rows)))
        return rows, full

    monkeypatch.setattr(OutboxQueue, "fetch", spy)
    return seen


def _drain(conn, settings) -> dict:
    queue = outbox_queue(settings)
    with conn, conn.cursor() as cur:
        shards = queue.ready_shards(cur)
        ((owned, token),) = queue.claim(cur, shards, settings.lease_seconds)
    return outbox_tasks.publish(owned, str(token))


def _by_key(settings, topic) -> dict[bytes, list[int]]:
    seen = defaultdict(list)
    for record in read_topic(settings, topic):
        seen[record.key].append(record.value["n"])
    return seen


def test_rounds_fetched_ahead_are_used_and_every_row_goes_out_once_in_order(
    conn, small_rounds, fetches, topic
):
    with conn, conn.cursor() as cur:
        for n in range(400):
            publish_message(cur, topic, {"n": n}, key=f"k{n % 7}")
    stats = _drain(conn, small_rounds)
    assert stats["delivered"] == 400 and stats["batches"] >= 10
    # the overlap happened: every round but the first took the rows fetched during the
    # one before (the fetches after it found nothing: the task lingered, then let go)
    plain = [n for during, n in fetches if not during and n]
    assert len(plain) == 1, fetches
    seen = _by_key(small_rounds, topic)
    assert sum(len(v) for v in seen.values()) == 400
    for k in range(7):
        assert seen[f"k{k}".encode()] == list(range(k, 400, 7))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM outbox_bridge.outbox")
        assert cur.fetchone() == (0,)


def test_after_a_round_with_a_failure_the_rows_fetched_ahead_are_not_used(
    conn, small_rounds, fetches, topic, monkeypatch
):
    # row 10 of key k3 fails on every attempt: its key waits, the others go out
    monkeypatch.setenv("OUTBOX_BRIDGE_BEFORE_PRODUCE", "tests.faults.fail_marked")
    reset_settings()
    reset_relay()
    retries = []  # the retry task is not sent anywhere: no worker serves this database
    monkeypatch.setattr(outbox_tasks, "enqueue_retry", lambda *a, **k: retries.append(a))
    with conn, conn.cursor() as cur:
        for n in range(200):
            value = {"n": n, **({"fail_always": True} if n == 10 else {})}
            publish_message(cur, topic, value, key=f"k{n % 7}")
    stats = _drain(conn, get_settings())
    assert stats["failed"] == 1 and len(retries) == 1  # the fault happened
    seen = _by_key(small_rounds, topic)
    assert seen[b"k3"] == [3]  # its key stopped at the failed row
    for k in (0, 1, 2, 4, 5, 6):
        assert seen[f"k{k}".encode()] == list(range(k, 200, 7))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT state, count(*) FROM outbox_bridge.outbox GROUP BY 1 ORDER BY 1")
        left = dict(cur.fetchall())
    assert left.get("retrying") == 1 and left.get("pending", 0) + left.get("waiting", 0) == 27
