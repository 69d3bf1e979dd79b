"""Writing consumed messages to the inbox, against a real PostgreSQL."""

import json
import uuid

import pytest

from outbox_bridge.config import get_settings
from outbox_bridge.inbox.consumer import (
    message_identity,
    register_handlers,
    store,
    store_each,
    stored_headers,
)

pytestmark = pytest.mark.postgres


class FakeMessage:
    """Stands in for a consumed Kafka message, to reach what Kafka rarely delivers."""

    def __init__(
        self, offset, value=b"{}", headers=None, key=b"k", topic="t", timestamp=1_700_000_000_000
    ):
        self._offset, self._value, self._headers = offset, value, headers
        self._key, self._topic, self._timestamp = key, topic, timestamp

    def topic(self):
        return self._topic

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def key(self):
        return self._key

    def value(self):
        return self._value

    def headers(self):
        return self._headers

    def timestamp(self):
        return (1, self._timestamp)


def test_duplicates_are_ignored_and_each_handler_gets_one_delivery(conn):
    settings = get_settings()
    mid = uuid.uuid4()
    header = [("message_id", str(mid).encode())]
    with conn, conn.cursor() as cur:
        register_handlers(
            cur, settings, [("h1", "t", 5, None), ("h2", "t", 5, None), ("other", "u", 5, None)]
        )
        assert store(cur, settings, [FakeMessage(0, headers=header)] * 2) == 1
        assert store(cur, settings, [FakeMessage(5, headers=header)]) == 0
        cur.execute("SELECT handler, state FROM outbox_bridge.deliveries ORDER BY handler")
        assert cur.fetchall() == [("h1", "pending"), ("h2", "pending")]


def test_a_message_the_database_refuses_becomes_dead_and_the_rest_is_stored(conn):
    settings = get_settings()
    refused = FakeMessage(1, headers=[("bad\x00name", b"v")])  # jsonb refuses NUL
    batch = [FakeMessage(0), refused, FakeMessage(2)]
    with conn, conn.cursor() as cur:
        register_handlers(cur, settings, [("h", "t", 5, None)])
    with conn, conn.cursor() as cur, pytest.raises(Exception, match="Unicode"):
        store(cur, settings, batch)
    with conn, conn.cursor() as cur:
        assert store_each(cur, settings, batch) == 3
        cur.execute(
            'SELECT i."offset", d.state, d.last_error FROM outbox_bridge.deliveries d'
            " JOIN outbox_bridge.inbox i USING (message_id) ORDER BY 1"
        )
        rows = cur.fetchall()
    assert [r[:2] for r in rows] == [(0, "pending"), (1, "dead"), (2, "pending")]
    assert rows[1][2].startswith("cannot be stored as it is: unsupported Unicode escape")


def test_message_ids_from_headers_or_position():
    mid = uuid.uuid4()
    assert message_identity(FakeMessage(0, headers=[("message_id", str(mid).encode())])) == (
        mid,
        None,
    )
    derived, problem = message_identity(FakeMessage(7))
    assert problem is None and derived == message_identity(FakeMessage(7))[0]
    assert derived != message_identity(FakeMessage(8))[0]
    _, problem = message_identity(FakeMessage(0, headers=[("message_id", b"nope")]))
    assert problem.startswith("broken headers: message_id is not a UUID")


def test_header_values_are_stored_readably_or_as_base64():
    assert stored_headers([("a", b"text"), ("b", b"\xff"), ("c", b"x\x00"), ("d", None)]) == [
        ["a", "text"],
        ["b", {"b64": "/w=="}],
        ["c", {"b64": "eAA="}],
        ["d", None],
    ]
    assert json.dumps(stored_headers(None)) == "[]"


def test_a_timestamp_python_cannot_hold_is_stored_as_null(conn):
    with conn, conn.cursor() as cur:
        register_handlers(cur, get_settings(), [("h", "t", 5, None)])
        store(cur, get_settings(), [FakeMessage(0, timestamp=300_000_000_000_000)])
        cur.execute('SELECT "timestamp" FROM outbox_bridge.inbox')
        assert cur.fetchall() == [(None,)]


def test_prune_forgets_only_old_fully_handled_messages(conn):
    from outbox_bridge.ops import prune_inbox

    settings = get_settings()
    with conn, conn.cursor() as cur:
        register_handlers(cur, settings, [("h", "t", 5, None)])
        store(cur, settings, [FakeMessage(i) for i in range(3)])
        cur.execute(
            "UPDATE outbox_bridge.inbox SET received_at = now() - interval '8 days'"
            ' WHERE "offset" < 2'
        )
        cur.execute(
            "UPDATE outbox_bridge.deliveries SET state = 'done' WHERE message_id IN"
            ' (SELECT message_id FROM outbox_bridge.inbox WHERE "offset" IN (0, 2))'
        )
    # offset 0: old and done; 1: old, not done; 2: done but recent
    assert prune_inbox(settings, 7 * 86400) == 1
    with conn, conn.cursor() as cur:
        cur.execute('SELECT "offset" FROM outbox_bridge.inbox ORDER BY 1')
        assert cur.fetchall() == [(1,), (2,)]
        cur.execute("SELECT count(*) FROM outbox_bridge.deliveries")
        assert cur.fetchone() == (2,)


