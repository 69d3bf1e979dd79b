"""Long-running loops: restart backoff that starts over after a healthy run, and
commit errors of a rebalance that are not errors."""

import threading

import pytest
from confluent_kafka import KafkaError, KafkaException

from outbox_bridge import loops
from outbox_bridge.inbox.consumer import commit_offsets


def test_restart_backoff_grows_on_quick_failures_and_starts_over_after_a_healthy_run(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(loops.time, "monotonic", lambda: clock[0])
    stop = threading.Event()
    delays = []
    runs = iter([1, 1, 1, 120, 1])  # seconds each run lasts before it fails

    def body(_stop):
        try:
            clock[0] += next(runs)
        except StopIteration:
            stop.set()
            return
        raise RuntimeError("boom")

    monkeypatch.setattr(stop, "wait", lambda delay: delays.append(delay))
    loops.run_forever(body, stop, "test loop")
    assert delays == [0.5, 1.0, 2.0, 0.5, 1.0]


class _Consumer:
    def __init__(self, code):
        self.code = code

    def commit(self, offsets, asynchronous):
        raise KafkaException(KafkaError(self.code))


class _Msg:
    def topic(self):
        return "t"

    def partition(self):
        return 0

    def offset(self):
        return 5


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError._TRANSPORT,
    ],
)
def test_a_commit_refused_by_a_rebalance_or_a_moving_coordinator_is_skipped(code):
    # the soak found NOT_COORDINATOR after a Kafka restart stopping the consumer loop
    assert commit_offsets(_Consumer(code), [_Msg()]) is False


def test_other_commit_errors_still_raise():
    with pytest.raises(KafkaException):
        commit_offsets(_Consumer(KafkaError.GROUP_AUTHORIZATION_FAILED), [_Msg()])


def test_again_later_sends_the_same_work_without_spending_a_retry():
    from types import SimpleNamespace

    from outbox_bridge.shardtask import again_later

    sent = []
    task = SimpleNamespace(
        name="t",
        request=SimpleNamespace(args=([1, 2], "tok"), kwargs={}, retries=3),
        apply_async=lambda args, kwargs, **options: sent.append((args, kwargs, options)),
    )
    again_later(task, 1.5, "database away")
    assert sent == [(([1, 2], "tok"), {}, {"countdown": 1.5, "retries": 3})]
