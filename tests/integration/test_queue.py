"""The durable-queue mechanism against real PostgreSQL (and Kafka where a task runs)."""

import select
import uuid

import psycopg2
import pytest

from outbox_bridge import publish
from outbox_bridge.config import get_settings, reset_settings
from outbox_bridge.migrate import notify_trigger
from outbox_bridge.outbox.tasks import outbox_queue
from outbox_bridge.queue import shard_of
from tests.conftest import rows

pytestmark = pytest.mark.postgres


def _notified(listener, timeout=1.0) -> bool:
    if not listener.notifies and select.select([listener], [], [], timeout)[0]:
        listener.poll()
    got = bool(listener.notifies)
    listener.notifies.clear()
    return got


def _raw_insert(cur, n: int) -> None:
    """A write that bypasses publish() (a bulk load, another language's writer)."""
    cur.execute(
        "INSERT INTO outbox_bridge.outbox (message_id, topic, value, shard)"
        " VALUES (gen_random_uuid(), 't', %s, 0)",
        (str(n).encode(),),
    )


@pytest.mark.parametrize("writer", ["publish", "trigger"])
def test_commits_notify_only_while_a_dispatcher_is_alive_and_idle(
    db_url, conn, writer, monkeypatch
):
    """With wake = "notify", publish()'s own INSERT NOTIFYs while a dispatcher's session
    holds the idle lock; with the opt-in trigger, a write that bypasses publish() does
    the same. A writer that sent no NOTIFY keeps the dispatcher from going idle."""
    monkeypatch.setenv("OUTBOX_BRIDGE_WAKE", "notify")
    reset_settings()
    queue = outbox_queue(get_settings())
    if writer == "trigger":
        with conn, conn.cursor() as cur:
            notify_trigger(cur, "outbox_bridge", on=True)

    def write(cur, n: int) -> None:
        if writer == "publish":
            publish(cur, "t", n)
        else:
            _raw_insert(cur, n)

    listener = psycopg2.connect(db_url)
    listener.autocommit = True
    listener.cursor().execute(f'LISTEN "{queue.channel}"')
    dispatcher = psycopg2.connect(db_url)
    dispatcher.autocommit = True
    lock = dispatcher.cursor()
    with conn, conn.cursor() as cur:
        write(cur, 0)
    assert not _notified(listener)  # no dispatcher idle: nobody to wake
    assert queue.set_idle(lock, True)
    with conn, conn.cursor() as cur:
        write(cur, 1)
    assert _notified(listener)  # idle
    assert not queue.set_idle(lock, False)
    with conn, conn.cursor() as cur:
        write(cur, 2)
        assert not queue.set_idle(lock, True)  # a writer that sent no NOTIFY is open
    assert not _notified(listener)  # busy: it reads the sequence, commits skip NOTIFY
    assert queue.set_idle(lock, True)  # it has ended
    with conn, conn.cursor() as cur:
        write(cur, 3)
    assert _notified(listener)
    dispatcher.close()  # its session ends, and its lock with it
    with conn, conn.cursor() as cur:
        write(cur, 4)
    assert not _notified(listener)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM outbox_bridge.outbox")
        assert cur.fetchone() == (5,)  # every write went in, notified or not
    listener.close()


@pytest.mark.parametrize("writer", ["publish", "bypass"])
def test_by_default_and_without_the_trigger_commits_do_not_notify(db_url, conn, writer):
    """wake = "poll" (the default): the dispatcher reads the id sequence, commits pay
    nothing; a write that bypasses publish() never NOTIFYs without the trigger."""
    queue = outbox_queue(get_settings())
    listener = psycopg2.connect(db_url)
    listener.autocommit = True
    listener.cursor().execute(f'LISTEN "{queue.channel}"')
    dispatcher = psycopg2.connect(db_url)
    dispatcher.autocommit = True
    assert queue.set_idle(dispatcher.cursor(), True)
    with conn, conn.cursor() as cur:
        if writer == "publish":
            publish(cur, "t", 0)
        else:
            _raw_insert(cur, 0)
    assert not _notified(listener)
    listener.close()
    dispatcher.close()


def test_a_shard_is_claimed_by_one_watcher_at_a_time(db_url, conn):
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        publish(cur, "t", 1, key="a")
        shards = queue.ready_shards(cur)
        cur.execute("INSERT INTO outbox_bridge.claims (queue, shard) VALUES ('outbox', %s)", shards)
    assert len(shards) == 1
    other = psycopg2.connect(db_url)
    with conn, conn.cursor() as c1, other, other.cursor() as c2:
        first = queue.claim(c1, shards, 30)
        second = queue.claim(c2, shards, 30)  # row locked by c1: skipped, not waited for
    assert len(first) == 1 and second == []
    with other, other.cursor() as c2:
        assert queue.claim(c2, shards, 30) == []  # leased
    other.close()


