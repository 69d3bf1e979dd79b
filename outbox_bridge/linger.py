"""When a task that holds shards gives them back.

A task that found work keeps its shards and looks again every ``linger_poll``
seconds while rows keep coming, so that a busy period costs one round trip
watcher -> broker -> task -> release, not one per batch. It gives them back
after ``linger_seconds`` without rows, after ``linger_max_seconds`` (so that
tasks of other queues waiting for a pool process get their turn), or, while a
backlog lasts, after a third of the lease.
"""

from __future__ import annotations

import time

from .config import Settings


class Linger:
    def __init__(self, settings: Settings):
        self.started = time.monotonic()
        self.idle_for = settings.linger_seconds
        self.budget = settings.linger_max_seconds
        self.poll = settings.linger_poll
        self.deadline = self.started + settings.lease_seconds / 3
        self.quiet_since: float | None = None

    @property
    def adopt(self) -> bool:
        """Whether to take on free shards that become ready (only when lingering)."""
        return self.idle_for > 0

    def busy(self) -> None:
        self.quiet_since = None

    def idle(self) -> bool:
        """No rows now: True to wait() and look again, False to give the shards back."""
        now = time.monotonic()
        if self.quiet_since is None:
            self.quiet_since = now
        return now - self.quiet_since < self.idle_for and now - self.started < self.budget

    def wait(self) -> None:
        time.sleep(self.poll)

    def over(self, full: bool) -> bool:
        """After a batch: whether to give the shards back now (``full``: more rows wait)."""
        now = time.monotonic()
        if now > self.deadline:
            return True
        if full:
            return False
        return not self.idle_for or now - self.started >= self.budget
