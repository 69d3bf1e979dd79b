"""Faults stay where they happen (issue 8): one broken topic, producer, key or
handler never stalls, loses or duplicates the rest. Real PostgreSQL, Kafka,
RabbitMQ and `celery -A outbox_bridge worker` subprocesses."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import defaultdict

import psycopg2
import pytest

from outbox_bridge import publish, send
from outbox_bridge.config import reset_settings
from tests.conftest import create_topic, rows, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]


def commit(db_url: str, topic: str, values, key=None) -> list:
    c = psycopg2.connect(db_url)
    try:
        with c, c.cursor() as cur:
            return [publish(cur, topic, v, key=key) for v in values]
    finally:
        c.close()


def per_key_in_order(effects) -> dict:
    seen = defaultdict(list)
    for _mid, k, seq in effects:
        seen[k].append(seq)
    return seen


# -- 0. liveness: a released key goes on at once --------------------------------
def test_keys_whose_head_failed_once_go_on_within_seconds_of_the_retry(inbox, topic):
    # as tried by a new user: 1,500 messages over 30 keys, two handlers, 4 processes,
    # 5% failing their first attempt; a 30 s lease keeps the periodic safety net out
    keys, per_key = 30, 50
    inbox.start(concurrency=4, OUTBOX_BRIDGE_LEASE_SECONDS="30")
    messages = []
    for seq in range(per_key):
        for k in range(keys):
            fail = (seq * keys + k) % 20 == 7  # 5% fail their first attempt
            value = {"k": str(k), "seq": seq, "fail_first": fail}
            messages.append((str(k).encode(), json.dumps(value).encode(), None))
    inbox.produce(messages)
    total = keys * per_key
    wait_for(lambda: len(inbox.effects()) >= total, 120, "every message handled")
    failures = inbox.query("SELECT count(*), max(at) FROM failures")[0]
    assert failures[0] == total // 20, "the injected first-attempt failures did not all happen"
    seen = per_key_in_order(inbox.effects())
    assert all(seen[str(k)] == list(range(per_key)) for k in range(keys))
    assert len(inbox.effects()) == total
    (tail,) = inbox.query(
        "SELECT extract(epoch FROM (SELECT max(at) FROM effects WHERE handler = 'record')"
        " - (SELECT max(at) FROM failures))"
    )[0]
    # the last retry comes ~1 s after the last failure; its key then goes on at once
    assert tail < 8, f"the last effect came {tail:.1f}s after the last failure"


def test_deliveries_parked_behind_a_handlers_failed_head_go_on_when_it_succeeds(inbox, topic):
    """Found by the soak: a handler's head that succeeds on retry must free the
    deliveries parked behind it at once, not at the watcher's next repair (a lease)."""
    from outbox_bridge.config import Settings
    from outbox_bridge.inbox.handlers import inbox_queue

    inbox.query("INSERT INTO switches VALUES ('broken', true) RETURNING name")
    inbox.start(OUTBOX_BRIDGE_LEASE_SECONDS="120")  # the repair would come after 2 minutes
    inbox.produce([(b"a", json.dumps({"k": "a", "seq": s}).encode(), None) for s in range(5)])
    held = (
        "SELECT state, count(*) FROM outbox_bridge.deliveries"
        " WHERE handler = 'outbox.tests.switchable' GROUP BY 1 ORDER BY 1"
    )
    wait_for(lambda: ("retrying", 1) in inbox.query(held), 60, "the head to fail")
    # the watcher's periodic repair parks the rows behind a held key; do it now
    settings = Settings(database_url=inbox.db_url)
    conn = psycopg2.connect(inbox.db_url)
    with conn, conn.cursor() as cur:
        parked = inbox_queue(settings, "outbox.tests.switchable").park(cur)
    conn.close()
    assert parked == 4, inbox.query(held)
    inbox.query("UPDATE switches SET on_ = false RETURNING name")
    wait_for(lambda: len(inbox.effects("switchable")) == 5, 20, "the parked deliveries")
    assert [r[2] for r in inbox.effects("switchable")] == list(range(5))


