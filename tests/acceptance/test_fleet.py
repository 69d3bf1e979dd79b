"""A fleet of workers against one database: one dispatcher, elected, handed over within
seconds when its worker dies; every worker's pool adds capacity (real PostgreSQL,
Kafka, RabbitMQ and Celery workers)."""

import contextlib
import json
import os
import signal
import time
import uuid

import psycopg2
import pytest

from outbox_bridge import publish
from outbox_bridge.queue import shard_of
from outbox_bridge.tools.soak.proxy import Proxy
from outbox_bridge.worker.election import dispatcher, fleet_capacity, timings
from tests.acceptance.test_outbox import cli
from tests.conftest import query, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq]

ELECTED = b"dispatcher elected"


def _kill(worker) -> None:
    """SIGKILL a worker and its pool processes: no goodbye."""
    for pid in [*worker.children(), worker.proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.proc.wait(10)


def _locks(db_url: str) -> list[tuple[bool, str]]:
    """(granted, application_name) of the sessions holding or waiting for the
    dispatcher's advisory lock."""
    return query(
        db_url,
        "SELECT l.granted, a.application_name FROM pg_locks l"
        " JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.objsubid = 1"  # not the handlers' shared locks
        " AND a.application_name LIKE 'outbox-bridge fleet %%'"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " ORDER BY l.granted DESC",
    )


def _commit(db_url: str, topic: str, n: int) -> None:
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        publish(cur, topic, {"n": n}, key=f"k{n}")
    c.close()


def test_one_dispatcher_per_database_and_a_standby_takes_over_within_5s_of_a_sigkill(
    start_worker, db_url, topic, kafka_reader
):
    first = start_worker()
    wait_for(lambda: ELECTED in first.log_path.read_bytes(), 30, "the first worker's election")
    second = start_worker()
    wait_for(lambda: len(_locks(db_url)) == 2, 30, "the second worker to wait for the lock")
    # both alive, one holds the lock, the other waits for it in PostgreSQL
    assert [granted for granted, _name in _locks(db_url)] == [True, False]
    assert first.proc.poll() is None and second.proc.poll() is None
    assert ELECTED not in second.log_path.read_bytes()
    assert _dispatcher(first) == first.proc.pid  # `status` names the one that dispatches
    reader = kafka_reader(topic)
    _commit(db_url, topic, 1)
    reader.read(1, timeout=30)

    _kill(first)
    killed = time.monotonic()
    assert first.proc.poll() is not None  # the fault happened: the leader is gone
    _commit(db_url, topic, 2)
    reader.read(2, timeout=30)
    took = time.monotonic() - killed
    assert ELECTED in second.log_path.read_bytes()
    assert took <= 5, f"the standby dispatched {took:.1f}s after the leader's SIGKILL"
    assert [granted for granted, _name in _locks(db_url)] == [True]
    assert _dispatcher(second) == second.proc.pid


def _holder(db_url: str) -> int | None:
    """The main pid of the worker whose fleet session holds the lock, as PostgreSQL sees it."""
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            found = dispatcher(cur, "outbox_bridge")
            return found and found["pid"]
    finally:
        conn.close()


DEADLINE = 5.0  # the workers' network_timeout here


def test_a_lock_granted_to_a_standby_behind_a_silent_flow_is_given_up_and_another_dispatches(
    start_worker, db_url, topic, kafka_reader
):
    """A standby waits for the lock; its flow goes silent (both ends still open: the
    proxy), and the holder dies: PostgreSQL grants the lock to a session whose worker
    will never hear of it. The server ends that idle session, and a worker dispatches."""
    dsn = psycopg2.extensions.parse_dsn(db_url)
    pg = Proxy((dsn.get("host", "127.0.0.1"), int(dsn.get("port", 5432))))
    through = psycopg2.extensions.make_dsn(**{**dsn, "host": "127.0.0.1", "port": str(pg.port)})
    env = {"OUTBOX_BRIDGE_DATABASE_URL": through, "OUTBOX_BRIDGE_NETWORK_TIMEOUT": str(DEADLINE)}
    workers = []
    try:
        workers.append(first := start_worker(**env))
        wait_for(lambda: ELECTED in first.log_path.read_bytes(), 30, "the first worker's election")
        workers.append(second := start_worker(**env))
        wait_for(lambda: len(_locks(db_url)) == 2, 30, "the second worker to wait for the lock")
        reader = kafka_reader(topic)
        _commit(db_url, topic, 1)
        reader.read(1, timeout=30)

        assert pg.silence() >= 4, "the workers' sessions do not come through the proxy"
        _kill(first)  # its sockets close: the proxy closes its sessions, the lock is free
        killed = time.monotonic()
        # the fault: the lock went to the second worker's session, which hears nothing
        wait_for(lambda: _holder(db_url) == second.proc.pid, 10, "the lock granted to the second")
        assert ELECTED not in second.log_path.read_bytes()
        assert second.proc.poll() is None and pg.open_flows()[0] == 0
        pg.speak()
        workers.append(third := start_worker(**env))
        _commit(db_url, topic, 2)
        reader.read(2, timeout=60)
        took = time.monotonic() - killed
        # the server ends the session idle after `idle` seconds; the second worker gives
        # its wait up after `stand` and its deadline; then a reconnect (its backoff)
        bound = timings(DEADLINE)["idle"] + 15
        assert took <= bound, f"a worker dispatched {took:.1f}s after the holder's SIGKILL"
        assert _holder(db_url) in (second.proc.pid, third.proc.pid)
        assert second.proc.poll() is None and third.proc.poll() is None
    finally:
        for w in workers:
            w.stop()
        pg.close()


def _dispatcher(worker) -> int | None:
    out = cli(worker.env, "status", "--json", "--no-kafka")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)["dispatcher"]
    return found and found["pid"]


