"""The relay's delivery deadline (issue 18, the order broken at Kafka blackholes),
against the real Kafka behind the project's proxy: while Kafka is silent, a round
gives up before its lease ends, all of its batch at once, and none of that batch
goes out later, when the rows may have a new owner that sends the same keys."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from outbox_bridge.config import Settings
from outbox_bridge.outbox import Row
from outbox_bridge.outbox.kafka import get_relay, reset_relay
from outbox_bridge.outbox.tasks import in_lease
from outbox_bridge.tools.soak.proxy import Proxy
from outbox_bridge.tools.soak.reconcile import read_topic
from tests.conftest import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LEASE = 8.0  # the round's deadline: three quarters of it


def _rows(topic: str, first: int, count: int) -> list[Row]:
    return [
        Row(i, str(uuid.uuid4()), topic, b"k", json.dumps({"n": i}).encode(), None)
        for i in range(first, first + count)
    ]


def test_a_silent_kafka_ends_the_round_within_its_lease_and_nothing_of_it_goes_out_later(
    services, topic
):
    proxied = os.environ.get("OUTBOX_BRIDGE_KAFKA_PROXIED")
    if not proxied:
        pytest.fail(
            "OUTBOX_BRIDGE_KAFKA_PROXIED is not set: run scripts/test (scripts/services"
            " env gives it)"
        )
    host, port = proxied.rsplit(":", 1)
    proxy = Proxy((host, int(port)), int(os.environ.get("OUTBOX_BRIDGE_KAFKA_PROXY_PORT", "9095")))
    # message.timeout.ms stays at its 30 s: only the lease can end this round in time
    settings = Settings(kafka_bootstrap_servers=proxy.address, lease_seconds=LEASE)
    reset_relay()  # this thread's producer of an earlier test knows another bootstrap
    relay = get_relay(settings)
    try:
        warm = _rows(topic, 1, 1)
        assert relay.deliver(warm).delivered == [1]  # connected, the topic's metadata known
        assert proxy.silence() >= 1, "the producer does not come through the proxy"
        stuck = _rows(topic, 2, 50)
        began = time.monotonic()
        outcome = relay.deliver(stuck, in_lease(settings))
        took = time.monotonic() - began
        # the fault happened: nothing was acknowledged, every row waits, none is charged
        assert outcome.delivered == [] and not outcome.failed
        assert sorted(outcome.later) == [r.id for r in stuck]
        assert "PURGE" in outcome.paused_topics[topic]
        assert took < LEASE * 0.75 + 1.0, f"the round outlived its lease: {took:.1f}s"
        # the purged requests would keep a silent connection for ever: a new producer
        assert relay.broken
        proxy.speak()
        relay = get_relay(settings)
        after = _rows(topic, 100, 1)
        wait_for(
            lambda: relay.deliver(after).delivered == [100],
            60,
            "a new producer to deliver after the silence",
        )
        # only what was delivered is in Kafka: the purged batch never went out
        sent = {r[4] for r in read_topic(settings, topic)}
        assert warm[0].message_id in sent and after[0].message_id in sent
        assert not sent & {r.message_id for r in stuck}, "a purged row reached Kafka"
    finally:
        reset_relay()
        proxy.close()