def test_a_task_keeps_at_most_its_share_of_shards_and_gives_the_rest_back(db_url, conn):
    """Two tasks took 8 shards each while the queue's share was 2 tasks; the share grows
    to 4: at their next round each keeps 4 (the lowest), the rest are free at once, the
    dispatcher hears of it, and new tasks claim them, at most 4 each."""
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        for n in range(16):  # a pending row in every shard
            cur.execute(
                "INSERT INTO outbox_bridge.outbox (message_id, topic, value, shard)"
                " VALUES (gen_random_uuid(), 't', 'x', %s)",
                (n,),
            )
        claims = queue.claim(cur, list(range(16)), 30, groups=2)
    assert sorted(len(g) for g, _t in claims) == [8, 8]
    listener = psycopg2.connect(db_url)
    listener.autocommit = True
    listener.cursor().execute(f'LISTEN "{queue.channel}"')
    with conn, conn.cursor() as cur:
        queue.set_share(cur, 4)
    (first, token), (second, other) = claims
    with conn, conn.cursor() as cur:
        kept = queue.renew(cur, first, token, 30, adopt=True)
    assert kept == first[:4]
    assert _notified(listener)  # "released": the dispatcher looks again
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT shard FROM outbox_bridge.claims WHERE queue = 'outbox'"
            " AND token IS NULL AND lease_until < now() ORDER BY shard"
        )
        assert [r[0] for r in cur.fetchall()] == first[4:]
        kept = queue.renew(cur, second, other, 30, adopt=True)
    assert kept == second[:4]  # within its share it takes on nothing more either
    with conn, conn.cursor() as cur:
        new = queue.claim(cur, list(range(16)), 30, groups=2, per_group=2)
    assert sorted(len(g) for g, _t in new) == [2, 2]  # at most groups x per_group
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM outbox_bridge.claims WHERE queue = 'outbox' AND token IS NULL"
        )
        assert cur.fetchone() == (4,)  # the rest stay free for lingering tasks to take on
    listener.close()


@pytest.mark.kafka
def test_a_stale_claim_changes_nothing(db_url, conn, services, topic):
    from outbox_bridge.outbox.tasks import publish as publish_task

    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        publish(cur, topic, 1, key="a")
        (shard,) = queue.ready_shards(cur)
        ((shards, token),) = queue.claim(cur, [shard], 30)
    assert shards == [shard]
    stale = str(uuid.uuid4())
    assert publish_task([shard], stale)["stale"] is True
    assert len(rows(db_url)) == 1
    assert publish_task([shard], str(token))["delivered"] == 1
    assert rows(db_url) == []


def test_burying_needs_the_current_retry_token_and_is_idempotent(db_url, conn):
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        publish(cur, "t", 1, key="a")
        cur.execute("SELECT id FROM outbox_bridge.outbox")
        (row_id,) = cur.fetchone()
        token = uuid.uuid4()
        queue.hold(cur, {row_id: "E: first"}, token, 30)
        assert queue.bury(cur, [row_id], uuid.uuid4(), "stale") == []
        (dead,) = queue.bury(cur, [row_id], token, "last")
        assert queue.bury(cur, [row_id], token, "again") == []
    assert [(r[3], r[4], r[5]) for r in rows(db_url)] == [("dead", 1, "E: first")]
    # what the message_dead signal gets
    assert (dead.queue, dead.id, dead.topic, dead.key, dead.attempts, dead.last_error) == (
        "outbox",
        row_id,
        "t",
        b"a",
        1,
        "E: first",
    )


def test_a_task_out_of_retries_buries_only_rows_that_used_up_their_own_attempts(db_url, conn):
    """Found by the soak: retries spent on a database outage made a later real
    failure bury a row after 2 attempts. Burying now counts the row's attempts."""
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        for n in range(2):
            publish(cur, "t", n, key=f"k{n}")
        cur.execute("SELECT id FROM outbox_bridge.outbox ORDER BY id")
        ids = [r[0] for r in cur.fetchall()]
        token = uuid.uuid4()
        queue.hold(cur, {ids[0]: "E: once"}, token, 30)  # attempts 1
        for _ in range(3):
            queue.hold(cur, {ids[1]: "E: often"}, token, 30)  # attempts 3
        assert [d.id for d in queue.bury(cur, ids, token, "out of retries", max_retries=2)] == [
            ids[1]
        ]
    assert [(r[3], r[4]) for r in rows(db_url)] == [("retrying", 1), ("dead", 3)]


