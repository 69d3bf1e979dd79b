"""Running it for a year: the dead-message hook, Prometheus metrics, traces from
publish() to the handler, health probes and retention, against real services
and `celery -A outbox_bridge worker` subprocesses."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid

import psycopg2
import pytest

from tests.acceptance.test_outbox import cli, commit
from tests.conftest import query, wait_for
from tests.observe_app import DEAD_TABLE, finished_spans

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def dead_seen(db_url: str) -> list[tuple]:
    return query(
        db_url,
        "SELECT queue, message_id::text, topic, key, attempts, last_error, via"
        " FROM dead_seen ORDER BY queue, id",
    )


@pytest.mark.kafka_topic(config={"max.message.bytes": "2000"})
def test_the_dead_hook_fires_once_per_death_also_after_dead_retry(
    start_worker, worker_env, db_url, topic
):
    query(db_url, DEAD_TABLE)
    worker = start_worker(
        OUTBOX_BRIDGE_MAX_RETRIES="1", OUTBOX_BRIDGE_DEAD_HOOK="tests.observe_app.record_dead"
    )
    (big,) = commit(db_url, topic, [{"pad": "x" * 5000}], key="k")
    commit(db_url, topic, [{"n": 1}], key="k")  # waits behind it

    first = wait_for(lambda: dead_seen(db_url), 60, "the hook to see the first death")
    assert first == [("outbox", str(big), topic, "k", 2, first[0][5], "hook")]
    assert "MSG_SIZE_TOO_LARGE" in first[0][5]
    assert query(db_url, "SELECT state FROM outbox_bridge.outbox ORDER BY id")[0] == ("dead",)

    out = cli(worker_env, "dead", "retry", "--id", str(big))
    assert out.returncode == 0 and "retried 1" in out.stdout, out.stderr
    both = wait_for(
        lambda: len(dead_seen(db_url)) >= 2 and dead_seen(db_url),
        60,
        "the hook to see the second death",
    )
    # once per death: the first did not fire twice, the second fired once
    assert [(r[1], r[4]) for r in both] == [(str(big), 2), (str(big), 2)]
    assert worker.proc.poll() is None


def test_the_dead_signal_fires_for_a_handler_and_for_a_message_dead_on_arrival(inbox):
    query(inbox.db_url, DEAD_TABLE)
    query(inbox.db_url, "INSERT INTO switches VALUES ('broken', true)")
    inbox.start(include=("tests.observe_app",), TEST_DEAD_SIGNAL="1")
    good = str(uuid.uuid4())
    inbox.produce(
        [
            (b"a", json.dumps({"k": "a", "seq": 1}).encode(), [("message_id", good.encode())]),
            (b"b", b'{"k": "b"}', [("message_id", b"not-a-uuid")]),
        ]
    )

    def seen():
        found = dead_seen(inbox.db_url)
        return len(found) >= 3 and found

    found = wait_for(seen, 60, "the switchable handler's delivery and the broken message to die")
    by_queue = sorted((r[0], r[3], r[4], r[6]) for r in found)
    # the broken message is dead for both handlers at once; the good one after its retries
    assert by_queue == sorted(
        [
            ("outbox.tests.switchable", "a", 3, "signal"),
            ("outbox.tests.switchable", "b", 0, "signal"),
            (f"outbox.{inbox_topic(inbox)}.record", "b", 0, "signal"),
        ]
    )

    query(inbox.db_url, "UPDATE switches SET on_ = true")
    out = inbox.cli("dead", "retry", "--handler", "outbox.tests.switchable", "--key", "a")
    assert out.returncode == 0 and "retried 1" in out.stdout, out.stderr
    wait_for(lambda: len(dead_seen(inbox.db_url)) >= 4, 60, "the second death of 'a'")
    again = [r for r in dead_seen(inbox.db_url) if r[3] == "a"]
    assert [(r[0], r[1], r[4]) for r in again] == [("outbox.tests.switchable", good, 3)] * 2


def inbox_topic(inbox) -> str:
    return inbox.topic_chained.removesuffix("-chained")


def scrape(port: int) -> dict[str, float]:
    """The samples of a scrape: 'name{label="v",...}' -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if base == name and all(found.get(k) == v for k, v in labels.items()):
            total += value
    return total


