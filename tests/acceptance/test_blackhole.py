"""Networks that go silent (issue 18, item 12): PostgreSQL or Kafka stops answering
without closing a connection (a dropped route, a NAT table flush, a paused VM).
A proxy of our own (``outbox_bridge.tools.soak.proxy``) stands between a real worker
and each service; ``silence()`` keeps every socket open and forwards nothing,
and the flows open during the silence stay silent for good, so the worker gets
out only by its own deadlines (``network_timeout``), then a lease."""

from __future__ import annotations

import os
import time
from collections import Counter

import psycopg2
import pytest

from outbox_bridge import publish
from outbox_bridge.loops import MAX_DELAY
from outbox_bridge.tools.soak.proxy import Proxy
from tests.conftest import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]

DEADLINE, LEASE, SILENCE = 5.0, 5.0, 20.0
# back after the silence: a loop's next reconnect (its backoff, then connect_timeout)
# and the deadline of what was stuck, then the lease of the shards it held
BACK_WITHIN = DEADLINE + LEASE + MAX_DELAY + 10


@pytest.fixture
def proxies(services, db_url):
    """(PostgreSQL proxy, Kafka proxy) and the worker's URLs through them."""
    kafka = os.environ.get("OUTBOX_BRIDGE_KAFKA_PROXIED")
    if not kafka:
        pytest.fail(
            "OUTBOX_BRIDGE_KAFKA_PROXIED is not set: run scripts/test (scripts/services"
            " env gives it)"
        )
    host, port = kafka.rsplit(":", 1)
    dsn = psycopg2.extensions.parse_dsn(db_url)
    pg = Proxy((dsn.get("host", "127.0.0.1"), int(dsn.get("port", 5432))))
    kf = Proxy((host, int(port)), int(os.environ.get("OUTBOX_BRIDGE_KAFKA_PROXY_PORT", "9095")))
    urls = {
        "OUTBOX_BRIDGE_DATABASE_URL": psycopg2.extensions.make_dsn(
            **{**dsn, "host": "127.0.0.1", "port": str(pg.port)}
        ),
        "OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": kf.address,
    }
    yield pg, kf, urls
    pg.close()
    kf.close()


def _commit(db_url: str, topic: str, first: int, count: int) -> list[str]:
    """``count`` messages over 8 keys, straight into the database (not through a proxy)."""
    c = psycopg2.connect(db_url)
    try:
        with c, c.cursor() as cur:
            return [
                str(publish(cur, topic, {"k": f"k{n % 8}", "seq": n}, key=f"k{n % 8}"))
                for n in range(first, first + count)
            ]
    finally:
        c.close()


def _start(inbox, worker_env, tmp_path, urls):
    worker_env["OUTBOX_BRIDGE_HEALTH_DIR"] = str(tmp_path / "health")
    worker_env.update(urls)  # the worker and the probes come through the proxies
    return inbox.start(
        concurrency=2,
        OUTBOX_BRIDGE_NETWORK_TIMEOUT=str(DEADLINE),
        OUTBOX_BRIDGE_LEASE_SECONDS=str(LEASE),
    )


def _handled(inbox) -> Counter:
    return Counter(str(m) for m, _k, _s in inbox.effects("record"))


def _once(inbox, ids: list[str], within: float, what: str) -> float:
    """Seconds until every message of ``ids`` was handled, each exactly once."""
    started = time.monotonic()
    wait_for(lambda: set(ids) <= set(_handled(inbox)), within, what)
    took = time.monotonic() - started
    counts = _handled(inbox)
    assert {counts[i] for i in ids} == {1}, "a message's effects are doubled"
    return took


def _in_order(inbox) -> None:
    seqs: dict[str, list[int]] = {}
    for _m, k, seq in inbox.effects("record"):
        seqs.setdefault(k, []).append(seq)
    assert all(s == sorted(s) for s in seqs.values()), seqs