def test_claims_split_into_groups_with_one_token_each(db_url, conn):
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        claims = queue.claim(cur, list(range(10)), 30, groups=3)
        again = queue.claim(cur, list(range(12)), 30, groups=3)
    assert sorted(s for group, _ in claims for s in group) == list(range(10))
    assert len(claims) == 3 and len({token for _, token in claims}) == 3
    assert [group for group, _ in again] == [[10], [11]]  # only the free ones


def _held_key(cur, queue, values) -> tuple[int, int]:
    """Publish ``values`` with key "a"; the first becomes a retrying head. (head id, shard)"""
    for value in values:
        publish(cur, "t", value, key="a")
    cur.execute("SELECT id, shard FROM outbox_bridge.outbox WHERE key = 'a' ORDER BY id LIMIT 1")
    head, shard = cur.fetchone()
    queue.hold(cur, {head: "E: once"}, uuid.uuid4(), 30)
    return head, shard


def test_a_wake_up_while_the_shard_is_claimed_survives_the_tasks_held_release(db_url, conn):
    """The interleaving behind minutes-long tails: a task claims the shard and finds
    only rows held by a retrying head; the head is delivered (a wake-up) while the
    task still holds the claim; the task then releases the shard as "all held"."""
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        head, shard = _held_key(cur, queue, [0, 1])
        ((shards, token),) = queue.claim(cur, [shard], 30)
    with conn, conn.cursor() as cur:  # the task: nothing to fetch, all held
        assert queue.fetch(cur, shards, 100) == ([], set())
    other = psycopg2.connect(db_url)
    with other, other.cursor() as cur:  # the retry task delivers the head meanwhile
        queue.complete(cur, [head])
        queue.wake_shards(cur, [shard])
    other.close()
    with conn, conn.cursor() as cur:  # the task's release, from its older view
        queue.release(cur, shards, token, held=shards)
    with conn, conn.cursor() as cur:  # the watcher's next look
        assert queue.ready_shards(cur) == [shard], "the released key waits for the safety net"
        ((again, _token),) = queue.claim(cur, [shard], 30)
        rows_now, _full = queue.fetch(cur, again, 100)
    assert [r.value for r in rows_now] == [b"1"]