def test_retention_prunes_in_batches_past_kept_rows_and_stops_at_the_window(conn):
    import dataclasses

    from outbox_bridge.worker.maintenance import prune

    settings = dataclasses.replace(get_settings(), prune_batch=3)
    with conn, conn.cursor() as cur:
        register_handlers(cur, settings, [("h", "t", 5, None)])
        store(cur, settings, [FakeMessage(i) for i in range(15)])
        cur.execute("UPDATE outbox_bridge.deliveries SET state = 'done'")
        # 0-11 are older than the window; 4 and 9 have a dead delivery, 7 a retrying one
        cur.execute(
            "UPDATE outbox_bridge.inbox SET received_at = now() - interval '2 days'"
            ' WHERE "offset" < 12'
        )
        cur.execute(
            'UPDATE outbox_bridge.deliveries d SET state = CASE i."offset" WHEN 7'
            " THEN 'retrying' ELSE 'dead' END FROM outbox_bridge.inbox i"
            ' WHERE i.message_id = d.message_id AND i."offset" IN (4, 7, 9)'
        )
    assert prune(settings, 86400) == 9  # in batches of 3, past the kept rows
    with conn, conn.cursor() as cur:
        cur.execute('SELECT "offset" FROM outbox_bridge.inbox ORDER BY 1')
        assert [r[0] for r in cur.fetchall()] == [4, 7, 9, 12, 13, 14]
        cur.execute("SELECT count(*) FROM outbox_bridge.deliveries")
        assert cur.fetchone() == (6,)
    assert prune(settings, 86400) == 0


def test_the_default_consumer_group_is_derived_from_the_inbox_database(conn, db_url):
    from outbox_bridge.config import Settings
    from outbox_bridge.inbox.consumer import consumer_group

    with conn, conn.cursor() as cur:
        derived = consumer_group(cur, Settings(database_url=db_url))
        assert derived.startswith(f"outbox-bridge-{conn.info.dbname}-")
        assert consumer_group(cur, Settings(consumer_group="mine")) == "mine"
        # a new inbox (another application's database) gets another identity
        cur.execute("UPDATE outbox_bridge.identity SET id = gen_random_uuid()")
        assert consumer_group(cur, Settings(database_url=db_url)) != derived


def test_deliveries_are_numbered_in_the_order_of_the_batch(conn):
    settings = get_settings()
    batch = [FakeMessage(i, key=str(i % 3).encode()) for i in range(200)]
    with conn, conn.cursor() as cur:
        register_handlers(cur, settings, [(f"h{i}", "t", 5, None) for i in range(5)])
        store(cur, settings, batch)
        cur.execute(
            'SELECT d.handler, i."offset" FROM outbox_bridge.deliveries d'
            " JOIN outbox_bridge.inbox i USING (message_id) ORDER BY d.id"
        )
        found = cur.fetchall()
    for h in range(5):
        assert [o for name, o in found if name == f"h{h}"] == list(range(200))


@pytest.fixture
def handler_task(conn):
    """A real handler task on topic "t" whose handler records ``message.offset`` in
    ``effects``, and what the watcher would send it: ``claimed(n)`` stores n
    messages of one key and returns (queue, shards, token, ids)."""
    from outbox_bridge import outbox_handler
    from outbox_bridge.db import drop_task_connection
    from outbox_bridge.inbox.handlers import REGISTRY, inbox_queue

    settings = get_settings()
    name = f"outbox.t.record_{uuid.uuid4().hex[:6]}"

    @outbox_handler("t", name=name)
    def record(message, tx) -> None:
        tx.execute("INSERT INTO effects (n) VALUES (%s)", (message.offset,))

    def claimed(count: int):
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE effects (n bigint)")
            register_handlers(cur, settings, [(name, "t", 5, None)])
            store(cur, settings, [FakeMessage(n) for n in range(count)])
        queue = inbox_queue(settings, name)
        with conn, conn.cursor() as cur:
            queue.add_claims(cur, range(settings.shards))
            ((shards, token),) = queue.claim(cur, queue.ready_shards(cur), 30)
            ids, _ = queue.fetch_ids(cur, shards, 100)  # what the watcher sends
        return queue, shards, token, ids

    record.claimed = claimed
    yield record
    REGISTRY["t"] = [s for s in REGISTRY.get("t", []) if s.task.name != name]
    drop_task_connection()


def _effects(conn) -> list[int]:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT n FROM effects ORDER BY n")
        return [r[0] for r in cur.fetchall()]


def test_a_handler_task_whose_ids_are_older_than_its_claim_runs_only_what_is_pending(
    conn, handler_task
):
    """Found by the soak (-P threads): a handler task message redelivered after its
    worker died ran the watcher's old ids again, under a claim its lingering run had
    kept. A shard task fetches its deliveries itself: effects stay once."""
    _queue, shards, token, ids = handler_task.claimed(3)
    assert handler_task(ids, str(token), shards)["done"] == 3  # runs, lingers, gives back
    with conn, conn.cursor() as cur:
        store(cur, get_settings(), [FakeMessage(3)])  # the shard is ready again
    # the same task message again (a redelivery, or a task that waited too long)
    assert handler_task(ids, str(token), shards)["done"] == 1  # the new delivery only
    assert _effects(conn) == [0, 1, 2, 3]


def test_a_handler_task_that_took_its_shard_on_again_fetches_afresh(conn, handler_task):
    """Found by the soak (-P threads): the watcher's ids are older than the task; the
    key's head failed meanwhile. Running those ids would run a later message of the
    key ahead of its retrying head: the task fetches afresh instead."""
    queue, shards, token, ids = handler_task.claimed(2)  # one key
    with conn, conn.cursor() as cur:
        # meanwhile: the claim is gone, and the key's head failed in another task
        queue.release(cur, shards, token)
        queue.hold(cur, {ids[0]: "E: failed"}, uuid.uuid4(), 30)
    assert handler_task(ids, str(token), shards)["done"] == 0  # takes the shard on
    assert _effects(conn) == []  # the second message waits behind its head
    with conn, conn.cursor() as cur:
        cur.execute("SELECT state FROM outbox_bridge.deliveries ORDER BY id")
        assert [r[0] for r in cur.fetchall()] == ["retrying", "pending"]
