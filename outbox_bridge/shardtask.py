"""What the shard tasks of both sides share: the sources the dispatcher serves, when
a task gives its shards back (``Linger``), a task's own retry schedule, and which
database errors are worth another attempt.

A shard task owns whole shards of one queue through a claim, handles their rows
in id order, and lingers while rows keep coming, so that a busy period costs one
round trip dispatcher -> broker -> task -> release, not one per batch. It gives
its shards back after ``linger_seconds`` without rows, after
``linger_max_seconds`` (so that tasks of other queues waiting for a pool
process get their turn), or, while a backlog lasts, after a third of the lease.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
from celery.utils.time import get_exponential_backoff_interval

from .config import Settings
from .db import drop_task_connection, is_transient
from .errors import TransientError
from .queue import Queue

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One queue the dispatcher serves, and the names of the Celery tasks that do.

    ``task`` gets (shards, token) (``batch_size`` 0: it fetches its rows itself)
    or (ids, token, shards) (the dispatcher sends the ids of up to ``batch_size``
    rows of the claimed shards); ``retry_task`` gets (ids, token)."""

    queue: Queue
    task: str
    retry_task: str
    max_retries: int
    batch_size: int = 0


# each side registers a function that lists its sources (when its tasks are imported)
_finders: list[Callable[[Settings], list[Source]]] = []


def provides(finder: Callable[[Settings], list[Source]]) -> Callable[[Settings], list[Source]]:
    """Register ``finder(settings) -> [Source]``: the dispatcher serves what it lists."""
    if finder not in _finders:
        _finders.append(finder)
    return finder


def sources(settings: Settings) -> list[Source]:
    """Every registered source, in registration order."""
    return [source for finder in _finders for source in finder(settings)]


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


def backoff(task: Any, retries: int, jitter: bool | None = None) -> float:
    """The countdown Celery's autoretry waits before retry ``retries + 1`` of ``task``,
    from the task's own ``retry_backoff``, ``retry_backoff_max`` and ``retry_jitter``."""
    factor = float(getattr(task, "retry_backoff", False) or 0)
    if not factor:
        return float(task.default_retry_delay or 0)
    return get_exponential_backoff_interval(
        factor=int(max(1.0, factor)),
        retries=retries,
        maximum=int(getattr(task, "retry_backoff_max", 600)),
        full_jitter=getattr(task, "retry_jitter", True) if jitter is None else jitter,
    )


def lease_for(task: Any, retries: int, lease_seconds: float) -> float:
    """How long a retrying row stays owned by its retry task: the longest countdown
    before retry ``retries + 1`` plus a lease, so nobody re-drives it early."""
    return backoff(task, retries, jitter=False) + lease_seconds


def reraise_database_error(exc: BaseException) -> None:
    """After a database error in a task: drop this thread's connection and raise
    ``TransientError`` (which the tasks retry) when another attempt may succeed.
    Other errors are left to the caller."""
    if not isinstance(exc, psycopg2.Error):
        return
    drop_task_connection()
    if is_transient(exc):
        raise TransientError(f"{type(exc).__name__}: {str(exc).strip()}") from exc


def again_later(task: Any, countdown: float, why: object) -> None:
    """Send ``task`` again with the same arguments and the same retry count: the
    work did not fail, its surroundings did (the database or a topic is away), so
    its own retry budget (``max_retries``) is not spent. If even that send fails,
    the lease brings the work back to the watcher."""
    try:
        task.apply_async(task.request.args, task.request.kwargs, countdown=countdown,
                         retries=task.request.retries)  # fmt: skip
        log.warning("%s: %s; again in %.1fs (not counted as a retry)", task.name, why, countdown)
    except Exception:  # noqa: BLE001
        log.exception("%s: could not send it again; the lease brings its work back", task.name)


def transient_countdown(pause_seconds: float) -> float:
    """How long to wait after a transient error: about a pause, spread out."""
    return pause_seconds * (1 + random.random())