@pytest.mark.kafka
def test_each_task_thread_has_its_own_connection_and_producer(db_url, services):
    """-P threads and gevent run tasks concurrently in one process: one shared
    connection would share one transaction between them."""
    import threading

    from outbox_bridge.db import task_connection
    from outbox_bridge.outbox.kafka import get_relay

    settings = get_settings()
    got: dict[str, tuple] = {}

    def grab(name: str) -> None:
        got[name] = (task_connection(settings), get_relay(settings))

    threads = [threading.Thread(target=grab, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (conn_a, relay_a), (conn_b, relay_b) = got["a"], got["b"]
    assert conn_a is not conn_b and relay_a is not relay_b
    assert conn_a.info.backend_pid != conn_b.info.backend_pid
    assert task_connection(settings) is task_connection(settings)  # kept per thread


def test_rows_behind_a_held_key_are_parked_and_freed_in_order_when_it_is_released(db_url, conn):
    """Parked rows leave the pending index, so a fetch does not walk them; releasing the
    key (delivery of its head, dead retry, purge) frees them in their original order."""
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        head, shard = _held_key(cur, queue, range(5))
        publish(cur, "t", "other", key="b")
        assert queue.park(cur, [shard]) == 4
        cur.execute("SELECT state, count(*) FROM outbox_bridge.outbox GROUP BY 1 ORDER BY 1")
        assert cur.fetchall() == [("pending", 1), ("retrying", 1), ("waiting", 4)]
    with conn, conn.cursor() as cur:  # the head is delivered: its key is free
        queue.unpark(cur, [(shard, "t", b"a")])
        queue.complete(cur, [head])
        rows_now, _ = queue.fetch(cur, list(range(16)), 100)
    assert [r.value for r in rows_now if r.key == b"a"] == [b"1", b"2", b"3", b"4"]


def test_the_safety_net_frees_waiting_rows_whose_head_is_gone(db_url, conn):
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        head, shard = _held_key(cur, queue, [0, 1])
        queue.park(cur, [shard])
        cur.execute("DELETE FROM outbox_bridge.outbox WHERE id = %s", (head,))  # no unpark
        queue.repair(cur)
        cur.execute("SELECT state FROM outbox_bridge.outbox")
        assert cur.fetchall() == [("pending",)]


def _publish_and_claim(conn, queue, key: str, value: int = 1):
    """Commit a row of ``key``; claim its shard: (shard, token)."""
    with conn, conn.cursor() as cur:
        publish(cur, "t", value, key=key)
        shard = shard_of("t", key.encode(), get_settings().shards)
        ((_, token),) = queue.claim(cur, [shard], 30)
    return shard, token


def test_a_lingering_task_takes_on_free_ready_shards_and_keeps_its_own(db_url, conn):
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        queue.add_claims(cur, range(16))
    mine, token = _publish_and_claim(conn, queue, "mine")
    keys = [f"k{n}" for n in range(40)]
    with conn, conn.cursor() as cur:
        for k in keys:
            publish(cur, "t", 2, key=k)
    others = {shard_of("t", k.encode(), 16) for k in keys} - {mine}
    # one of them is leased to another task right now: not to be taken
    taken_by_other = min(others)
    with conn, conn.cursor() as cur:
        ((_, other_token),) = queue.claim(cur, [taken_by_other], 30)
    with conn, conn.cursor() as cur:
        assert queue.renew(cur, [mine], token, 30) == [mine]  # without adopt: its own only
        now_owned = queue.renew(cur, [mine], token, 30, adopt=True)
    assert set(now_owned) == {mine} | (others - {taken_by_other})
    with conn, conn.cursor() as cur:
        # the other task's claim is untouched; a stale token adopts nothing it holds
        assert queue.renew(cur, [taken_by_other], other_token, 30) == [taken_by_other]
        assert queue.renew(cur, now_owned, uuid.uuid4(), 30, adopt=True) == []


def test_a_lingering_task_leaves_shards_whose_rows_are_all_held(db_url, conn):
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        queue.add_claims(cur, range(16))
    held, token = _publish_and_claim(conn, queue, "held")
    free_key = next(
        k for k in (f"f{n}" for n in range(99)) if shard_of("t", k.encode(), 16) != held
    )
    with conn, conn.cursor() as cur:
        # every pending row of the shard is held back by its key's dead head: released
        # as "all held"
        cur.execute(
            "UPDATE outbox_bridge.outbox SET state = 'dead' WHERE id = (SELECT"
            " min(id) FROM outbox_bridge.outbox)"
        )
        publish(cur, "t", 2, key="held")
        queue.release(cur, [held], token, held=[held])
        publish(cur, "t", 0, key=free_key)
    free = shard_of("t", free_key.encode(), 16)
    lingering = uuid.uuid4()
    with conn, conn.cursor() as cur:
        assert queue.renew(cur, [], lingering, 30, adopt=True) == [free]
    with conn, conn.cursor() as cur:
        queue.wake_shards(cur, [held])  # its held key was released
    with conn, conn.cursor() as cur:
        assert queue.renew(cur, [free], lingering, 30, adopt=True) == sorted({free, held})
        cur.execute("SELECT count(*) FROM outbox_bridge.wakes")
        assert cur.fetchone()[0] == 0  # the wake-up was consumed by taking the shard on


def test_after_a_takeover_only_the_rows_the_dead_owner_may_have_had_are_suspects(db_url, conn):
    """A backlog that arrived after the owner died is fetched in batches, not one row
    per transaction: the suspects are the rows that existed at its last renewal."""
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        ids = [publish(cur, "t", n, key="a") for n in range(3)]  # in hand when it died
        (shard,) = queue.ready_shards(cur)
        ((_shards, dead_owner),) = queue.claim(cur, [shard], 30)
        # it renewed 40 s ago (lease 30 s) and was never heard of again; the rows it had
        # are 41 s old; 50 more came after its death
        cur.execute(
            "UPDATE outbox_bridge.claims SET lease_until = now() - interval '10s' WHERE shard = %s",
            (shard,),
        )
        cur.execute("UPDATE outbox_bridge.outbox SET created_at = now() - interval '41s'")
        # the first of them from a transaction that began later than the others' (ids and
        # start times disagree): still in hand, since a later row of its key is
        cur.execute(
            "UPDATE outbox_bridge.outbox SET created_at = now() WHERE id = %s", (min(_ids(cur)),)
        )
        for n in range(50):
            publish(cur, "t", 100 + n, key="a")
    with conn, conn.cursor() as cur:
        ((_shards, new_owner),) = queue.claim(cur, [shard], 30)
        owned, recovering, _limits, _crowded = queue.renew_round(cur, [shard], new_owner, 30)
        assert new_owner != dead_owner and owned == recovering == [shard]
        suspects = queue.suspects(cur, recovering, 2000)
        every, _ = queue.fetch_ids(cur, recovering, 2000)
    assert len(every) == 53
    assert [_row_message(db_url, i) for i in suspects] == [str(m) for m in ids]
    with conn, conn.cursor() as cur:
        queue.recovered(cur, recovering, new_owner)
        assert queue.renew_round(cur, [shard], new_owner, 30)[:2] == ([shard], [])
        cur.execute("SELECT recover_before FROM outbox_bridge.claims WHERE shard = %s", (shard,))
        assert cur.fetchone() == (None,)


def test_a_takeover_suspects_only_as_many_rows_as_a_round_of_the_dead_owner_fetched(db_url, conn):
    """A handler's rounds fetch what runs in a second: its recovery runs that many rows
    one per transaction, not a whole batch_size."""
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        for n in range(30):
            publish(cur, "t", n, key="a")
        ids = _ids(cur)
        (shard,) = queue.ready_shards(cur)
        ((_shards, dead_owner),) = queue.claim(cur, [shard], 30)
    with conn, conn.cursor() as cur:
        assert queue.renew(cur, [shard], dead_owner, 30, limit=5) == [shard]  # committed
    with conn, conn.cursor() as cur:
        queue.renew(cur, [shard], dead_owner, 30, limit=400)  # its next round: it died in it
        conn.rollback()
        cur.execute(
            "UPDATE outbox_bridge.claims SET lease_until = now() - interval '10s' WHERE shard = %s",
            (shard,),
        )
        cur.execute("UPDATE outbox_bridge.outbox SET created_at = now() - interval '41s'")
    with conn, conn.cursor() as cur:
        ((_shards, new_owner),) = queue.claim(cur, [shard], 30)
        renewed = queue.renew_round(cur, [shard], new_owner, 30, limit=100)
        assert renewed.recovering == [shard]
        most = renewed.region_limit(renewed.recovering, 2000)
        assert most == 5  # the dead owner's, not the new owner's 100
        assert queue.suspects(cur, renewed.recovering, most) == ids[:5]
    with conn, conn.cursor() as cur:
        # not yet recovered: a renewal keeps the dead owner's limit
        assert queue.renew_round(cur, [shard], new_owner, 30, limit=100).limits == {shard: 5}
        queue.recovered(cur, [shard], new_owner, 100)
        assert queue.renew_round(cur, [shard], new_owner, 30).limits == {shard: 100}
        assert queue.renew_round(cur, [shard], new_owner, 30, limit=7).recovering == []
        cur.execute("SELECT round_limit FROM outbox_bridge.claims WHERE shard = %s", (shard,))
        assert cur.fetchone() == (7,)


def _ids(cur) -> list[int]:
    cur.execute("SELECT id FROM outbox_bridge.outbox")
    return [r[0] for r in cur.fetchall()]


def _row_message(db_url: str, row_id: int) -> str:
    from tests.conftest import query

    return str(
        query(db_url, "SELECT message_id FROM outbox_bridge.outbox WHERE id = %s", (row_id,))[0][0]
    )


def test_a_queue_with_more_tasks_at_work_than_its_share_is_crowded(conn):
    """Two tasks at work on the outbox: crowded when its share is one task (another queue
    waits for a pool process), not when it is two, nor before the dispatcher set one."""
    queue = outbox_queue(get_settings())
    with conn, conn.cursor() as cur:
        for key in ("a", "b", "c", "d", "e", "f"):
            publish(cur, "t", 1, key=key)
        shards = queue.ready_shards(cur)
        assert len(shards) >= 2
        claims = queue.claim(cur, shards, 30, groups=2)
        assert len(claims) == 2
    (mine, token), _other = claims
    with conn, conn.cursor() as cur:
        assert queue.renew_round(cur, mine, token, 30).crowded is False  # no share yet
        queue.set_share(cur, 16, 2)
        assert queue.renew_round(cur, mine, token, 30, adopt=True).crowded is False
        queue.set_share(cur, 16, 1)
        assert queue.renew_round(cur, mine, token, 30).crowded is True
        assert queue.renew_round(cur, mine, token, 30, adopt=True).crowded is True
        queue.set_share(cur, 16, 0)  # more busy queues than pool processes: turns
        assert queue.renew_round(cur, mine, token, 30).crowded is True