def test_a_key_released_while_its_shard_is_claimed_goes_on_within_a_round(
    start_worker, db_url, topic, kafka_reader
):
    # one shard, and rows of the held key keep arriving: the shard is claimed (by a
    # task that finds only held rows) most of the time, also when the head's retry
    # delivers it and wakes the shard; a 30 s lease keeps the safety net out of it
    start_worker(
        concurrency=1,
        OUTBOX_BRIDGE_SHARDS="1",
        OUTBOX_BRIDGE_LEASE_SECONDS="30",
        OUTBOX_BRIDGE_BEFORE_PRODUCE="tests.faults.fail_once_per_process",
    )
    ids = commit(db_url, topic, [{"k": "k", "seq": 0, "fail": True}], key="k")
    wait_for(lambda: rows(db_url, "state = 'retrying'"), 30, "the head to fail once")
    deadline = time.monotonic() + 4  # past the head's retry (1 s)
    seq = 1
    while time.monotonic() < deadline:
        ids += commit(db_url, topic, [{"k": "k", "seq": seq}], key="k")
        seq += 1
        time.sleep(0.02)
    last_commit = time.monotonic()
    reader = kafka_reader(topic)
    reader.read_message_ids({str(i) for i in ids}, timeout=60)
    took = time.monotonic() - last_commit
    assert [json.loads(m.value())["seq"] for m in reader.messages] == list(range(seq))
    assert took < 6, f"the released key waited {took:.1f}s after the last commit"


# -- 1. one topic Kafka cannot take stalls nothing else -------------------------
def test_a_missing_topic_pauses_alone_and_resumes_when_created(
    start_worker, db_url, topic, kafka_admin, kafka_reader
):  # the 10 healthy rows are committed after 50,000 rows of a topic that does not exist
    from confluent_kafka.admin import ConfigResource

    broker = ConfigResource(ConfigResource.Type.BROKER, "1")
    config = kafka_admin.describe_configs([broker])[broker].result(30)
    assert config["auto.create.topics.enable"].value == "false", (
        "the test stack runs Kafka as production does, without auto-creation"
    )
    missing = topic + "-missing"
    worker = start_worker(concurrency=2, OUTBOX_BRIDGE_PAUSE_MAX_SECONDS="4")
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        for i in range(50_000):
            publish(cur, missing, {"n": i})
    c.close()
    wait_for(lambda: "paused for" in worker.log_tail(200), 60, "the missing topic to pause")
    started = time.monotonic()
    healthy = commit(db_url, topic, [{"n": i} for i in range(10)], key="k")
    reader = kafka_reader(topic)
    reader.read_message_ids({str(i) for i in healthy}, timeout=30)
    took = time.monotonic() - started
    assert took < 10, f"the healthy topic waited {took:.1f}s behind the missing one"
    assert [json.loads(m.value())["n"] for m in reader.messages] == list(range(10))
    waiting = rows(db_url, f"topic = '{missing}'")
    assert len(waiting) == 50_000
    assert {(r[3], r[4]) for r in waiting} == {("pending", 0)}  # no attempt charged

    create_topic(kafka_admin, missing)
    late = kafka_reader(missing)
    late.read(50_000, timeout=180)
    wait_for(lambda: rows(db_url) == [], 60, "every row to be deleted")


# -- 2. a fatal producer error is recovered -------------------------------------
def test_a_fatal_producer_error_rebuilds_the_producer_and_loses_nothing(
    start_worker, db_url, topic, kafka_admin, kafka_reader
):
    worker = start_worker(
        concurrency=2, OUTBOX_BRIDGE_BEFORE_PRODUCE="tests.faults.fatal_once_per_process"
    )
    ids = []
    for seq in range(30):
        for k in range(5):
            ids += commit(db_url, topic, [{"k": k, "seq": seq}], key=f"k{k}")
    reader = kafka_reader(topic)
    reader.read_message_ids({str(i) for i in ids}, timeout=120)
    assert "fatal error" in worker.log_tail(400) and "rebuilt" in worker.log_tail(400)
    seen = defaultdict(list)
    for m in reader.drain(quiet=2):
        v = json.loads(m.value())
        seen[v["k"]].append(v["seq"])
    assert all(seen[k] == list(range(30)) for k in range(5)), "lost, doubled or reordered"
    wait_for(lambda: rows(db_url) == [], 30, "every row to be deleted")


