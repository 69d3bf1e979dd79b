"""Recovery paths against the real services and `celery -A outbox_bridge worker`:
offsets after the database commit, a rebalance mid-stream, a lost retry task,
a publish in a failed handler, a keyed poison message, NOTIFY and its heartbeat."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict

import psycopg2
import pytest

from outbox_bridge import publish
from outbox_bridge.config import Settings, reset_settings
from outbox_bridge.migrate import notify_trigger
from outbox_bridge.outbox.tasks import outbox_queue
from tests.conftest import ROOT, query, rows, wait_for, watcher_idle

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]


def _msg(key: str, seq: int, **extra) -> tuple:
    return (key.encode(), json.dumps({"k": key, "seq": seq, **extra}).encode(), None)


def _by_key(effects) -> dict:
    seen = defaultdict(list)
    for _mid, k, seq in effects:
        seen[k].append(seq)
    return seen


def _kill(worker) -> None:
    """SIGKILL a worker and its pool processes."""
    for pid in [*worker.children(), worker.proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.proc.wait(10)


def _lag(inbox, topic) -> int:
    status = json.loads(inbox.cli("status", "--json").stdout)["inbox"]
    return sum(p["lag"] for p in status["consumer_lag"] if p["topic"] == topic)


def test_offsets_are_committed_only_after_the_database_commit(inbox, topic):
    worker = inbox.start(TEST_CRASH_BEFORE_OFFSET_COMMIT="1")
    children = worker.children()
    inbox.produce([_msg("a", i) for i in range(3)])
    # the worker dies right after its first inbox commit, before the offset commit
    assert worker.proc.wait(60) == -signal.SIGKILL
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert inbox.query("SELECT count(*) FROM started") == [(1,)]  # it died there
    assert inbox.query("SELECT count(*) FROM outbox_bridge.inbox")[0][0] >= 1
    assert _lag(inbox, topic) == 3  # Kafka has no offset: the messages will come again
    inbox.start()
    for handler in ("record", "switchable"):
        wait_for(lambda h=handler: len(inbox.effects(h)) == 3, 60, f"{handler}'s effects")
    assert [r[2] for r in inbox.effects()] == [0, 1, 2]  # once each, in order
    assert inbox.query("SELECT count(*) FROM outbox_bridge.inbox") == [(3,)]
    wait_for(lambda: _lag(inbox, topic) == 0, 30, "the offsets to be committed")


def test_a_rebalance_mid_stream_keeps_effects_once_and_in_order(inbox, topic):
    keys, per_key = 10, 40
    first = inbox.start()

    def stream():
        for seq in range(per_key):
            inbox.produce([_msg(str(k), seq) for k in range(keys)])
            time.sleep(0.1)

    producer = threading.Thread(target=stream)
    producer.start()
    wait_for(lambda: inbox.effects(), 30, "the first effects")
    second = inbox.start()  # joins the group mid-stream
    wait_for(
        lambda: "inbox consumer assigned [('" in second.log_path.read_text(),
        30,
        "the second worker to get partitions",
    )
    first.stop()  # and the first leaves it, mid-stream
    producer.join()
    assert second.proc.poll() is None
    total = keys * per_key
    for handler in ("record", "switchable"):
        wait_for(lambda h=handler: len(inbox.effects(h)) >= total, 120, f"{handler}'s effects")
        effects = inbox.effects(handler)
        assert len(effects) == total == len({m for m, _k, _s in effects})  # exactly once
        assert _by_key(effects) == {str(k): list(range(per_key)) for k in range(keys)}


def test_a_handler_that_publishes_then_raises_leaves_only_its_retrys_message(
    inbox, topic, kafka_reader
):
    inbox.start()
    inbox.produce([_msg("c", 1, chain_then_fail=True)])
    reader = kafka_reader(inbox.topic_chained)
    reader.read(1, timeout=60)
    assert len(reader.drain(quiet=3)) == 1  # the failed attempts' publish rolled back
    assert len(inbox.query("SELECT * FROM failures")) == 1  # the first attempt did raise
    assert len(inbox.effects()) == 1


def test_a_keyed_poison_message_holds_its_key_for_that_handler_only(inbox, topic):
    record = f"outbox.{topic}.record"
    inbox.start()
    inbox.produce(
        [_msg("p", 0), _msg("p", 1, poison=True), _msg("p", 2), _msg("p", 3)]
        + [_msg("q", s) for s in range(4)]
    )
    wait_for(
        lambda: inbox.query("SELECT 1 FROM outbox_bridge.deliveries WHERE state = 'dead'"),
        90,
        "the poison message's delivery to die",
    )
    wait_for(lambda: len(inbox.effects("switchable")) == 8, 30, "the other handler")
    wait_for(lambda: _by_key(inbox.effects())["q"] == [0, 1, 2, 3], 30, "key q")
    assert _by_key(inbox.effects())["p"] == [0]  # held behind its dead head
    assert inbox.query("SELECT handler FROM outbox_bridge.deliveries WHERE state = 'dead'") == [
        (record,)
    ]
    blocked = json.loads(inbox.cli("status", "--json").stdout)["inbox"]["handlers"][record]
    assert [(b["key"], b["waiting"]) for b in blocked["blocked_keys"]] == [("p", 2)]
    out = inbox.cli("dead", "purge", "--handler", record)
    assert "purged 1" in out.stdout, out.stderr
    wait_for(lambda: _by_key(inbox.effects())["p"] == [0, 2, 3], 30, "key p after the purge")


def test_a_lost_retry_task_is_redriven_after_its_lease_and_buried_at_max_retries(
    start_worker, worker_env, db_url, topic
):
    env = {
        "OUTBOX_BRIDGE_BEFORE_PRODUCE": "tests.faults.fail_marked",
        "OUTBOX_BRIDGE_MAX_RETRIES": "1",
        "OUTBOX_BRIDGE_RETRY_BACKOFF": "8",
        "OUTBOX_BRIDGE_RETRY_JITTER": "false",
        "OUTBOX_BRIDGE_LEASE_SECONDS": "3",
    }
    worker = start_worker(**env)
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        publish(cur, topic, {"fail_always": True}, key="k")
    c.close()
    wait_for(lambda: rows(db_url, "state = 'retrying'"), 60, "the first failure")
    _kill(worker)  # its retry task (8 s countdown) goes back to RabbitMQ...
    purge = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "outbox_bridge",
        "purge",
        "-f",
        "-Q",
        worker_env["OUTBOX_BRIDGE_CELERY_QUEUE"],
    ]

    def purged() -> bool:  # ...and is lost there for good
        out = subprocess.run(purge, env=worker_env, cwd=ROOT, capture_output=True, text=True)
        return "Purged 1 message" in out.stdout or "Purged 2 messages" in out.stdout

    wait_for(purged, 30, "the retry task to be purged")
    (attempts_before,) = (r[4] for r in rows(db_url))
    start_worker(**env)  # its watcher re-drives the retry when the lease is over
    dead = wait_for(lambda: rows(db_url, "state = 'dead'"), 90, "the row to be dead")
    assert dead[0][4] == attempts_before + 1 == 2  # one more attempt: the re-driven one


@pytest.mark.parametrize("wake_up", ["sequence", "trigger"])
def test_a_commit_wakes_the_idle_watcher_with_the_fallback_poll_at_60s(
    start_worker, db_url, topic, kafka_reader, wake_up
):
    env = {"OUTBOX_BRIDGE_POLL_INTERVAL": "60"}
    if wake_up == "trigger":  # the opt-in: NOTIFY from the writer, no sequence reads
        _notify_trigger(db_url, on=True)
        env["OUTBOX_BRIDGE_WAKE_POLL"] = "0"
    start_worker(**env)
    wait_for(lambda: watcher_idle(db_url), 30, "the watcher to wait idle")
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        publish(cur, topic, {"n": 1})
    c.close()
    kafka_reader(topic).read(1, timeout=20)  # well before the 60 s timer: the wake-up


def _notify_mode(monkeypatch) -> None:
    """This process's publish() NOTIFYs an idle dispatcher (the workers get the setting
    from their environment)."""
    monkeypatch.setenv("OUTBOX_BRIDGE_WAKE", "notify")
    reset_settings()


def _watcher_query(url: str) -> tuple:
    """(query_start, now - query_start, query) of the dispatcher's session."""
    return query(
        url,
        "SELECT query_start, clock_timestamp() - query_start, query FROM pg_stat_activity"
        " WHERE application_name = 'outbox-bridge watcher'",
    )[0]


