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