# -- 3. deterministic database errors; key sizes --------------------------------
def test_a_key_too_long_to_keep_in_order_is_refused_and_the_transaction_stays_usable(conn):
    from outbox_bridge.errors import InvalidKey

    with conn, conn.cursor() as cur:
        with pytest.raises(InvalidKey, match="3000 bytes"):
            publish(cur, "t", 1, key=b"k" * 3000)
        publish(cur, "t", 2, key=b"k" * 2000)
        cur.execute("SELECT count(*) FROM outbox_bridge.outbox")
        assert cur.fetchone() == (1,)


def test_a_foreign_message_with_a_huge_key_and_a_broken_id_is_dead_and_the_loop_goes_on(
    inbox,
):
    inbox.start()
    inbox.produce(
        [
            (b"x" * 3000, json.dumps({"k": "x", "seq": 0}).encode(), [("message_id", b"broken")]),
            (b"x" * 3000, json.dumps({"k": "y", "seq": 0}).encode(), None),
            (b"ok", json.dumps({"k": "ok", "seq": 1}).encode(), None),
        ]
    )
    wait_for(lambda: len(inbox.effects()) == 1, 60, "the good message after the bad ones")
    dead = wait_for(
        lambda: (
            (
                r := inbox.query(
                    "SELECT DISTINCT last_error FROM outbox_bridge.deliveries WHERE state = 'dead'"
                )
            )
            and len(r) == 2
            and r
        ),
        60,
        "both huge-key messages to be dead",
    )
    assert all("key of 3000 bytes" in e for (e,) in dead), dead
    assert inbox.query("SELECT count(*) FROM outbox_bridge.inbox") == [(3,)]


# -- 5. thread pools keep exactly-once ------------------------------------------
def test_threads_pool_effects_match_done_deliveries_exactly(inbox, topic):
    # 1,500 messages, 20% failing their first attempt, a handler that sleeps after
    # its INSERT while others fail and roll back
    inbox.start(concurrency=8, args_extra=("-P", "threads"), OUTBOX_BRIDGE_BATCH_SIZE="10")
    keys, per_key = 30, 50
    messages = []
    for seq in range(per_key):
        for k in range(keys):
            value = {
                "k": str(k),
                "seq": seq,
                "sleep_after": 0.05,
                "fail_first": (seq * keys + k) % 5 == 3,
            }
            messages.append((str(k).encode(), json.dumps(value).encode(), None))
    inbox.produce(messages)
    total = keys * per_key
    wait_for(
        lambda: (
            inbox.query("SELECT count(*) FROM outbox_bridge.deliveries WHERE state <> 'done'")
            == [(0,)]
            and inbox.query("SELECT count(*) FROM outbox_bridge.deliveries") == [(2 * total,)]
        ),
        300,
        "every delivery done",
    )
    assert inbox.query("SELECT count(*) FROM failures")[0][0] == total // 5
    for handler in ("record", "switchable"):
        effects = inbox.query(
            "SELECT message_id, count(*) FROM effects WHERE handler = %s GROUP BY 1", (handler,)
        )
        # effects match done deliveries exactly: none lost, none doubled
        assert len(effects) == total and {n for _m, n in effects} == {1}, handler
    seen = per_key_in_order(inbox.effects())
    assert all(seen[str(k)] == list(range(per_key)) for k in range(keys))