def test_metrics_move_as_messages_flow_fail_and_die_and_add_up_over_pool_processes(
    inbox, db_url, tmp_path
):
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    # a former run's counts in the directory: the worker must start from zero
    stale = subprocess.run(
        [
            sys.executable,
            "-c",
            "from outbox_bridge.contrib import metrics; metrics.count('handled', 'stale', 1000)",
        ],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
        capture_output=True,
    )
    assert stale.returncode == 0 and list(metrics_dir.glob("*.db")), stale.stderr
    query(db_url, "INSERT INTO switches VALUES ('broken', true)")
    worker = inbox.start(
        concurrency=2,
        OUTBOX_BRIDGE_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    topic = inbox_topic(inbox)
    record, switchable = f"outbox.{topic}.record", "outbox.tests.switchable"
    assert sample(scrape(port), "outbox_bridge_handled_total", queue="stale") == 0

    count = 200
    for n in range(0, count, 20):  # in several transactions: tasks in both pool processes
        commit(
            db_url, topic, [{"k": f"k{i % 7}", "seq": i} for i in range(n, n + 20)], key=f"k{n % 7}"
        )

    def flowed():
        s = scrape(port)
        return (
            sample(s, "outbox_bridge_published_total", topic=topic) >= count
            and sample(s, "outbox_bridge_handled_total", queue=record) >= count
            and sample(s, "outbox_bridge_dead_total", queue=switchable) >= 7
            and s
        )

    s = wait_for(flowed, 90, "every message published and handled, switchable's keys dead")
    assert sample(s, "outbox_bridge_published_total", topic=topic) == count
    assert sample(s, "outbox_bridge_handled_total", queue=record) == count
    assert sample(s, "outbox_bridge_commit_to_ack_seconds_count") == count
    assert sample(s, "outbox_bridge_consumed_total", topic=topic) >= count
    assert sample(s, "outbox_bridge_batch_size_count", queue="outbox") >= 1
    assert sample(s, "outbox_bridge_handler_seconds_count", queue=record) >= count
    # switchable fails: one dead head per key (7 keys), the rest waits behind them
    assert sample(s, "outbox_bridge_dead_total", queue=switchable) == 7
    assert sample(s, "outbox_bridge_failed_attempts_total", queue=switchable) >= 7 * 3
    assert sample(s, "outbox_bridge_retried_total", queue=switchable) >= 7 * 2
    # gauges read from the database at scrape time
    assert sample(s, "outbox_bridge_rows", queue=switchable, state="dead") == 7
    assert (
        sample(s, "outbox_bridge_rows", queue=switchable, state="pending")
        + sample(s, "outbox_bridge_rows", queue=switchable, state="waiting")
        == count - 7
    )
    assert sample(s, "outbox_bridge_blocked_keys", queue=switchable) == 7
    assert sample(s, "outbox_bridge_oldest_pending_seconds", queue=switchable) > 0
    assert sample(s, "outbox_bridge_rows", queue="outbox", state="pending") == 0
    assert sample(s, "outbox_bridge_database_up") == 1
    # the counters came from more than one process, and add up
    pids = {p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}
    assert len(pids) >= 2, pids
    assert worker.children() and worker.proc.poll() is None

    lag = wait_for(
        lambda: (
            sample(scrape(port), "outbox_bridge_consumer_lag", topic=topic) == 0
            and "outbox_bridge_consumer_lag{" in "".join(scrape(port))
        ),
        60,
        "the sampled consumer lag",
    )
    assert lag
    # the same gauges on their own, as `outbox-bridge metrics` serves them
    out = inbox.cli("metrics", "--once")
    assert out.returncode == 0, out.stderr
    assert f'outbox_bridge_rows{{queue="{switchable}",state="dead"}} 7.0' in out.stdout


def test_a_trace_runs_from_the_publishing_span_to_the_handler(
    inbox, db_url, tmp_path, kafka_reader
):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    trace_file = tmp_path / "spans.jsonl"
    inbox.start(include=("tests.observe_app",), TEST_TRACE_FILE=str(trace_file))
    topic = inbox_topic(inbox)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("POST /orders") as request_span:
        (message_id,) = commit(db_url, topic, [{"k": "a", "seq": 1}], key="a")
    commit(db_url, topic, [{"k": "b", "seq": 2}], key="b")  # no trace around it
    (publisher,) = exporter.get_finished_spans()
    trace_id = f"{publisher.context.trace_id:032x}"
    span_id = f"{publisher.context.span_id:016x}"
    assert request_span.get_span_context().trace_id == publisher.context.trace_id

    # the context travels in the Kafka message's headers
    read = {
        dict(m.headers())["message_id"].decode(): dict(m.headers())
        for m in kafka_reader(topic).read(2, timeout=60)
    }
    assert read[str(message_id)]["traceparent"].decode().split("-")[1] == trace_id
    assert "traceparent" not in read[[k for k in read if k != str(message_id)][0]]

    def spans():
        found = finished_spans(trace_file)
        done = [
            s
            for s in found
            if s["name"] == f"process {topic}"
            and s["attributes"].get("messaging.message.id") == str(message_id)
        ]
        return done and found

    found = wait_for(spans, 60, "the handler's span")
    record = f"outbox.{topic}.record"
    (process,) = [
        s
        for s in found
        if s["name"] == f"process {topic}"
        and s["attributes"]["messaging.message.id"] == str(message_id)
        and s["attributes"]["outbox_bridge.handler"] == record
    ]
    assert process["context"]["trace_id"] == "0x" + trace_id
    assert process["parent_id"] == "0x" + span_id
    assert process["kind"] == "SpanKind.CONSUMER"
    assert process["attributes"]["messaging.system"] == "kafka"
    assert process["attributes"]["messaging.destination.name"] == topic
    assert process["attributes"]["messaging.operation.type"] == "process"
    # the relay's send span links to the message's context
    sends = [s for s in found if s["name"] == f"send {topic}" and s["kind"] == "SpanKind.PRODUCER"]
    links = [link for s in sends for link in s["links"]]
    linked = {(link["context"]["trace_id"], link["context"]["span_id"]) for link in links}
    assert ("0x" + trace_id, "0x" + span_id) in linked, sends
    # the untraced message's handler span starts a trace of its own
    other = [
        s
        for s in found
        if s["name"] == f"process {topic}"
        and s["attributes"]["messaging.message.id"] != str(message_id)
    ]
    assert all(
        s["context"]["trace_id"] != "0x" + trace_id and s["parent_id"] is None for s in other
    )


def test_health_live_follows_the_loops_and_ready_names_the_service_that_is_down(
    inbox, worker_env, db_url, tmp_path, services
):
    health_dir = tmp_path / "health"
    env = {**worker_env, "OUTBOX_BRIDGE_HEALTH_DIR": str(health_dir)}
    no_loop = cli(env, "health", "--live")
    assert no_loop.returncode == 1 and "no outbox-bridge loop" in no_loop.stdout

    worker = inbox.start(OUTBOX_BRIDGE_HEALTH_DIR=str(health_dir))
    beats = wait_for(
        lambda: len(list(health_dir.glob("*"))) == 3 and cli(env, "health", "--live"),
        60,
        "the three loops' heartbeats",
    )
    assert beats.returncode == 0, beats.stdout
    assert sorted(line.split(":")[0] for line in beats.stdout.splitlines()) == [
        "consumer",
        "retention",
        "watcher",
    ]

    # a hung worker: its loops stop beating
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        stale = wait_for(
            lambda: (r := cli(env, "health", "--live", "--max-age", "2")).returncode == 1 and r,
            30,
            "--live to fail while the worker is stopped",
        )
        assert "STALE" in stale.stdout
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    wait_for(
        lambda: cli(env, "health", "--live", "--max-age", "2").returncode == 0,
        30,
        "--live to pass again",
    )
    worker.stop()
    gone = cli(env, "health", "--live")
    assert gone.returncode == 1 and "no outbox-bridge loop" in gone.stdout

    ready = cli(env, "health", "--ready")
    assert ready.returncode == 0, ready.stdout
    down = free_port()
    assert refused(down)  # nothing answers there: the service is down
    no_kafka = cli(
        {**env, "OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{down}"},
        "health",
        "--ready",
        "--timeout",
        "3",
    )
    assert no_kafka.returncode == 1 and "kafka: no answer" in no_kafka.stdout, no_kafka.stdout
    assert "database: answers" in no_kafka.stdout
    dsn = psycopg2.extensions.parse_dsn(db_url)
    no_db = cli(
        {
            **env,
            "OUTBOX_BRIDGE_DATABASE_URL": psycopg2.extensions.make_dsn(
                **{**dsn, "port": str(down)}
            ),
        },
        "health",
        "--ready",
    )
    assert no_db.returncode == 1 and "database: OperationalError" in no_db.stdout, no_db.stdout
    assert "kafka: answers" in no_db.stdout
    query(db_url, "DELETE FROM outbox_bridge.migrations WHERE version = 6")
    old = cli(env, "health", "--ready")
    assert old.returncode == 1 and "migrations pending: 0006_prune_without_cascade" in old.stdout


def test_the_worker_forgets_handled_messages_after_the_dedupe_window(inbox, db_url):
    inbox.start(OUTBOX_BRIDGE_DEDUPE_WINDOW="3", OUTBOX_BRIDGE_PRUNE_INTERVAL="0.5")
    query(db_url, "INSERT INTO switches VALUES ('broken', true)")
    topic = inbox_topic(inbox)
    first = str(uuid.uuid4())
    inbox.produce(
        [(b"a", json.dumps({"k": "a", "seq": 1}).encode(), [("message_id", first.encode())])]
    )
    wait_for(
        lambda: (
            query(db_url, "SELECT count(*) FROM outbox_bridge.deliveries WHERE state = 'dead'")[0][
                0
            ]
            == 1
        ),
        60,
        "switchable's delivery to die",
    )
    query(db_url, "UPDATE switches SET on_ = false")
    second = str(uuid.uuid4())
    inbox.produce(
        [(b"b", json.dumps({"k": "b", "seq": 2}).encode(), [("message_id", second.encode())])]
    )

    # handled first (else "pruned" below could hold before it was even consumed)
    wait_for(
        lambda: uuid.UUID(second) in [r[0] for r in inbox.effects()],
        60,
        "the second message to be handled",
    )

    def pruned():
        return query(db_url, "SELECT message_id::text FROM outbox_bridge.inbox") == [(first,)]

    wait_for(pruned, 60, "the handled message to be pruned, the one with a dead delivery kept")
    kept = query(
        db_url,
        "SELECT message_id::text, handler, state FROM outbox_bridge.deliveries ORDER BY handler",
    )
    assert kept == [
        (first, f"outbox.{topic}.record", "done"),
        (first, "outbox.tests.switchable", "dead"),
    ]
    # read again after its window, a message is handled again (documented)
    inbox.produce(
        [(b"b", json.dumps({"k": "b", "seq": 2}).encode(), [("message_id", second.encode())])]
    )
    wait_for(
        lambda: [r[0] for r in inbox.effects()].count(uuid.UUID(second)) == 2,
        60,
        "the message read again after its window to be handled again",
    )
