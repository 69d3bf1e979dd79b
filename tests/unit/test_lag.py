"""Consumer lag while the group coordinator cannot answer (a broker restarting): an
error, not the whole topic as lag. (A fake consumer reaches the edge; the lag
itself is tested against Kafka in tests/acceptance/test_operations.py.)"""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from outbox_bridge import ops
from outbox_bridge.config import Settings


class _Meta:
    def __init__(self):
        self.topics = {"t": type("T", (), {"partitions": {0: None}})()}


class _Committed:
    topic, partition, offset = "t", 0, -1001

    def __init__(self, error):
        self.error = error


class _Consumer:
    def __init__(self, conf):
        pass

    def list_topics(self, timeout):
        return _Meta()

    def committed(self, partitions, timeout):
        # as librdkafka answers then: no offset, and the error beside it
        return [_Committed(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS))]

    def get_watermark_offsets(self, tp, timeout):
        return 0, 84_634

    def close(self):
        pass


def test_a_coordinator_that_is_loading_gives_an_error_not_the_whole_topic(monkeypatch):
    monkeypatch.setattr(ops, "Consumer", _Consumer)
    with pytest.raises(KafkaException, match="COORDINATOR_LOAD_IN_PROGRESS"):
        ops.consumer_lag(Settings(), "g", ["t"])