# -- 7. a handler's own retry settings are the schedule that runs ---------------
def test_a_handlers_own_backoff_is_the_schedule_that_runs(inbox, topic):
    inbox.start()  # lease 5 s: shorter than the handler's later countdowns
    slow = topic + "-slow"
    inbox.produce([(b"a", json.dumps({"k": "a", "seq": 0}).encode(), None)], topic=slow)
    dead = wait_for(
        lambda: inbox.query(
            "SELECT attempts FROM outbox_bridge.deliveries WHERE state = 'dead'"
            " AND handler = 'outbox.tests.slow'"
        ),
        90,
        "the always-failing delivery to be dead",
    )
    assert dead == [(4,)]  # the first call and exactly max_retries=3 retries
    calls = [
        t
        for (t,) in inbox.query(
            "SELECT extract(epoch FROM min(at)) FROM calls GROUP BY attempt ORDER BY attempt"
        )
    ]
    gaps = [round(b - a, 1) for a, b in zip(calls, calls[1:], strict=False)]
    # Celery's formula for retry_backoff=3, no jitter: 3 * 2**n -> 3, 6, 12 s
    assert len(gaps) == 3 and all(
        abs(g - e) < 1.5 for g, e in zip(gaps, (3, 6, 12), strict=False)
    ), gaps


