"""Consumer lag while the group coordinator cannot answer (a broker starting or
restarting): asked again, and an error, never the whole topic as lag, if it stays
away. (A fake consumer reaches the edge; the lag itself is tested against Kafka in
tests/acceptance/test_operations.py.)"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from outbox_bridge import ops
from outbox_bridge.config import Settings


class _Meta:
    def __init__(self):
        self.topics = {"t": type("T", (), {"partitions": {0: None}})()}


class _Committed:
    topic, partition = "t", 0

    def __init__(self, error, offset=-1001):
        self.error = error
        self.offset = offset


class _Consumer:
    """Answers ``answers`` in turn: an error raised (the coordinator moved), an error
    beside no offset (as librdkafka answers while it loads), or an offset."""

    def __init__(self, conf, answers=None):
        self.answers = list(answers or [])

    def list_topics(self, timeout):
        return _Meta()

    def committed(self, partitions, timeout):
        answer = self.answers.pop(0) if self.answers else "loading"
        if answer == "moved":
            raise KafkaException(KafkaError(KafkaError.NOT_COORDINATOR))
        if answer == "loading":
            return [_Committed(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS))]
        return [_Committed(None, answer)]

    def get_watermark_offsets(self, tp, timeout):
        return 0, 84_634

    def close(self):
        pass


def test_the_lag_is_asked_again_while_the_coordinator_moves_or_loads(monkeypatch):
    consumer = _Consumer({}, ["moved", "loading", 80_000])
    monkeypatch.setattr(ops, "Consumer", lambda conf: consumer)
    (lag,) = ops.consumer_lag(Settings(), "g", ["t"])
    assert (lag["committed"], lag["lag"]) == (80_000, 4_634)
    assert not consumer.answers  # all three asked


def test_a_coordinator_that_stays_away_gives_an_error_not_the_whole_topic():
    with pytest.raises(KafkaException, match="COORDINATOR_LOAD_IN_PROGRESS"):
        ops._committed(_Consumer({}), [], time.monotonic() + 0.5)


def test_an_error_that_is_not_the_coordinators_is_not_asked_again():
    class Denied(_Consumer):
        def committed(self, partitions, timeout):
            raise KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))

    with pytest.raises(KafkaException, match="GROUP_AUTHORIZATION_FAILED"):
        ops._committed(Denied({}), [], time.monotonic() + 60)