def _then_all_goes_on(inbox, db_url: str, topic: str, worker) -> list[str]:
    """Messages after the silence are handled once; every key kept its order; the
    worker never died (it is stopped here, before the proxies close)."""
    after = _commit(db_url, topic, 80, 40)
    _once(inbox, after, 30, "the messages after the silence")
    _in_order(inbox)
    assert worker.proc.poll() is None
    worker.stop()
    return after


def test_postgres_gone_silent_is_noticed_by_the_deadline_and_nothing_is_lost_or_doubled(
    inbox, proxies, db_url, topic, worker_env, tmp_path
):
    pg, _kf, urls = proxies
    worker = _start(inbox, worker_env, tmp_path, urls)
    before = _commit(db_url, topic, 0, 40)
    _once(inbox, before, 60, "the messages before the silence")
    silenced, silent_at = pg.silence(), time.monotonic()
    assert silenced >= 3, "the worker's connections do not come through the proxy"
    during = _commit(db_url, topic, 40, 40)  # writers are not behind the proxy: they go on
    # the watcher waits on PostgreSQL for ever without a deadline: live says so, then
    # the deadline ends the wait
    stale = wait_for(
        lambda: (
            (r := inbox.cli("health", "--live", "--max-age", "2")).returncode
            and "watcher: STALE" in r.stdout
            and r.stdout
        ),
        DEADLINE + 5,
        "health --live to report the stuck watcher",
    )
    assert "watcher: STALE" in stale
    # the rest of the silence: the watcher, out by its deadline, tries again and again
    # through the proxy and its new connections are silent too
    tried = pg.accepted
    wait_for(
        lambda: pg.accepted >= tried + 2 and time.monotonic() - silent_at >= SILENCE,
        SILENCE + 30,
        "the worker to reconnect into the silence",
    )
    assert _handled(inbox).keys().isdisjoint(during), "handled while PostgreSQL was silent"
    assert pg.open_flows()[1] >= 1  # the silent flows are still open
    pg.speak()
    took = _once(inbox, during, BACK_WITHIN, f"the messages of the silence ({BACK_WITHIN}s)")
    assert "watcher: no answer from PostgreSQL in 5s" in worker.log_tail(1000)  # its deadline
    _then_all_goes_on(inbox, db_url, topic, worker)
    print(f"back {took:.1f}s after PostgreSQL spoke again (bound {BACK_WITHIN}s)")


def test_kafka_gone_silent_delays_and_nothing_is_lost_or_doubled(
    inbox, proxies, db_url, topic, worker_env, tmp_path, kafka_reader
):
    _pg, kf, urls = proxies
    worker = _start(inbox, worker_env, tmp_path, urls)
    before = _commit(db_url, topic, 0, 40)
    _once(inbox, before, 60, "the messages before the silence")
    silenced, silent_at = kf.silence(), time.monotonic()
    assert silenced >= 2, "the worker's Kafka clients do not come through the proxy"
    during = _commit(db_url, topic, 40, 40)
    ready = wait_for(
        lambda: (r := inbox.cli("health", "--ready", "--timeout", "3")).returncode and r.stdout,
        30,
        "health --ready to say Kafka does not answer",
    )
    assert "kafka: no answer" in ready
    # librdkafka gives up its silent connections (socket.timeout.ms) and makes new ones,
    # silent too, for the whole silence
    tried = kf.accepted
    wait_for(
        lambda: kf.accepted >= tried + 2 and time.monotonic() - silent_at >= SILENCE,
        SILENCE + 30,
        "the Kafka clients to reconnect into the silence",
    )
    assert _handled(inbox).keys().isdisjoint(during), "handled while Kafka was silent"
    # the loops wait on Kafka with deadlines of their own: none is stuck
    live = inbox.cli("health", "--live", "--max-age", "10")
    assert live.returncode == 0, live.stdout
    kf.speak()
    took = _once(inbox, during, BACK_WITHIN + 30, "the messages of the silence")
    after = _then_all_goes_on(inbox, db_url, topic, worker)
    # every message reached Kafka (a resend after a silent acknowledgement may double one
    # there, at least once; the inbox takes it once)
    kafka_reader(topic).read_message_ids(set(before + during + after), 30)
    print(f"back {took:.1f}s after Kafka spoke again")
