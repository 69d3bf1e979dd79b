"""The shard-task pieces both sides share, without services: when a task gives its
shards back, what a round does with what it finds, which failed rows become
heads, what the relay makes of Kafka's reports, and each queue's share of the
pool. (The same behaviour runs against the real services in the integration
and acceptance tests.)"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from confluent_kafka import KafkaError

from outbox_bridge import shardtask
from outbox_bridge.config import Settings
from outbox_bridge.outbox import Row, kafka
from outbox_bridge.outbox.tasks import first_per_key
from outbox_bridge.queue import Renewed
from outbox_bridge.worker import maintenance
from outbox_bridge.worker.dispatcher import free_tasks


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(shardtask.time, "monotonic", fake)
    return fake


def test_a_lingering_task_looks_again_until_it_was_quiet_for_linger_seconds(clock):
    linger = shardtask.Linger(Settings(linger_seconds=0.1, linger_max_seconds=0.5))
    assert linger.adopt
    assert linger.idle()  # quiet just now: look again
    clock.now += 0.05
    assert linger.idle()
    clock.now += 0.06
    assert not linger.idle()  # quiet for 0.11 s: give the shards back
    linger.busy()
    assert linger.idle()  # rows came: the quiet time starts over


def test_a_lingering_task_gives_its_shards_back_after_linger_max_seconds(clock):
    linger = shardtask.Linger(Settings(linger_seconds=0.1, linger_max_seconds=0.5))
    assert not linger.over(full=False)
    clock.now += 0.5
    assert linger.over(full=False)  # its budget is spent: other queues get their turn
    assert not linger.over(full=True)  # a backlog keeps it, up to a third of the lease
    clock.now += 10.0
    assert linger.over(full=True)


def test_without_linger_a_task_runs_one_batch():
    linger = shardtask.Linger(Settings(linger_seconds=0))
    assert not linger.adopt
    assert not linger.idle()
    assert linger.over(full=False)
    assert not linger.over(full=True)


def test_only_the_oldest_failed_row_of_a_key_becomes_a_head_keyless_ones_each():
    rows = {
        1: Row(1, "m1", "t", b"a", b"", None),
        2: Row(2, "m2", "t", b"a", b"", None),
        3: Row(3, "m3", "u", b"a", b"", None),  # same key, other topic: a key of its own
        4: Row(4, "m4", "t", None, b"", None),
        5: Row(5, "m5", "t", None, b"", None),
    }
    heads = first_per_key(rows, {2: "x", 1: "y", 3: "z", 4: "k", 5: "l"})
    assert heads == {1: "y", 3: "z", 4: "k", 5: "l"}  # row 2 waits behind row 1


def test_held_keys_hold_keys_never_keyless_rows():
    held = shardtask.HeldKeys()
    held.add("t", b"a")
    held.add("t", None)
    assert held.holds("t", b"a")
    assert not held.holds("u", b"a")
    assert not held.holds("t", None)


@pytest.mark.parametrize(
    ("parallel", "busy", "active", "free"),
    [
        (4, 1, 0, 4),  # alone: the whole pool
        (4, 2, 0, 2),  # two busy queues share it
        (4, 2, 2, 0),  # its tasks fill its share: no new task
        (4, 8, 0, 1),  # more queues than tasks: one each, at least
        (4, 8, 1, 0),
        (2, 0, 0, 2),
    ],
)
def test_each_busy_queue_gets_an_equal_share_of_the_pool(parallel, busy, active, free):
    assert free_tasks(parallel, busy, active) == free


# -- next_round, on a queue that records what it was asked ----------------------------
@dataclass
class FakeQueue:
    owned: list[int] = field(default_factory=lambda: [1, 2])
    recovering: list[int] = field(default_factory=list)
    region: list[int] = field(default_factory=list)
    calls: list[tuple] = field(default_factory=list)

    limits: dict[int, int | None] = field(default_factory=dict)

    def renew_round(self, cur, shards, token, lease, adopt, limit=None):
        self.calls.append(("renew", adopt, limit))
        return Renewed(self.owned, self.recovering, self.limits)

    def suspects(self, cur, shards, limit, skip_topics=()):
        self.calls.append(("suspects", list(shards), limit))
        return self.region

    def recovered(self, cur, shards, token, limit=None):
        self.calls.append(("recovered", list(shards), limit))

    def release(self, cur, shards, token, pause=0.0, held=(), recheck=None, skip_topics=()):
        self.calls.append(("release", list(held), recheck, list(skip_topics)))


def fetcher(batch):
    def fetch(cur, owned, skip, limit):
        return batch[:limit], False

    return fetch


def round_of(queue, batch=(), suspect=False, skip=None, linger=0.0, size=None):
    clock = shardtask.Linger(Settings(linger_seconds=linger))
    return shardtask.next_round(
        None, queue, Settings(), "tok", [1, 2], clock, fetcher(list(batch)), suspect, skip, size
    )


def test_a_round_whose_shards_are_gone_is_stale():
    queue = FakeQueue(owned=[])
    assert round_of(queue, [10]).stale
    assert [c[0] for c in queue.calls] == ["renew"]


def test_a_round_hands_out_its_batch():
    found = round_of(FakeQueue(), [10, 11])
    assert found.batch == [10, 11] and found.owned == [1, 2]
    assert not (found.stale or found.idle or found.released or found.solo)


def test_a_recovering_shard_first_runs_what_its_dead_owner_had_one_at_a_time():
    queue = FakeQueue(recovering=[2], region=[7, 8])
    found = round_of(queue, [10])
    assert found.solo == [7, 8] and found.recovering == [2] and not found.batch
    queue = FakeQueue(recovering=[2], region=[])
    assert round_of(queue, [10]).batch == [10]
    assert ("recovered", [2], Settings().batch_size) in queue.calls  # nothing suspect left


def test_a_recovery_region_is_what_a_round_of_the_dead_owner_fetched():
    size = shardtask.RoundSize("unit.region", 2000, first=50)
    queue = FakeQueue(recovering=[2], region=[7], limits={1: None, 2: 120})
    round_of(queue, [10], size=size)
    # the renewal records this task's bound (this round and the next), the region is
    # the dead owner's, and nothing is fetched
    assert queue.calls == [("renew", False, 100), ("suspects", [2], 120)]
    queue = FakeQueue(recovering=[2], region=[7], limits={2: None})
    round_of(queue, [10], size=size)
    assert queue.calls[-1] == ("suspects", [2], Settings().batch_size)  # unknown: a batch


def test_a_round_size_follows_what_runs_in_the_round_budget():
    size = shardtask.RoundSize("unit.size", 2000, first=64)
    size.after(fetched=64, ran=64, cut=False, seconds=0.1)
    assert (size.n, size.bound) == (128, 256)  # full and quick: double
    size.after(fetched=128, ran=128, cut=False, seconds=0.7)
    assert size.n == 128  # full, more than half the budget: keep
    size.after(fetched=128, ran=90, cut=True, seconds=1.0)
    assert size.n == 90  # cut by the budget: what ran
    size.after(fetched=30, ran=30, cut=False, seconds=0.1)
    assert size.n == 90  # not full: keep
    assert shardtask.RoundSize("unit.size", 2000).n == 90  # the next task starts there
    assert shardtask.RoundSize("unit.small", 10).bound == 10  # never past batch_size


def test_a_redelivered_task_treats_every_shard_as_recovering():
    queue = FakeQueue(region=[7])
    found = round_of(queue, [10], suspect=True)
    assert found.solo == [7] and found.recovering == [1, 2]
    assert queue.calls[0] == ("renew", False, None)  # its first run's bound is kept


def test_an_empty_round_lingers_then_gives_the_shards_back_as_held():
    queue = FakeQueue()
    assert round_of(queue, [], linger=0.1).idle
    assert not any(c[0] == "release" for c in queue.calls)
    queue = FakeQueue()
    found = round_of(queue, [], skip={"paused": 3.0, "other": 1.5})
    assert found.released
    # held: looked at again when a key is released, a row arrives or a pause ends
    assert queue.calls[-1] == ("release", [1, 2], 1.5, ["paused", "other"])


# -- the relay's classification of Kafka's reports, with a fake producer ---------------
class FakeProducer:
    """Reports each produced row at once, with the error ``errors`` names for it."""

    def __init__(self, errors: dict[bytes, KafkaError]):
        self.errors = errors
        self.produced: list[bytes] = []

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        self.produced.append(value)
        on_delivery(self.errors.get(value), None)

    def flush(self, timeout=None):
        return 0

    def poll(self, timeout=None):
        return 0


class NoLimits:
    def get(self, topic, fresh=False):
        return kafka.TopicInfo()


def relay_with(errors):
    relay = object.__new__(kafka.Relay)
    relay.settings, relay.timeout, relay.broken = Settings(), 30.0, False
    relay.producer, relay.topics, relay.before_produce = FakeProducer(errors), NoLimits(), None
    return relay


def row(n, topic="t", key=b"k"):
    return Row(n, f"m{n}", topic, key, str(n).encode(), None)


def test_kafkas_reports_are_delivered_failed_or_wait():
    relay = relay_with(
        {
            b"2": KafkaError(KafkaError.INVALID_RECORD),  # this record: charged, retried
            b"3": KafkaError(KafkaError.LEADER_NOT_AVAILABLE),  # the topic: waits, uncharged
        }
    )
    out = relay.deliver(
        [row(1, key=b"a"), row(2, key=b"b"), row(3, "gone", b"c"), row(4, "gone", b"d")]
    )
    assert out.delivered == [1]
    assert list(out.failed) == [2]
    assert out.paused_topics.keys() == {"gone"}
    assert out.later == [3, 4]  # the paused topic's later row is not even produced
    assert relay.producer.produced == [b"1", b"2", b"3"]
    assert out.fatal is None and not relay.broken


def test_a_row_that_fails_before_it_is_sent_holds_the_later_rows_of_its_key():
    def refuse_the_first(r: Row) -> None:
        if r.id == 1:
            raise ValueError("bad")

    relay = relay_with({})
    relay.before_produce = refuse_the_first
    out = relay.deliver([row(1), row(2), row(3, key=b"other"), row(4)])
    assert out.failed == {1: "ValueError: bad"}
    assert out.skipped == [2, 4]  # never sent ahead of their failed head
    assert out.delivered == [3]


def test_a_fatal_producer_error_leaves_the_rest_waiting_and_rebuilds_the_producer():
    relay = relay_with({b"1": KafkaError(KafkaError._FATAL, fatal=True)})
    out = relay.deliver([row(1, key=b"a"), row(2, key=b"b")])
    assert out.fatal and out.later == [1, 2] and not out.failed
    assert relay.broken


# -- maintenance jobs --------------------------------------------------------------------
class Counting(maintenance.Job):
    def __init__(self, name, interval, start_after=0.0, fails=False):
        self.name, self.interval, self.start_after, self.fails = name, interval, start_after, fails
        self.runs = 0

    def run_once(self, cur):
        self.runs += 1
        if self.fails:
            raise RuntimeError("a bug in one job")
        return 2


def test_the_maintainer_runs_each_job_when_due_and_one_failing_job_stops_no_other(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(maintenance.time, "monotonic", clock)
    often, rare, broken = (
        Counting("often", 1.0),
        Counting("rare", 10.0, 10.0),
        Counting("x", 1.0, fails=True),
    )
    jobs = maintenance.Maintainer([broken, often, rare])
    assert jobs.run_due(None) == 2  # "rare" waits its first interval
    assert (often.runs, rare.runs, broken.runs) == (1, 0, 1)
    clock.now += 0.5
    assert jobs.run_due(None) == 0
    clock.now += 10.0
    assert jobs.run_due(None) == 4
    assert (often.runs, rare.runs, broken.runs) == (2, 1, 2)


def test_a_database_error_in_a_job_goes_to_its_loop(monkeypatch):
    import psycopg2

    class Lost(maintenance.Job):
        name = "lost"

        def run_once(self, cur):
            raise psycopg2.OperationalError("server closed the connection")

    with pytest.raises(psycopg2.OperationalError):
        maintenance.Maintainer([Lost()]).run_due(None)


def test_a_poked_job_runs_soon_but_not_sooner_than_its_gap_after_its_last_run():
    import time

    from outbox_bridge.worker.maintenance import Job, Maintainer

    class Count(Job):
        name, interval = "count", 60.0
        runs = 0

        def run_once(self, cur):
            Count.runs += 1
            return 0

    jobs = Maintainer([Count()])
    jobs.run_due(None)
    assert Count.runs == 1 and jobs.next_due() > time.monotonic() + 50
    jobs.poke("count", gap=0.2)  # busy: not before 0.2 s after the last run
    assert abs(jobs.next_due() - (jobs.last_run["count"] + 0.2)) < 1e-9
    jobs.run_due(None)
    assert Count.runs == 1  # too soon
    from tests.conftest import wait_for

    wait_for(lambda: time.monotonic() >= jobs.next_due(), 5, "the gap to pass")
    jobs.run_due(None)
    assert Count.runs == 2
    jobs.poke("count")  # no gap: at the next look
    assert jobs.next_due() <= time.monotonic()


def test_a_crowded_task_gives_its_shards_back_after_linger_max_even_in_a_backlog():
    settings = Settings(linger_seconds=0.1, linger_max_seconds=0.5, lease_seconds=30)
    clock = shardtask.Linger(settings)
    assert clock.over(True, crowded=True) is False  # before linger_max_seconds: goes on
    clock.started -= 0.6
    assert clock.over(True, crowded=True) is True
    assert clock.over(True, crowded=False) is False  # alone in a backlog: until lease / 3
    clock.deadline -= 10.1
    assert clock.over(True, crowded=False) is True
