"""The relay's check of every batch: a key whose later row Kafka acknowledged
while an earlier one was not is out of order in the topic, and is reported."""

from outbox_bridge.outbox import Row
from outbox_bridge.outbox.kafka import Outcome, order_breaks


def _row(i: int, key: bytes | None, topic: str = "t") -> Row:
    return Row(i, f"m{i}", topic, key, b"v", None)


ROWS = [_row(1, b"a"), _row(2, b"b"), _row(3, b"a"), _row(4, None), _row(5, b"a", "u")]


def test_a_later_row_delivered_after_an_earlier_one_of_its_key_was_not_is_a_break():
    outcome = Outcome(delivered=[2, 3, 4, 5], later=[1])
    assert order_breaks(ROWS, outcome) == [(1, 3)]


def test_rows_held_back_behind_their_key_or_of_other_keys_and_topics_are_no_break():
    assert order_breaks(ROWS, Outcome(delivered=[2, 4, 5], failed={1: "x"}, skipped=[3])) == []
    assert order_breaks(ROWS, Outcome(delivered=[1, 2, 3, 5], later=[4])) == []  # keyless
    assert order_breaks(ROWS, Outcome(delivered=[1, 2, 3, 4, 5])) == []


class _Producer:
    """Acknowledges at once what is produced."""

    def __init__(self):
        self.sent, self.reports = [], []

    def produce(self, topic, value, key, headers, on_delivery):
        self.sent.append(dict(headers)["message_id"].decode())
        self.reports.append(on_delivery)

    def flush(self, _timeout):
        while self.reports:
            self.reports.pop(0)(None, None)


class _Clock:
    """The relay's wall clock, moved by hand (its monotonic clock stays real)."""

    def __init__(self):
        import time

        self.now = time.time()
        self.monotonic = time.monotonic

    def time(self) -> float:
        return self.now


class _SlowTopics:
    """A topic's limits that take a while to read (Kafka away): each look moves the
    clock on by 0.3 s."""

    def __init__(self, clock: _Clock):
        self.clock = clock

    def get(self, topic, fresh=False):
        from outbox_bridge.outbox.kafka import TopicInfo

        self.clock.now += 0.3
        return TopicInfo()


def test_a_row_past_its_expiry_is_not_produced_even_if_it_expired_while_the_relay_waited(
    monkeypatch,
):
    from datetime import datetime, timezone

    from outbox_bridge.message import format_time
    from outbox_bridge.outbox import kafka
    from outbox_bridge.outbox.kafka import Relay

    clock = _Clock()
    monkeypatch.setattr(kafka, "time", clock)

    def expiring(i: int, seconds: float) -> Row:
        at = datetime.fromtimestamp(clock.now + seconds, timezone.utc)
        return Row(i, f"m{i}", "t", b"a", b"v", [["expires_at", format_time(at)]])

    relay = Relay.__new__(Relay)
    relay.producer, relay.topics, relay.before_produce = _Producer(), _SlowTopics(clock), None
    relay.timeout, relay.broken = 30.0, False
    rows = [expiring(1, -1), expiring(2, 0.15), _row(3, b"a"), expiring(4, 60)]
    outcome = relay.deliver(rows)
    # 1 had expired, 2 expired while its topic's limits were read; neither holds key a
    assert (outcome.expired, outcome.delivered) == ([1, 2], [3, 4])
    assert relay.producer.sent == ["m3", "m4"]
    assert outcome.out_of_order == []
