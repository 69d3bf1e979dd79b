"""Batch handlers (``@outbox_handler(topic, batch=True)``) end to end: Kafka -> inbox ->
one call per round of messages in `celery -A outbox_bridge worker` subprocesses,
against the real services. The handler is ``tests.handlers_app.batch``."""

import json
from collections import Counter, defaultdict

import pytest

from tests.acceptance.test_observability import free_port, sample, scrape
from tests.conftest import query, wait_for
from tests.observe_app import DEAD_TABLE, finished_spans

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]

BATCH = "outbox.tests.batch"


def _messages(keys: str, per_key: int, **marks: dict) -> list:
    """(key, value, headers) interleaved over ``keys``; ``marks``: key+seq -> extra fields."""
    out = []
    for seq in range(per_key):
        for k in keys:
            value = {"k": k, "seq": seq, **marks.get(f"{k}{seq}", {})}
            out.append((k.encode(), json.dumps(value).encode(), None))
    return out


def _by_key(effects) -> dict[str, list[int]]:
    seen = defaultdict(list)
    for _mid, k, seq in effects:
        seen[k].append(seq)
    return seen


def _calls(inbox) -> list[list]:
    return [r[0] for r in inbox.query("SELECT ids FROM batch_calls ORDER BY at")]


def test_a_batch_handler_gets_each_round_in_one_call_in_key_order(inbox):
    inbox.produce(_messages("abcd", 50))  # all there before the worker starts: big rounds
    inbox.start(TEST_BATCH="1")
    wait_for(lambda: len(inbox.effects("batch")) >= 200, 90, "every message handled")
    effects = inbox.effects("batch")
    assert len(effects) == 200 and len({e[0] for e in effects}) == 200  # each once
    seen = _by_key(effects)
    assert all(seen[k] == list(range(50)) for k in "abcd"), seen
    calls = _calls(inbox)
    # batched: fewer calls than messages, and some call had many of them
    assert len(calls) < 200 and max(len(c) for c in calls) >= 20, [len(c) for c in calls]
    assert sum(len(c) for c in calls) == 200  # nothing failed: no message ran twice


def test_a_poison_message_stands_alone_only_its_key_waits_and_it_dies(inbox):
    query(inbox.db_url, DEAD_TABLE)
    inbox.produce(_messages("abc", 20, b7={"poison": True}))
    inbox.start(
        TEST_BATCH="1",
        include=("tests.observe_app",),
        OUTBOX_BRIDGE_DEAD_HOOK="tests.observe_app.record_dead",
    )
    dead = wait_for(
        lambda: inbox.query(
            "SELECT message_id, attempts, last_error FROM outbox_bridge.deliveries"
            " WHERE handler = %s AND state = 'dead'",
            (BATCH,),
        ),
        90,
        "the poison message to be dead",
    )
    ((poison, attempts, error),) = dead
    assert attempts == 3 and error == "RuntimeError: poison: fails every time (seq 7)"
    wait_for(lambda: len(inbox.effects("batch")) >= 47, 60, "the other messages")
    seen = _by_key(inbox.effects("batch"))
    # every other key done, in order, once; b up to its poison message, then it waits
    assert seen["a"] == list(range(20)) and seen["c"] == list(range(20))
    assert seen["b"] == list(range(7))
    waiting = inbox.query(
        "SELECT count(*) FROM outbox_bridge.deliveries WHERE handler = %s"
        " AND state IN ('pending', 'waiting') AND key = 'b'",
        (BATCH,),
    )
    assert waiting == [(12,)]
    # the fault happened where it should: the poison message failed in calls of its
    # own (its round's last halving and both retries), and the dead hook saw it once
    alone = [c for c in _calls(inbox) if c == [poison]]
    assert len(alone) >= 3, _calls(inbox)
    hooked = wait_for(
        lambda: query(inbox.db_url, "SELECT queue, message_id, attempts FROM dead_seen"),
        30,
        "the dead hook",
    )
    assert hooked == [(BATCH, poison, 3)]


def test_a_failed_message_retries_alone_with_metrics_and_a_span_per_message(inbox, tmp_path):
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    trace_file = tmp_path / "spans.jsonl"
    marks = {"a5": {"fail_first": True}, "c12": {"fail_first": True}}
    inbox.produce(_messages("abc", 15, **marks))
    worker = inbox.start(
        TEST_BATCH="1",
        include=("tests.observe_app",),
        TEST_TRACE_FILE=str(trace_file),
        OUTBOX_BRIDGE_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    wait_for(lambda: len(inbox.effects("batch")) >= 45, 90, "every message handled")
    effects = inbox.effects("batch")
    assert len(effects) == 45 and len({e[0] for e in effects}) == 45
    seen = _by_key(effects)
    assert all(seen[k] == list(range(15)) for k in "abc"), seen
    # the retry ran, for the two failed messages only (attempts: the failed one and it)
    attempts = Counter(
        a
        for (a,) in inbox.query(
            "SELECT attempts FROM outbox_bridge.deliveries WHERE handler = %s AND state = 'done'",
            (BATCH,),
        )
    )
    assert attempts == {0: 43, 2: 2}

    def counted():
        s = scrape(port)
        return sample(s, "outbox_bridge_handled_total", queue=BATCH) >= 45 and s

    s = wait_for(counted, 30, "the handled count")
    assert sample(s, "outbox_bridge_handled_total", queue=BATCH) == 45
    assert sample(s, "outbox_bridge_failed_attempts_total", queue=BATCH) == 2
    assert sample(s, "outbox_bridge_retried_total", queue=BATCH) == 2
    assert sample(s, "outbox_bridge_handler_seconds_count", queue=BATCH) >= 45

    def spans():
        mine = [
            s
            for s in finished_spans(trace_file)
            if s["name"].startswith("process ")
            and s["attributes"].get("outbox_bridge.handler") == BATCH
        ]
        return len({s["attributes"]["messaging.message.id"] for s in mine}) >= 45 and mine

    mine = wait_for(spans, 30, "a process span per message")
    assert {s["attributes"]["messaging.message.id"] for s in mine} == {str(e[0]) for e in effects}
    assert worker.proc.poll() is None
