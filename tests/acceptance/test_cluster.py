"""A replicated cluster: `scripts/services up kafka-cluster` (three KRaft brokers,
replication factor 3, min.insync.replicas=2) under a relaying worker, while the
leader of the busiest partition and then the active controller are SIGKILLed.
Every row reaches Kafka once, in its key's order; each fault is shown to have
happened (leadership moved, the quorum elected another controller)."""

import os
import subprocess
import threading
import time
from collections import defaultdict

import psycopg2
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from outbox_bridge import publish
from outbox_bridge.config import Settings
from outbox_bridge.tools.soak.cluster import Cluster
from outbox_bridge.tools.soak.reconcile import read_topic
from tests.conftest import ROOT, query, wait_for

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.kafka,
    pytest.mark.rabbitmq,
    pytest.mark.services,
    pytest.mark.slow,
]
SCRIPT = str(ROOT / "scripts" / "services")
# nodes on 29092, 29192, 29292 (+1: their controllers): not the stack's, and below the
# ephemeral ports (a client reconnecting to a killed node could take its port)
PORT = 29092


@pytest.fixture
def cluster(native_services, tmp_path):
    env = {
        **os.environ,
        "OUTBOX_BRIDGE_STATE_DIR": str(tmp_path / "state"),
        "OUTBOX_BRIDGE_CACHE_DIR": os.environ.get(
            "OUTBOX_BRIDGE_CACHE_DIR", str(ROOT / ".services" / "cache")
        ),
        "OUTBOX_BRIDGE_KAFKA_CLUSTER_PORT": str(PORT),
    }
    script = tmp_path / "services"  # the script with this state and these ports
    script.write_text(
        "#!/bin/sh\n"
        + "".join(
            f"export {k}='{env[k]}'\n"
            for k in (
                "OUTBOX_BRIDGE_STATE_DIR",
                "OUTBOX_BRIDGE_CACHE_DIR",
                "OUTBOX_BRIDGE_KAFKA_CLUSTER_PORT",
            )
        )
        + f'exec {SCRIPT} "$@"\n'
    )
    script.chmod(0o755)
    up = subprocess.run(
        [str(script), "up", "kafka-cluster"], capture_output=True, text=True, timeout=300
    )
    assert up.returncode == 0, up.stderr
    bootstrap = ",".join(f"127.0.0.1:{PORT + 100 * i}" for i in range(3))
    try:
        yield str(script), bootstrap, tmp_path / "state"
    finally:
        subprocess.run([str(script), "down", "kafka-cluster"], capture_output=True, timeout=300)


def test_the_relay_loses_nothing_and_keeps_key_order_through_broker_and_controller_kills(
    cluster, start_worker, db_url
):
    script, bootstrap, state = cluster
    settings = Settings(kafka_bootstrap_servers=bootstrap)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    assert sorted(admin.list_topics(timeout=30).brokers) == [1, 2, 3]
    topic = f"cluster-{os.getpid()}-{int(time.time())}"
    admin.create_topics([NewTopic(topic, 3, 3)])[topic].result(30)
    nodes = Cluster(settings, state, topic, script)
    wait_for(
        lambda: all(len(isr) == 3 for _, isr in nodes.partitions().values()),
        60,
        "three replicas in sync",
    )
    start_worker(OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS=bootstrap)

    stop, written = threading.Event(), []

    def write() -> None:  # a steady stream over 12 keys while the faults happen
        conn = psycopg2.connect(db_url)
        n = 0
        while not stop.is_set():
            with conn, conn.cursor() as cur:
                for _ in range(5):
                    key = f"k{n % 12}"
                    written.append((publish(cur, topic, {"n": n}, key=key), key))
                    n += 1
            time.sleep(0.02)
        conn.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_for(lambda: len(written) > 200, 30, "traffic")
        leader = nodes.kill_leader(held=2)
        assert leader["verified"], leader["detail"]
        controller = nodes.kill_controller(held=2)
        assert controller["verified"], controller["detail"]
        # the rows so far acknowledged and deleted: the kills sent each of them once
        # (less the last 5: the writer's open transaction may hold up to 5 of them)
        before_freeze = [str(i) for i, _ in written[: len(written) - 5]]
        wait_for(
            lambda: (
                query(
                    db_url,
                    "SELECT count(*) FROM outbox_bridge.outbox WHERE message_id = ANY(%s::uuid[])",
                    (before_freeze,),
                )
                == [(0,)]
            ),
            60,
            "the rows written before the freeze to be delivered",
        )
        frozen = nodes.stall_leader()
        assert frozen["verified"], frozen["detail"]
        time.sleep(2)
    finally:
        stop.set()
        writer.join()
        nodes.close()
    print(leader["detail"], controller["detail"], frozen["detail"], sep="\n")
    wait_for(
        lambda: query(db_url, "SELECT count(*) FROM outbox_bridge.outbox") == [(0,)],
        120,
        "the outbox to drain",
    )
    records = read_topic(settings, topic)
    ids = [r[4] for r in records]
    assert set(ids) == {str(i) for i, _ in written}  # none lost, none made up
    # through the kills, each once; a frozen leader's purged requests are sent again
    # (at least once: the inbox drops the copies)
    sent_before = set(before_freeze)
    assert sorted(i for i in ids if i in sent_before) == sorted(before_freeze)
    by_key: dict[bytes, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for _partition, _offset, key, _value, message_id, *_ in sorted(records, key=lambda r: r[:2]):
        if message_id not in seen:  # the key's order: of first copies
            seen.add(message_id)
            by_key[key].append(message_id)
    for key, got in by_key.items():
        sent = [str(i) for i, k in written if k.encode() == key]
        assert got == sent, f"key {key!r} out of order"