# -- 8. send() never writes a message twice -------------------------------------
class CommitBreaker:
    """A TCP proxy to PostgreSQL that passes the first COMMIT to the server but
    withholds the server's answer (the commit happened, the client never hears
    of it), and cuts that connection once ``release`` is set. Later connections
    pass through."""

    def __init__(self, port: int):
        self.port = port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = self.listener.getsockname()
        self.cut = threading.Event()
        self.release = threading.Event()
        self.withheld = 0  # bytes of the server's answer the client never got
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            state = {"cut": False}
            threading.Thread(
                target=self._pipe, args=(client, server, state, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(server, client, state, False), daemon=True
            ).start()

    def _pipe(self, src, dst, state: dict, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and b"COMMIT" in data and not self.cut.is_set():
                    state["cut"] = True  # before the server can answer
                    self.cut.set()
                if not from_client and state["cut"]:
                    self.withheld += len(data)
                    self.release.wait(120)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # shutdown wakes the other direction's recv, and says EOF
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.listener.close()


def test_send_after_a_lost_commit_outcome_writes_the_message_once(
    start_worker, db_url, topic, kafka_admin, kafka_reader, monkeypatch
):
    start_worker()
    dsn = psycopg2.extensions.parse_dsn(db_url)
    proxy = CommitBreaker(int(dsn.get("port", 5432)))
    dsn.update(host=proxy.address[0], port=str(proxy.address[1]))
    monkeypatch.setenv("OUTBOX_BRIDGE_DATABASE_URL", psycopg2.extensions.make_dsn(**dsn))
    reset_settings()
    result: dict = {}

    def sender():
        try:
            result["id"] = send(topic, {"n": 1}, key="k", retries=3)
        except Exception as exc:  # shown by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        assert proxy.cut.wait(30), "the proxy never saw the COMMIT"
        # committed but unanswered: the relay delivers it and deletes the row meanwhile
        reader = kafka_reader(topic)
        reader.read(1, timeout=60)
        wait_for(lambda: rows(db_url) == [], 30, "the delivered row to be deleted")
    finally:
        proxy.release.set()
        thread.join(60)
        proxy.close()
    assert not thread.is_alive(), "send() hung after its connection was cut"
    assert "error" not in result, result
    assert proxy.withheld > 0, "the commit's answer was not withheld: no fault happened"
    assert str(result["id"]) == json_id(reader.messages[0])
    assert len(reader.drain(quiet=4)) == 1, "send() wrote the message twice"
    assert rows(db_url) == []


def json_id(msg) -> str:
    return dict(msg.headers())["message_id"].decode()


# -- 13. a server-side idle-in-transaction timeout below the Kafka wait ----------
def test_a_short_idle_in_transaction_timeout_does_not_resend_batches(
    start_worker, db_url, topic, kafka_admin, kafka_reader
):
    c = psycopg2.connect(db_url)
    c.autocommit = True
    with c.cursor() as cur:
        cur.execute(
            f'ALTER DATABASE "{c.info.dbname}" SET idle_in_transaction_session_timeout = 300'
        )
    c.close()
    start_worker(OUTBOX_BRIDGE_BEFORE_PRODUCE="tests.faults.slow_produce")
    ids = commit(db_url, topic, [{"n": i, "slow": True} for i in range(5)], key="k")
    reader = kafka_reader(topic)
    reader.read_message_ids({str(i) for i in ids}, timeout=60)
    wait_for(lambda: rows(db_url) == [], 30, "every row to be deleted")
    assert len(reader.drain(quiet=3)) == 5, "batches were sent again"


# -- 11. keys that are not UTF-8 in status and dead ------------------------------
def test_status_and_dead_show_and_match_keys_that_are_not_utf8(db_url, conn):
    from outbox_bridge import ops
    from outbox_bridge.config import get_settings

    with conn, conn.cursor() as cur:
        publish(cur, "t", 1, key=b"\xff\x00k")
        publish(cur, "t", 2, key=b"\xff\x00k")
        cur.execute(
            "UPDATE outbox_bridge.outbox SET state = 'dead', attempts = 3, last_error = 'x'"
            " WHERE id = (SELECT min(id) FROM outbox_bridge.outbox)"
        )
    settings = get_settings()
    blocked = ops.status(settings, kafka=False)["outbox"]["blocked_keys"]
    assert [(b["key"], b["waiting"]) for b in blocked] == [("hex:ff006b", 1)]
    assert [d["key"] for d in ops.dead_list(settings)] == ["hex:ff006b"]
    assert ops.dead_list(settings, key="hex:ff006b") and not ops.dead_list(settings, key="k")
    assert ops.dead_retry(settings, key="hex:ff006b") == 1
    assert {r[3] for r in rows(db_url)} == {"pending"}


def test_notify_channel_names_stay_within_63_bytes():
    from outbox_bridge.db import channel

    long_schema = "s" * 60
    assert len(channel(long_schema, "outbox").encode()) <= 63
    assert channel(long_schema, "outbox") != channel(long_schema, "inbox")
    assert channel("outbox_bridge", "outbox") == "outbox_bridge.outbox"


# -- 9. per-key order under a broker rejection -----------------------------------
@pytest.mark.kafka_topic(partitions=1, config={"max.message.bytes": "3000"})
def test_a_refused_message_fences_the_later_rows_of_its_key_in_the_same_batch(
    start_worker, worker_env, db_url, topic, kafka_admin, kafka_reader
):
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    from outbox_bridge import ops
    from outbox_bridge.config import Settings

    # all in one transaction before the worker starts: one batch, one fetch
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        for value in ({"n": 0}, {"n": 1, "pad": "x" * 5000}, {"n": 2}, {"n": 3}, {"n": 4}):
            publish(cur, topic, value, key="k")
        publish(cur, topic, {"n": "other"}, key="other")
    c.close()
    # one record per produce request: the broker judges each message on its own, so
    # it refuses the large one and would accept the later ones of its key
    start_worker(
        OUTBOX_BRIDGE_MAX_RETRIES="1", OUTBOX_BRIDGE_PRODUCER_CONFIG='{"batch.num.messages": 1}'
    )
    reader = kafka_reader(topic)
    wait_for(lambda: rows(db_url, "state = 'dead'"), 60, "the large message to be dead")

    def by_key():  # order holds per key; keys are independent of each other
        found: dict = defaultdict(list)
        for m in reader.messages:
            found[m.key()].append(json.loads(m.value())["n"])
        return found

    reader.read(2, timeout=30)
    # the rows behind the dead head were parked with it, in the same batch
    assert [r[3] for r in rows(db_url)] == ["dead", "waiting", "waiting", "waiting"]
    reader.drain(quiet=2)
    assert by_key() == {b"k": [0], b"other": ["other"]}  # 2, 3, 4 never went ahead of 1

    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    resource.add_incremental_config(
        ConfigEntry("max.message.bytes", "100000", incremental_operation=AlterConfigOpType.SET)
    )
    kafka_admin.incremental_alter_configs([resource])[resource].result(30)
    # the relay reads a topic's limits again within TOPIC_INFO_SECONDS
    assert ops.dead_retry(Settings(database_url=db_url), key="k") == 1
    reader.read(6, timeout=90)
    assert by_key() == {b"k": [0, 1, 2, 3, 4], b"other": ["other"]}
    wait_for(lambda: rows(db_url) == [], 30, "every row to be deleted")


# -- 4. memory is bounded by bytes, not only rows --------------------------------
def test_worker_memory_stays_bounded_with_large_messages(start_worker, db_url, topic, kafka_reader):
    import os
    import subprocess

    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        for i in range(3000):
            publish(cur, topic, os.urandom(900_000), key=f"k{i % 20}")
    c.close()
    worker = start_worker(concurrency=2)
    peak = 0

    def rss_mb() -> int:
        pids = [worker.proc.pid, *worker.children()]
        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", ",".join(map(str, pids))], capture_output=True, text=True
        ).stdout
        return max(int(x) for x in out.split()) // 1024

    def drained() -> bool:
        nonlocal peak
        peak = max(peak, rss_mb())
        return not rows(db_url)

    wait_for(drained, 300, "3,000 messages of 900 KB to be delivered", every=0.5)
    assert peak > 0
    # 32 MB of values per fetch (outbox_bridge_batch_bytes), not 2,000 rows of 900 KB
    assert peak < 400, f"a worker process reached {peak} MB"
    assert len(kafka_reader(topic).read(3000, timeout=120)) >= 3000


# -- 6. handlers differ between workers -------------------------------------------
def test_two_workers_with_different_handlers_in_one_group_every_handler_gets_every_message(
    inbox,
    topic,
    worker_env,
):
    extra_queue = worker_env["OUTBOX_BRIDGE_CELERY_QUEUE"] + "-extra"
    queues = f"{worker_env['OUTBOX_BRIDGE_CELERY_QUEUE']},{extra_queue}"
    old = inbox.start(concurrency=1)
    new = inbox.start(
        concurrency=1,
        args_extra=("-Q", queues),
        TEST_EXTRA_HANDLER="1",
        TEST_EXTRA_QUEUE=extra_queue,
    )
    # both consumers hold partitions of the topic before anything is produced
    for w in (old, new):
        wait_for(
            lambda w=w: f"assigned [('{topic}'" in w.log_tail(400),
            60,
            "both consumers to be assigned partitions",
        )
    registered = inbox.query("SELECT name FROM outbox_bridge.handlers ORDER BY name")
    assert ("outbox.tests.extra",) in registered
    total = 200
    inbox.produce(
        [
            (str(i % 10).encode(), json.dumps({"k": str(i % 10), "seq": i // 10}).encode(), None)
            for i in range(total)
        ]
    )
    for handler in ("record", "switchable", "extra"):
        wait_for(lambda h=handler: len(inbox.effects(h)) == total, 120, f"{handler}'s effects")
    assert {
        n
        for (_m, n) in inbox.query(
            "SELECT message_id, count(*) FROM outbox_bridge.deliveries GROUP BY 1"
        )
    } == {3}


# -- 13. a hung handler ------------------------------------------------------------
def test_a_hung_handler_is_ended_by_its_time_limit_and_its_delivery_runs_again_once(inbox):
    worker = inbox.start(concurrency=1, OUTBOX_BRIDGE_HANDLER_TIME_LIMIT="3")
    inbox.produce(
        [
            (b"h", json.dumps({"k": "h", "seq": 0, "hang_once": 120}).encode(), None),
            (b"h", json.dumps({"k": "h", "seq": 1}).encode(), None),
        ]
    )
    wait_for(lambda: inbox.query("SELECT 1 FROM started"), 60, "the handler to hang")
    wait_for(lambda: len(inbox.effects()) == 2, 60, "both messages handled after the hang")
    assert "Hard time limit (3" in worker.log_tail(400)  # the hang was ended, not waited out
    assert [seq for _m, _k, seq in inbox.effects()] == [0, 1]
