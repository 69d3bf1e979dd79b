"""Months, not minutes (issue 18): faults that do not end. A topic that stays away
for good, a message that kills its process or hangs past its time limit, a write
that fails only at COMMIT. Real PostgreSQL, Kafka, RabbitMQ and
`celery -A outbox_bridge worker` subprocesses."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, defaultdict

import psycopg2
import pytest

from outbox_bridge import publish
from tests.conftest import create_topic, query, rows, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]


def commit(db_url: str, messages) -> list:
    """Publish (topic, value, key) in one transaction; their message ids."""
    c = psycopg2.connect(db_url)
    try:
        with c, c.cursor() as cur:
            return [publish(cur, t, v, key=k) for t, v, k in messages]
    finally:
        c.close()


# -- 1. the circuit breaker of a topic that never comes back ---------------------
def test_a_topic_paused_a_thousand_times_pauses_again_and_the_others_go_once(
    start_worker, db_url, topic, kafka_reader
):
    missing = topic + "-gone"
    # as after hours of a topic that does not exist: 2 ^ 1024 is out of range
    query(
        db_url,
        "INSERT INTO outbox_bridge.topic_pauses (topic, until, pauses)"
        " VALUES (%s, now() - interval '1s', 1024)",
        (missing,),
    )
    messages = []
    for i in range(40):  # keyless: both topics in every shard's batches
        messages += [(missing, {"n": i}, None), (topic, {"n": i}, None)]
    ids = commit(db_url, messages)
    healthy = {str(m) for m, (t, _v, _k) in zip(ids, messages, strict=True) if t == topic}
    worker = start_worker(concurrency=2, OUTBOX_BRIDGE_PAUSE_MAX_SECONDS="5")
    reader = kafka_reader(topic)
    reader.read_message_ids(healthy, timeout=60)
    # the missing topic was tried and paused again, with the pause at its maximum
    paused = wait_for(
        lambda: query(
            db_url,
            "SELECT pauses, extract(epoch FROM until - now())"
            " FROM outbox_bridge.topic_pauses WHERE topic = %s"
            " AND pauses > 1024",
            (missing,),
        ),
        30,
        "the missing topic to pause again",
    )
    assert paused[0][0] >= 1025 and paused[0][1] <= 5.5
    # the healthy rows' acknowledgements were kept: deleted, and never produced again
    wait_for(lambda: rows(db_url, f"topic = '{topic}'") == [], 30, "the healthy rows to go")
    counts = Counter(dict(m.headers())["message_id"].decode() for m in reader.drain(quiet=3))
    assert set(counts) == healthy and set(counts.values()) == {1}, counts.most_common(3)
    assert len(rows(db_url, f"topic = '{missing}'")) == 40
    assert "value out of range" not in worker.log_tail(400)


# -- 3. messages that kill their process or hang ---------------------------------
def _poison_inbox(inbox, kafka_admin, topic):
    poison_topic = topic + "-poison"
    create_topic(kafka_admin, poison_topic)
    worker = inbox.start(
        concurrency=2,
        TEST_POISON_TOPIC=poison_topic,
        OUTBOX_BRIDGE_LEASE_SECONDS="5",
        OUTBOX_BRIDGE_BATCH_SIZE="50",
    )
    return poison_topic, worker


def _healthy_and_poison(poison: dict[str, dict]) -> tuple[list, set[str]]:
    """150 healthy messages over 15 keys, then each poison as the last message of its
    own key: (key, value bytes, headers) to produce, and the healthy message ids."""
    messages, healthy = [], set()
    for seq in range(10):
        for k in range(15):
            message_id = str(uuid.uuid4())
            healthy.add(message_id)
            body = json.dumps({"k": f"k{k}", "seq": seq}).encode()
            messages.append((f"k{k}".encode(), body, [("message_id", message_id.encode())]))
    for key, value in poison.items():
        messages.append((key.encode(), json.dumps({"k": key, "seq": 99, **value}).encode(), None))
    return messages, healthy


def _delivery_states(inbox) -> dict[str, tuple]:
    found = inbox.query(
        "SELECT convert_from(d.key, 'UTF8'), d.state, d.attempts, d.last_error"
        " FROM outbox_bridge.deliveries d WHERE d.handler = 'outbox.tests.poison'"
    )
    return {k: (state, attempts, error) for k, state, attempts, error in found}


def _assert_once_in_order(inbox, healthy: set[str]) -> None:
    effects = inbox.effects("poison")
    counts = Counter(str(m) for m, _k, _s in effects)
    assert healthy <= set(counts), f"{len(healthy - set(counts))} healthy messages not handled"
    assert {counts[m] for m in healthy} == {1}, "a healthy message's effects are doubled"
    per_key = defaultdict(list)
    for _m, k, seq in effects:
        per_key[k].append(seq)
    assert all(per_key[f"k{k}"] == list(range(10)) for k in range(15)), "out of order"


def test_handlers_that_exit_or_hang_their_process_become_dead_and_the_rest_goes_once(
    inbox, kafka_admin, topic
):
    poison_topic, worker = _poison_inbox(inbox, kafka_admin, topic)
    messages, healthy = _healthy_and_poison({"exits": {"exit": True}, "hangs": {"hang": 60}})
    inbox.produce(messages, topic=poison_topic)
    states = wait_for(
        lambda: (
            (s := _delivery_states(inbox))
            and s.get("exits", ("",))[0] == "dead"
            and s.get("hangs", ("",))[0] == "dead"
            and s
        ),
        180,
        "both poison messages to be dead",
    )
    # the faults happened: each poison ran more than once and ended its process each time
    runs = inbox.query(
        "SELECT convert_from(d.key, 'UTF8'), p.attempts FROM poison_calls p"
        " JOIN outbox_bridge.deliveries d ON d.message_id = p.message_id ORDER BY p.at"
    )
    calls = Counter(k for k, _attempts in runs)
    assert calls["exits"] >= 3 and calls["hangs"] >= 3, runs
    log = worker.log_tail(3000)
    assert "WorkerLostError" in log and "Hard time limit (3" in log
    # each counted attempt ran once: the first call and max_retries=2 retries (plus the
    # runs in a batch before the first crash or hang made the shard suspect)
    for key in ("exits", "hangs"):
        counted = [n for k, n in runs if k == key and n > 0]
        assert counted == [1, 2, 3], runs
    for key in ("exits", "hangs"):
        _state, attempts, error = states[key]
        assert attempts == 3 and "did not finish" in error, states[key]
    wait_for(lambda: len(inbox.effects("poison")) >= len(healthy), 60, "the healthy messages")
    _assert_once_in_order(inbox, healthy)
    # the worker still serves: one more message is handled
    extra = str(uuid.uuid4())
    inbox.produce(
        [(b"k0", json.dumps({"k": "k0", "seq": 10}).encode(), [("message_id", extra.encode())])],
        topic=poison_topic,
    )
    wait_for(
        lambda: any(str(m) == extra for m, _k, _s in inbox.effects("poison")),
        60,
        "a message after the poison",
    )


def _assert_each_once_in_key_order(inbox, ids: list[str]) -> None:
    """Each message of ``ids`` (seq n, key k{n % 8}) handled once, each key in order."""
    effects = inbox.effects("poison")
    assert sorted(str(m) for m, _k, _s in effects) == sorted(ids)  # each once
    per_key = defaultdict(list)
    for _m, k, seq in effects:
        per_key[k].append(seq)
    assert per_key == {f"k{k}": list(range(k, len(ids), 8)) for k in range(8)}  # in order


def _dead_exits(inbox) -> tuple:
    """The state of the delivery that exits its process, once it is dead."""
    states = wait_for(
        lambda: (s := _delivery_states(inbox)) and s["exits"][0] == "dead" and s,
        120,
        "the message that exits to be dead",
    )
    return states["exits"]


def test_a_recovery_longer_than_a_task_goes_on_in_the_next_task_not_past_the_time_limit(
    inbox, kafka_admin, topic
):
    """A process that dies in a batch leaves its shard recovering: the next owner runs
    that batch a delivery per transaction. One that takes longer than the time limit
    (3 s) is handed over at the task's deadline (a third of the lease: 2 s), still
    recovering, to a new task that goes on; not killed by the limit and started again
    (the delivery under way then would run again, a second counted attempt)."""
    poison_topic = topic + "-poison"
    create_topic(kafka_admin, poison_topic, partitions=1)  # stored in the order produced
    # all in Kafka before the worker starts: one batch, whose first delivery exits
    messages = [(b"exits", json.dumps({"k": "exits", "seq": 0, "exit": True}).encode(), None)]
    slow = []
    for seq in range(40):  # 40 x 0.15 s = 6 s, one at a time
        slow.append(str(uuid.uuid4()))
        body = json.dumps({"k": f"k{seq % 8}", "seq": seq, "pause": 0.15}).encode()
        messages.append((f"k{seq % 8}".encode(), body, [("message_id", slow[-1].encode())]))
    inbox.produce(messages, topic=poison_topic)
    worker = inbox.start(
        concurrency=2,
        TEST_POISON_TOPIC=poison_topic,
        OUTBOX_BRIDGE_LEASE_SECONDS="6",
        OUTBOX_BRIDGE_SHARDS="1",  # one shard: the whole batch is the dead owner's region
    )
    wait_for(lambda: len(inbox.effects("poison")) >= len(slow), 120, "the slow messages")
    log = worker.log_tail(20000)
    # the faults happened: the batch's process died, and its recovery was handed over
    assert "WorkerLostError" in log
    # no slow delivery was ended by the time limit: each ran once, its attempt counted
    attempts = inbox.query(
        "SELECT d.state, d.attempts, count(*) FROM outbox_bridge.deliveries d"
        " WHERE d.handler = 'outbox.tests.poison' AND d.key <> 'exits'"
        " GROUP BY d.state, d.attempts"
    )
    assert attempts == [("done", 1, len(slow))], attempts
    assert log.count("its recovery goes on in the next task") >= 2
    _assert_each_once_in_key_order(inbox, slow)
    assert _dead_exits(inbox)[1] == 3  # its attempts, each counted before it ran


def test_after_a_death_only_what_the_dead_owners_round_fetched_runs_one_at_a_time(
    inbox, kafka_admin, topic
):
    """Rounds fetch what runs in their one-second budget, growing from 64 rows while
    they are quick, and each renewal records that bound: the process that dies in
    the third round (rows 192-447) leaves a recovery of at most 256 rows per death
    of the poison, not the rest of a 2,000-row backlog one per transaction."""
    poison_topic = topic + "-poison"
    create_topic(kafka_admin, poison_topic, partitions=1)  # stored in the order produced
    fast = []
    messages = []
    for seq in range(2000):
        if seq == 400:
            body = {"k": "exits", "seq": 0, "exit": True}
            messages.append((b"exits", json.dumps(body).encode(), None))
        fast.append(str(uuid.uuid4()))
        body = json.dumps({"k": f"k{seq % 8}", "seq": seq}).encode()
        messages.append((f"k{seq % 8}".encode(), body, [("message_id", fast[-1].encode())]))
    inbox.produce(messages, topic=poison_topic)
    worker = inbox.start(concurrency=2, TEST_POISON_TOPIC=poison_topic, OUTBOX_BRIDGE_SHARDS="1")
    wait_for(lambda: len(inbox.effects("poison")) >= len(fast), 180, "the fast messages")
    # the fault happened (the main process may log the lost child a moment later)
    wait_for(lambda: "WorkerLostError" in worker.log_tail(20000), 30, "the lost process")
    ran = dict(
        inbox.query(
            "SELECT d.attempts > 0, count(*) FROM outbox_bridge.deliveries d"
            " WHERE d.handler = 'outbox.tests.poison' AND d.state = 'done' GROUP BY 1"
        )
    )
    # a delivery run one per transaction has its attempt counted; one of a batch not
    assert 0 < ran.get(True, 0) <= 3 * 256 and ran[False] >= len(fast) - 3 * 256, ran
    _assert_each_once_in_key_order(inbox, fast)
    assert _dead_exits(inbox)[1] == 3


# -- 4. a failure at COMMIT -------------------------------------------------------
def test_a_deferred_foreign_key_broken_by_a_handler_fails_that_delivery_alone(
    inbox, kafka_admin, topic
):
    poison_topic, _worker = _poison_inbox(inbox, kafka_admin, topic)
    messages, healthy = _healthy_and_poison({"orphans": {"orphan": True}})
    inbox.produce(messages, topic=poison_topic)
    states = wait_for(
        lambda: (s := _delivery_states(inbox)) and s.get("orphans", ("",))[0] == "dead" and s,
        120,
        "the delivery that breaks the foreign key to be dead",
    )
    _state, attempts, error = states["orphans"]
    assert attempts == 3 and "ForeignKeyViolation" in error, states["orphans"]
    wait_for(lambda: len(inbox.effects("poison")) >= len(healthy), 60, "the healthy messages")
    _assert_once_in_order(inbox, healthy)
    assert inbox.query("SELECT count(*) FROM children") == [(0,)]


def test_an_outbox_row_whose_produce_kills_its_process_becomes_dead(
    start_worker, db_url, topic, kafka_reader
):
    worker = start_worker(
        concurrency=2,
        OUTBOX_BRIDGE_BEFORE_PRODUCE="tests.faults.exit_marked",
        OUTBOX_BRIDGE_MAX_RETRIES="2",
        OUTBOX_BRIDGE_LEASE_SECONDS="5",
    )
    messages = [(topic, {"k": k, "seq": s}, f"k{k}") for s in range(10) for k in range(5)]
    messages.append((topic, {"k": "p", "exit_always": True}, "p"))
    ids = commit(db_url, messages)
    dead = wait_for(lambda: rows(db_url, "state = 'dead'"), 120, "the killing row to be dead")
    assert [(r[2], r[4]) for r in dead] == [("p", 3)] and "did not finish" in dead[0][5], dead
    assert "WorkerLostError" in worker.log_tail(3000)  # it did kill its process
    reader = kafka_reader(topic)
    reader.read_message_ids({str(i) for i in ids[:-1]}, timeout=60)
    firsts = defaultdict(list)
    for m in reader.drain(quiet=2):
        value = json.loads(m.value())
        if value["seq"] not in firsts[value["k"]]:
            firsts[value["k"]].append(value["seq"])
    assert all(firsts[k] == list(range(10)) for k in range(5)), "out of order"
    wait_for(lambda: len(rows(db_url)) == 1, 30, "every other row to be deleted")


# -- 5. health that tells the truth ----------------------------------------------
def test_retention_beats_while_it_paces_itself_after_a_slow_batch(
    inbox, db_url, topic, worker_env, tmp_path
):
    # a loaded database: each pruned inbox row costs a second, so the batch takes 3 s and
    # retention then waits 49 times as long (prune_share 0.02) before its next batch
    query(
        db_url,
        """
        CREATE TABLE slow_prunes (id bigint, at timestamptz DEFAULT clock_timestamp());
        CREATE FUNCTION slow_prune() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(1); INSERT INTO slow_prunes (id) VALUES (OLD.id); RETURN NULL;
        END $$;
        CREATE TRIGGER slow_prune AFTER DELETE ON outbox_bridge.inbox
            FOR EACH ROW EXECUTE FUNCTION slow_prune();
    """,
    )
    worker_env["OUTBOX_BRIDGE_HEALTH_DIR"] = str(tmp_path / "health")
    worker = inbox.start(
        OUTBOX_BRIDGE_DEDUPE_WINDOW="1",
        OUTBOX_BRIDGE_PRUNE_INTERVAL="0.5",
        OUTBOX_BRIDGE_PRUNE_SHARE="0.02",
    )
    inbox.produce([(b"a", json.dumps({"k": "a", "seq": i}).encode(), None) for i in range(3)])
    wait_for(
        lambda: query(db_url, "SELECT count(*) FROM slow_prunes") == [(3,)],
        60,
        "the slow batch to prune the three handled messages",
    )
    probes, until = 0, time.monotonic() + 10
    while time.monotonic() < until:  # 10 s of the pause, probed all along: alive
        live = inbox.cli("health", "--live", "--max-age", "4")
        assert live.returncode == 0 and "retention: alive" in live.stdout, live.stdout
        probes += 1
    assert probes >= 5
    # it was pacing all along: its round has not ended yet
    assert "retention: forgot" not in worker.log_tail(400)


# -- 9. a row committed late on a shard whose other rows are all held ------------
def test_a_slow_writers_row_on_a_shard_held_by_a_dead_key_goes_within_seconds(
    start_worker, db_url, topic, kafka_reader
):
    from outbox_bridge.queue import shard_of
    from tests.conftest import watcher_idle

    shard = shard_of(topic, b"dead", 16)
    other = next(
        k for k in (f"s{n}" for n in range(999)) if shard_of(topic, k.encode(), 16) == shard
    )
    (head,) = commit(db_url, [(topic, {"n": "head"}, "dead")])
    query(db_url, "UPDATE outbox_bridge.outbox SET state = 'dead' WHERE message_id = %s", (head,))
    start_worker(concurrency=2)
    wait_for(lambda: watcher_idle(db_url), 30, "the watcher to be idle")
    slow = psycopg2.connect(db_url)
    try:
        cur = slow.cursor()
        late = publish(cur, topic, {"n": "late"}, key=other)  # takes its id now
        taken = time.monotonic()
        commit(db_url, [(topic, {"n": "held"}, "dead")])  # a newer id, held by the dead head
        # the shard was looked at and given back as "all held" while the slow row is open
        wait_for(
            lambda: (
                query(
                    db_url,
                    "SELECT idle_above FROM outbox_bridge.claims"
                    " WHERE queue = 'outbox' AND shard = %s",
                    (shard,),
                )[0][0]
                is not None
            ),
            10,
            "the shard to be released as all held",
        )
        wait_for(lambda: time.monotonic() - taken >= 0.3, 5, "300 ms since the id was taken")
        slow.commit()
        committed = time.monotonic()
    finally:
        slow.close()
    kafka_reader(topic).read_message_ids({str(late)}, timeout=30)
    took = time.monotonic() - committed
    assert took < 2, f"the late row waited {took:.1f}s"


# -- 7, 8. the edges of the dedupe window -------------------------------------------
def test_the_worker_and_ready_say_when_a_topic_can_replay_records_older_than_the_window(
    inbox, kafka_admin, topic, worker_env
):
    short = topic + "-poison"  # the poison handler's topic: records gone after about 20 s
    create_topic(kafka_admin, short, **{"retention.ms": "10000", "segment.ms": "10000"})
    worker_env["OUTBOX_BRIDGE_DEDUPE_WINDOW"] = "60"  # the worker's and the probe's
    worker = inbox.start(TEST_POISON_TOPIC=short)
    # Kafka's defaults (7 + 7 days) on this test's other topics; the short one fits
    said = wait_for(
        lambda: [
            line
            for line in worker.log_tail(400).splitlines()
            if "longer than outbox_bridge_dedupe_window (60s)" in line
        ],
        60,
        "the worker's warning",
    )
    assert any(f"topic {topic} can hand out records up to 1209600s old" in s for s in said), said
    assert not any(f"topic {short} " in s for s in said), said
    ready = inbox.cli("health", "--ready")
    assert ready.returncode == 0, ready.stdout  # a warning: the worker is ready all the same
    assert f"kafka: warning: topic {topic} can hand out" in ready.stdout, ready.stdout
    assert f"topic {short} " not in ready.stdout


def test_one_message_id_on_two_topics_runs_the_handlers_of_each_once(inbox, kafka_admin, topic):
    poison_topic, _worker = _poison_inbox(inbox, kafka_admin, topic)
    message_id = str(uuid.uuid4())
    copy = (b"m", json.dumps({"k": "m", "seq": 1}).encode(), [("message_id", message_id.encode())])
    inbox.produce([copy], topic=topic)
    inbox.produce([copy], topic=poison_topic)  # mirrored, headers kept (MirrorMaker, a retry topic)

    def handled(handler: str, message: str) -> int:
        return sum(1 for m, _k, _s in inbox.effects(handler) if str(m) == message)

    wait_for(
        lambda: (
            handled("record", message_id)
            and handled("switchable", message_id)
            and handled("poison", message_id)
        ),
        60,
        "the handlers of both topics",
    )
    # the same message again on each topic, then one after it: dropped as duplicates
    marker = str(uuid.uuid4())
    after = (b"m", json.dumps({"k": "m", "seq": 2}).encode(), [("message_id", marker.encode())])
    for name in (topic, poison_topic):
        inbox.produce([copy, after], topic=name)
    wait_for(
        lambda: all(handled(h, marker) for h in ("record", "switchable", "poison")),
        60,
        "the messages after the duplicates",
    )
    assert [handled(h, message_id) for h in ("record", "switchable", "poison")] == [1, 1, 1]
    stored = inbox.query(
        "SELECT topic FROM outbox_bridge.inbox WHERE message_id = %s ORDER BY topic", (message_id,)
    )
    assert stored == sorted([(topic,), (poison_topic,)])