def test_the_dispatcher_goes_idle_only_once_a_writer_that_sent_no_notify_has_ended(
    start_worker, db_url, topic, kafka_reader, monkeypatch
):
    """A writer that published while the dispatcher was busy sent no NOTIFY and holds
    the idle lock shared until it ends: the dispatcher cannot go idle meanwhile, keeps
    reading the sequence, and sends the row at once after the commit, not at the 60 s
    safety net (wake = "notify"); then it goes idle."""
    _notify_mode(monkeypatch)
    start_worker(OUTBOX_BRIDGE_POLL_INTERVAL="60", OUTBOX_BRIDGE_WAKE="notify")
    wait_for(lambda: watcher_idle(db_url), 30, "the dispatcher to wait idle")
    reader = kafka_reader(topic)
    listener = _listen(db_url)
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        publish(cur, topic, {"n": 1})
    reader.read(1, timeout=20)
    wait_for(lambda: "" in _payloads(listener), 20, "the NOTIFY of row 1")
    with c, c.cursor() as cur:
        publish(cur, topic, {"n": 2})  # busy: the lock is free, taken shared, no NOTIFY
        opened = time.monotonic()
        # a window of observation: past IDLE_AFTER (1 s), many looks that try the lock
        while time.monotonic() - opened < 3:
            assert not watcher_idle(db_url)  # refused: the writer holds the lock shared
            time.sleep(0.2)
        assert _watcher_query(db_url)[1].total_seconds() < 1  # still looking, as busy
    c.close()
    reader.read(2, timeout=20)  # well before the 60 s timer
    assert "" not in _payloads(listener)  # and not by a NOTIFY: the commit sent none
    wait_for(lambda: watcher_idle(db_url), 30, "the dispatcher to go idle after the writer")
    listener.close()