def test_a_worker_without_the_dispatcher_adds_its_pool_to_the_fleet(start_worker, db_url):
    start_worker(concurrency=2)
    start_worker(concurrency=3, args=("--without-outbox-watcher",))
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            wait_for(lambda: fleet_capacity(cur, "outbox_bridge") == 5, 30, "a fleet of 2 + 3")
    finally:
        conn.close()
    assert [granted for granted, _name in _locks(db_url)] == [True]  # it does not stand


def _most_at_once(spans: list[tuple]) -> int:
    """The most spans (started, ended) that overlap at one moment."""
    edges = sorted([(s, 1) for s, _e in spans] + [(e, -1) for _s, e in spans])
    running = most = 0
    for _at, step in edges:
        running += step
        most = max(most, running)
    return most


def test_the_pools_of_two_workers_run_one_queue_at_once(inbox, services):
    """Two workers of two processes each: a handler that waits 0.3 s per message runs
    on more processes at once than one worker has, in both workers."""
    workers = [inbox.start(concurrency=2, TEST_WAIT_TOPIC=inbox.topic_waits) for _ in range(2)]
    wait_for(lambda: any(ELECTED in w.log_path.read_bytes() for w in workers), 30, "an election")
    keys, shards = [], set()
    for i in range(1000):  # one key in each of 16 shards: 16 messages that may run at once
        key = f"k{i}".encode()
        if shard_of(inbox.topic_waits, key, 16) not in shards:
            shards.add(shard_of(inbox.topic_waits, key, 16))
            keys.append(key)
    messages = [(k, b'{"n": 1}', [("message_id", str(uuid.uuid4()).encode())]) for k in keys]
    for _round in range(3):
        inbox.produce(messages, topic=inbox.topic_waits)
        messages = [(k, v, [("message_id", str(uuid.uuid4()).encode())]) for k, v, _h in messages]
    wait_for(lambda: inbox.query("SELECT count(*) FROM spans")[0][0] == 48, 90, "48 handled")
    spans = inbox.query("SELECT started, ended FROM spans")
    pids = {pid for (pid,) in inbox.query("SELECT DISTINCT pid FROM spans")}
    assert all(w.proc.poll() is None for w in workers)  # both ran to the end
    assert pids & set(workers[0].children()) and pids & set(workers[1].children())
    assert _most_at_once(spans) >= 3, "no more at once than one worker's pool"
