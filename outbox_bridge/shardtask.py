"""What the shard tasks of both sides share: the sources the dispatcher serves, when
a task gives its shards back (``Linger``), a task's own retry schedule, and which
database errors are worth another attempt.

A shard task owns whole shards of one queue through a claim, handles their rows
in id order, and lingers while rows keep coming, so that a busy period costs one
round trip dispatcher -> broker -> task -> release, not one per batch. It gives
its shards back after ``linger_seconds`` without rows, after
``linger_max_seconds`` (so that tasks of other queues waiting for a pool
process get their turn), or, while a backlog lasts, after a third of the lease,
or after ``linger_max_seconds`` when its queue has more tasks at work than its
share of the pool (``crowded``).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from celery.utils.time import get_exponential_backoff_interval

from .config import Settings
from .db import drop_task_connection, is_transient, task_connection, work
from .errors import TransientError
from .queue import Queue, fire_dead

log = logging.getLogger(__name__)

# A handler round starts no further delivery after this long: its transaction stays
# short, and a share of the fleet that changed applies at the next round.
ROUND_SECONDS = 1.0


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
    # the Celery queue of the task when this process does not have it (None: default)
    route: str | None = None

    def apply(self, app: Any, name: str, args: tuple, **options: Any) -> None:
        """Send task ``name``: as this process knows it, else by name to ``route``."""
        task = app.tasks.get(name)
        if task is not None:
            task.apply_async(args, **options)
        else:
            app.send_task(name, args, queue=self.route, **options)


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


# and a function that lists the sources some connected worker serves (from the database)
_served: list[Callable[[Any, Settings], list[Source]]] = []


def provides_served(
    finder: Callable[[Any, Settings], list[Source]],
) -> Callable[[Any, Settings], list[Source]]:
    """Register ``finder(cur, settings) -> [Source]``: the sources the fleet serves, also
    those this process lacks (the elected dispatcher serves them too)."""
    if finder not in _served:
        _served.append(finder)
    return finder


def served_sources(cur: Any, settings: Settings) -> list[Source]:
    return [source for finder in _served for source in finder(cur, settings)]


class Linger:
    """When a shard task gives its shards back (see the module doc)."""

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

    def over(self, full: bool, crowded: bool = False) -> bool:
        """After a batch: whether to give the shards back now (``full``: more rows wait;
        ``crowded``: the queue has more tasks at work than its share, so another
        queue's task waits for a pool process: it gets it after ``linger_max_seconds``
        even during a backlog)."""
        now = time.monotonic()
        if now > self.deadline:
            return True
        if full:
            return crowded and now - self.started >= self.budget
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
        task.apply_async(
            task.request.args,
            task.request.kwargs,
            countdown=countdown,
            retries=task.request.retries,
        )
        log.warning("%s: %s; again in %.1fs (not counted as a retry)", task.name, why, countdown)
    except Exception:  # noqa: BLE001
        log.exception("%s: could not send it again; the lease brings its work back", task.name)


def transient_countdown(pause_seconds: float) -> float:
    """How long to wait after a transient error: about a pause, spread out."""
    return pause_seconds * (1 + random.random())


# -- the shard-task loop, shared by the publish task and the handler tasks --------
@dataclass
class Round:
    """What one round of a shard task found (``next_round``): a batch to process, the
    rows a dead owner may have had in hand (``solo``), or nothing (``idle``: look
    again after ``Linger.wait``; ``released``: the shards went back as all held;
    ``stale``: they are no longer ours)."""

    owned: list[int]
    batch: list[Any] = field(default_factory=list)
    full: bool = False  # the shards may have more
    solo: list[int] = field(default_factory=list)
    recovering: list[int] = field(default_factory=list)
    idle: bool = False
    released: bool = False
    stale: bool = False
    crowded: bool = False  # more tasks of the queue at work than its share (Linger.over)


class RoundSize:
    """How many rows a round of a shard task fetches: at most ``most``; after a round
    that its budget (``ROUND_SECONDS``) cut, what ran in it; doubled after a full
    round done in half of it. Kept per task name in this process, so that a new
    task starts where the last one ended.

    Each round's renewal records ``bound`` with the claim (``Queue.renew``): when the
    owner dies, only that many rows of its shard run one per transaction before the
    shard goes on in batches (``one_at_a_time``), not a whole ``batch_size``."""

    last: dict[str, int] = {}

    def __init__(self, name: str, most: int, first: int = 64):
        self.name = name
        self.most = max(1, most)
        self.n = min(self.most, self.last.get(name, first))

    @property
    def bound(self) -> int:
        """At least this round's size and the next one's."""
        return min(self.most, 2 * self.n)

    def after(self, fetched: int, ran: int, cut: bool, seconds: float) -> None:
        """Size the next round by this one: ``fetched`` rows, ``ran`` of them run."""
        if cut:
            self.n = max(1, min(self.most, ran))
        elif fetched >= self.n and seconds < ROUND_SECONDS / 2:
            self.n = min(self.most, 2 * self.n)
        self.last[self.name] = self.n


def next_round(
    cur: Any,
    queue: Queue,
    settings: Settings,
    token: Any,
    owned: list[int],
    clock: Linger,
    fetch: Callable[[Any, list[int], list[str], int], tuple[list[Any], bool]],
    suspect: bool = False,
    skip: dict[str, float] | None = None,
    size: RoundSize | None = None,
) -> Round:
    """The first half of every round, in the round's transaction: renew the claim
    (taking on ready free shards while lingering), find what a dead owner of a
    recovering shard may have had in hand (``suspect``: treat every shard so, a
    redelivered task message), else ``fetch(cur, owned, skip_topics, limit)`` the
    next batch of at most ``limit`` rows (``size``; None: ``batch_size``); with
    none, linger or give the shards back as all held. ``skip``: paused topics and
    the seconds their pause still runs."""
    skip = skip or {}
    limit, bound = (size.n, size.bound) if size else (settings.batch_size, settings.batch_size)
    # a redelivered task keeps the bound its first run recorded: that run's region
    renewed = queue.renew_round(
        cur, owned, token, settings.lease_seconds, clock.adopt, None if suspect else bound
    )
    owned, recovering = renewed.owned, renewed.recovering
    if not owned:
        return Round(owned, stale=True)
    if suspect:
        recovering = owned
    if recovering:
        most = renewed.region_limit(recovering, settings.batch_size)
        region = queue.suspects(cur, recovering, most, skip_topics=list(skip))
        if region:
            return Round(owned, solo=region, recovering=recovering)
        queue.recovered(cur, recovering, token, bound)
    batch, full = fetch(cur, owned, list(skip), limit)
    if batch:
        clock.busy()
        return Round(owned, batch, full, crowded=renewed.crowded)
    if clock.idle():
        return Round(owned, idle=True)
    # every pending row is held back by its key, or its topic is paused: look
    # again when a key is released, a row arrives or a pause ends
    recheck = min(skip.values()) if skip else None
    queue.release(cur, owned, token, held=owned, recheck=recheck, skip_topics=list(skip))
    return Round(owned, released=True)


class HeldKeys:
    """The keys a round holds back behind a head that failed in it (keyless rows
    never wait)."""

    def __init__(self) -> None:
        self.keys: set[tuple[str, bytes]] = set()

    def holds(self, topic: str, key: bytes | None) -> bool:
        return key is not None and (topic, key) in self.keys

    def add(self, topic: str, key: bytes | None) -> None:
        if key is not None:
            self.keys.add((topic, key))


def one_at_a_time(
    queue: Queue,
    settings: Settings,
    what: str,
    token: Any,
    owned: list[int],
    recovering: list[int],
    ids: list[int],
    lease: float,
    attempt: Callable[[int, str], float | None],
    retry: Callable[[int, str, float], None],
    deadline: float,
) -> str:
    """Run ``ids`` one per transaction: each becomes a retrying head of its own and
    its attempt is counted (committed) before ``attempt(id, retry_token)`` runs it,
    so one that kills its process again, hangs or fails at COMMIT is retried on
    its own schedule and dead after its retries, while the other keys go on.
    ``attempt`` returns None when it went through, else the countdown of its retry
    (``retry(id, retry_token, countdown)`` sends it); the later rows of its key
    wait. Then the ``recovering`` shards are past what their dead owner had.

    Returns "done"; "cut" when the task's ``deadline`` (monotonic) came first: the
    shards are given back still recovering, and their next owner goes on with the
    rest (a region of a whole batch, a row per transaction, can outlast the task's
    time limit: ended there, it would start again from the same rows); "stale": the
    shards are no longer ours."""
    conn = task_connection(settings)
    with work(conn, settings, what) as cur:
        keys = queue.keys_of(cur, ids)
    held = HeldKeys()
    for n, row_id in enumerate(ids):
        if row_id not in keys or held.holds(*keys[row_id]):
            continue  # gone, or behind its key's head that failed just now
        if n and time.monotonic() > deadline:
            log.info(
                "%s: shards %s given back at the task's deadline; its recovery goes on"
                " in the next task (%d deliveries left)",
                what,
                owned,
                len(ids) - n,
            )
            with work(conn, settings, what) as cur:
                queue.still_recovering(cur, recovering, token)
                queue.release(cur, owned, token)
            return "cut"
        retry_token = str(uuid.uuid4())
        with work(conn, settings, what) as cur:
            if not queue.renew(cur, owned, token, settings.lease_seconds):
                return "stale"
            queue.hold(cur, {row_id: "runs on its own"}, retry_token, lease, count=False)
            started = queue.start_held(cur, [row_id], retry_token, lease)
        if not started:
            continue
        countdown = attempt(row_id, retry_token)
        if countdown is not None:
            held.add(*keys[row_id])
            retry(row_id, retry_token, countdown)
    with work(conn, settings, what) as cur:
        queue.recovered(cur, recovering, token)  # the next round's renewal records its bound
    return "done"


def enqueue_retry(task: Any, ids: list[int], token: Any, *, countdown: float, retries: int) -> None:
    """Send the retry of held rows ``ids`` of ``token``; if that fails, the dispatcher
    re-drives them after their lease (PostgreSQL keeps them)."""
    try:
        task.apply_async((list(ids), str(token)), countdown=countdown, retries=retries)
    except Exception:  # noqa: BLE001
        log.exception("%s: could not enqueue the retry of rows %s", task.name, list(ids)[:10])


def bury_spent(
    queue: Queue,
    settings: Settings,
    what: str,
    ids: list[int],
    token: Any,
    error: str,
    max_retries: int | None,
) -> int:
    """After a retry task's last attempt failed: its rows that used up their own
    attempts become dead (idempotent); a row whose task ran out of retries for
    another reason is re-driven after its lease. Fires ``dead`` after the commit."""
    conn = task_connection(settings)
    conn.rollback()
    with work(conn, settings, what) as cur:
        dead = queue.bury(cur, ids, token, error, max_retries)
    if dead:
        log.error("%d rows of %s are dead after their last retry: %s", len(dead), queue.name, error)
        fire_dead(dead)
    return len(dead)