def _listen(url: str):
    listener = psycopg2.connect(url)
    listener.autocommit = True
    channel = outbox_queue(Settings(database_url=url)).channel
    listener.cursor().execute(f'LISTEN "{channel}"')
    return listener


def _payloads(listener) -> list[str]:
    if select.select([listener], [], [], 0.1)[0]:
        listener.poll()
    got = [n.payload for n in listener.notifies]
    listener.notifies.clear()
    return got


def test_an_idle_dispatcher_sends_no_query_until_a_commit_wakes_it(
    start_worker, db_url, topic, kafka_reader, monkeypatch
):
    _notify_mode(monkeypatch)  # wake = "notify": publish() NOTIFYs the idle dispatcher
    start_worker(OUTBOX_BRIDGE_POLL_INTERVAL="60", OUTBOX_BRIDGE_WAKE="notify")
    wait_for(lambda: watcher_idle(db_url), 30, "the dispatcher to wait idle")

    def last_query():
        return _watcher_query(db_url)

    # settled: no statement for 3 s
    wait_for(lambda: last_query()[1].total_seconds() > 3, 30, "the dispatcher to settle")
    before = last_query()[0]
    seen = {last_query()[0]: last_query()[2]}
    watched = time.monotonic()
    while time.monotonic() - watched < 6:  # a window of observation, not a wait for an outcome
        at, _age, text = last_query()
        seen[at] = text
        time.sleep(0.2)
    assert list(seen) == [before], seen  # not one statement
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        publish(cur, topic, {"n": 1})
    c.close()
    kafka_reader(topic).read(1, timeout=20)  # woken by the NOTIFY of publish()'s INSERT
    assert last_query()[0] > before


def _notify_trigger(url: str, on: bool) -> None:
    c = psycopg2.connect(url)
    with c, c.cursor() as cur:
        notify_trigger(cur, "outbox_bridge", on)
    c.close()


def test_commits_skip_notify_once_the_idle_dispatcher_is_gone(
    start_worker, db_url, topic, kafka_reader
):
    channel = outbox_queue(Settings(database_url=db_url)).channel
    listener = psycopg2.connect(db_url)
    listener.autocommit = True
    listener.cursor().execute(f'LISTEN "{channel}"')

    def notified() -> list[str]:
        if select.select([listener], [], [], 0.2)[0]:
            listener.poll()
        got = [n.payload for n in listener.notifies]
        listener.notifies.clear()
        return got

    def commit(n: int) -> None:
        c = psycopg2.connect(db_url)
        with c, c.cursor() as cur:
            publish(cur, topic, {"n": n})
        c.close()

    _notify_trigger(db_url, on=True)  # the opt-in writer-side NOTIFY
    worker = start_worker()
    wait_for(lambda: watcher_idle(db_url), 30, "the watcher to wait idle")
    notified()
    commit(1)
    wait_for(notified, 10, "the commit's NOTIFY while a watcher is alive")
    reader = kafka_reader(topic)
    reader.read(1, timeout=30)
    _kill(worker)  # no goodbye: its idle lock goes with its session
    wait_for(lambda: not watcher_idle(db_url), 30, "the idle lock to be free")
    notified()
    commit(2)
    listener.cursor().execute(f"NOTIFY \"{channel}\", 'marker'")  # sent after the commit
    assert wait_for(notified, 10, "the marker") == ["marker"]  # the commit sent none
    start_worker()  # a new watcher looks at start: the row goes out
    reader.read(2, timeout=60)
    listener.close()
