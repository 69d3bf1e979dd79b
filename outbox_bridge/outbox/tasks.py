"""The Celery tasks that move outbox rows to Kafka.

``publish`` drains one claimed shard in batches: fetch the oldest rows, produce
them, wait for every delivery report, delete what Kafka acknowledged, all in
one transaction that also renews the claim. Rows that Kafka refuses on their
own go to ``retry``, which re-drives exactly those rows with Celery's
``autoretry_for`` / ``retry_backoff`` / ``max_retries``; after the last retry
they are dead. A topic that cannot take messages now (unknown, no leader, not
authorized, timing out) pauses on its own: the fetch skips it, no attempt is
charged, and every other topic goes on (a circuit breaker per topic, kept in
PostgreSQL).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import psycopg2
from celery import Task, signals

from ..config import Settings, get_settings
from ..db import drop_task_connection, is_transient, task_connection, work
from ..errors import DeliveryFailed, TransientError
from ..events import around, emit
from ..queries import render
from ..queue import Queue, fire_dead
from ..shardtask import (
    Linger,
    Source,
    again_later,
    backoff,
    bury_spent,
    enqueue_retry,
    lease_for,
    next_round,
    one_at_a_time,
    provides,
    reraise_database_error,
    transient_countdown,
)
from ..watchdog import paused
from ..worker.app import app
from . import outbox_queue
from .kafka import Outcome, get_relay, reset_relay

log = logging.getLogger(__name__)

PUBLISH_TASK = "outbox_bridge.outbox.publish"
RETRY_TASK = "outbox_bridge.outbox.retry"

_settings = get_settings()


def in_lease(settings: Settings) -> float:
    """When a round that renewed its lease just now must have Kafka's last report
    (``time.monotonic()``): a quarter of the lease is left to commit, so no row of
    the round is still in the producer when the lease ends and a next owner may
    send the same key's rows."""
    return time.monotonic() + settings.lease_seconds * 0.75


@provides
def outbox_sources(settings: Settings) -> list[Source]:
    """The outbox, served by the publish task and its retry task."""
    return [Source(outbox_queue(settings), PUBLISH_TASK, RETRY_TASK, settings.max_retries)]


def first_per_key(rows_by_id: dict[int, Any], failed: dict[int, str]) -> dict[int, str]:
    """Failed rows that become retrying heads: the oldest per key, every keyless one."""
    heads: dict[int, str] = {}
    seen: set[tuple[str, bytes]] = set()
    for row_id in sorted(failed):
        row = rows_by_id[row_id]
        if row.key is not None:
            if (row.topic, row.key) in seen:
                continue  # stays pending, held back by its head
            seen.add((row.topic, row.key))
        heads[row_id] = failed[row_id]
    return heads


# -- the circuit breaker, one per topic -----------------------------------------
MAX_DOUBLINGS = 30  # pause_seconds * 2^30 is past any sane pause_max_seconds
MAX_PAUSES = 1_000_000  # the count of consecutive pauses a pause row keeps, at most


def paused_topics(cur, settings: Settings) -> dict[str, float]:
    """Every topic with a pause row -> seconds its pause still runs (<= 0: over)."""
    cur.execute(render("outbox.topic_pauses", settings.schema))
    return {topic: float(left) for topic, left in cur.fetchall()}


def pause_topics(cur, settings: Settings, reasons: dict[str, str]) -> list[tuple[str, float]]:
    """Pause these topics, each for longer than its last pause; returns (topic, seconds).

    The pause doubles up to ``pause_max_seconds``; the exponent stops at
    MAX_DOUBLINGS and the count at MAX_PAUSES, so a topic that stays away for
    months never overflows the arithmetic (2 ^ 1024 is out of range)."""
    cur.execute(
        render("outbox.pause_topics", settings.schema),
        {
            "base": settings.pause_seconds,
            "max": settings.pause_max_seconds,
            "cap": MAX_PAUSES - 1,
            "doublings": MAX_DOUBLINGS,
            "topics": list(reasons),
            "errors": list(reasons.values()),
        },
    )
    return cur.fetchall()


def resume_topics(cur, settings: Settings, topics: set[str]) -> None:
    if topics:
        cur.execute(render("outbox.resume_topics", settings.schema), {"topics": list(topics)})


@app.task(
    bind=True, name=PUBLISH_TASK, autoretry_for=(TransientError,), retry_backoff=True, max_retries=5
)
def publish(self: Task, shards: list[int], token: str) -> dict:
    """Drain the claimed ``shards`` while ``token`` still owns them, and linger: keep
    them (and take on free shards that become ready) while rows keep coming."""
    settings = get_settings()
    queue = outbox_queue(settings)
    stats = {"shards": shards, "delivered": 0, "failed": 0, "batches": 0}
    clock = Linger(settings)
    first_lease = lease_for(retry, 0, settings.lease_seconds)
    owned = list(shards)
    # a task message delivered again: its first run may have died inside a batch
    suspect = bool((self.request.delivery_info or {}).get("redelivered"))

    def fetch(cur, owned: list[int], skip: list[str], limit: int) -> tuple[list, bool]:
        rows, full = queue.fetch(cur, owned, limit, settings.batch_bytes, skip)
        return rows, bool(full)

    try:
        conn = task_connection(settings)
        while True:
            relay = get_relay(settings)  # a new producer after a fatal error
            retry_ids: list[int] = []
            retry_token = uuid.uuid4()
            sent: tuple | None = None  # (rows, outcome, acked at), for the metrics
            expired: list = []  # rows past their expiry, dead once this commits
            with work(conn, settings, "outbox task") as cur:
                known = paused_topics(cur, settings)
                skip = {t: left for t, left in known.items() if left > 0}
                until = in_lease(settings)  # the lease is renewed just after this
                found = next_round(cur, queue, settings, token, owned, clock, fetch, suspect, skip)
                suspect = False
                owned = found.owned
                if found.batch:
                    rows = found.batch
                    stats["batches"] += 1
                    # Kafka has its own timeout
                    with around("sending", rows), paused():
                        outcome: Outcome = relay.deliver(rows, until)
                    sent = (rows, outcome, time.time())
                    queue.complete(cur, outcome.delivered)
                    expired = queue.expire(cur, outcome.expired)
                    stats["delivered"] += len(outcome.delivered)
                    heads = _book(
                        cur, settings, queue, owned, rows, outcome, known, retry_token, first_lease
                    )
                    retry_ids = list(heads or ())
                    stats["failed"] += len(retry_ids)
                    done = True
                    more = found.full or bool(outcome.paused_topics)  # behind paused topics
                    if outcome.fatal or heads is None:
                        queue.release(cur, owned, token, settings.pause_seconds)
                    elif clock.over(more, found.crowded):
                        queue.release(cur, owned, token)
                    else:
                        done = False  # more rows, or linger for the next ones
            if found.stale:
                stats["stale"] = True
                return stats
            if found.released:
                return stats
            if found.idle:
                clock.wait()
                continue
            if found.solo:
                # what its dead owner may have had in hand: one at a time
                delivered, ended = _solo(
                    settings, queue, owned, token, found.solo, found.recovering, clock
                )
                stats["delivered"] += delivered
                if ended == "stale":
                    stats["stale"] = True
                if ended != "done":
                    return stats
                continue
            if sent is not None:  # committed
                _record("outbox", *sent)
                fire_dead(expired)
            if retry_ids:
                enqueue_retry(retry, retry_ids, retry_token, retries=1, countdown=backoff(retry, 0))
            if done:
                return stats
    except TransientError:
        raise
    except Exception as exc:
        reraise_database_error(exc)
        # a bug must not hold the shards for a whole lease; the error still shows in Flower
        _release_quietly(queue, owned, token, settings)
        raise


def _book(cur, settings, queue, owned, rows, outcome, known, retry_token, lease):
    """After Kafka acknowledged a round: resume, pause and hold what it says, in a
    savepoint. Failed heads (row id -> error), or None when the bookkeeping itself
    failed: then only the completion of the delivered rows commits, and the
    failed and waiting rows stay pending for a later round. No error here may
    roll back the deletion of rows that Kafka has (they would be sent again,
    round after round)."""
    cur.execute("SAVEPOINT outbox_bridge_book")
    try:
        by_id = {r.id: r for r in rows}
        resume_topics(cur, settings, {by_id[i].topic for i in outcome.delivered} & set(known))
        heads = first_per_key(by_id, outcome.failed)
        queue.hold(cur, heads, retry_token, lease)
        if heads:  # the rows behind them wait out of the fetch's way
            queue.park(cur, owned)
        if outcome.paused_topics:
            for topic, seconds in pause_topics(cur, settings, outcome.paused_topics):
                log.warning(
                    "topic %s paused for %.1fs (%d rows wait): %s",
                    topic,
                    seconds,
                    len(outcome.later),
                    outcome.paused_topics[topic],
                )
        cur.execute("RELEASE SAVEPOINT outbox_bridge_book")
        return heads
    except psycopg2.Error as exc:
        if is_transient(exc):
            raise  # the connection is gone: nothing commits, the rows go again
        cur.execute("ROLLBACK TO SAVEPOINT outbox_bridge_book")
        log.exception(
            "outbox bookkeeping failed after Kafka acknowledged %d rows; they are deleted,"
            " the others wait for a later round",
            len(outcome.delivered),
        )
        return None


def _record(queue: str, rows: list, outcome: Outcome, acked_at: float) -> None:
    emit("batch", queue, len(rows))
    ids = set(outcome.delivered)
    emit("delivered", (r for r in rows if r.id in ids), acked_at)
    emit("counted", "failed", queue, len(outcome.failed))
    emit("counted", "out_of_order", queue, len(outcome.out_of_order))


def _release_quietly(queue: Queue, shards: list[int], token: str, settings: Settings) -> None:
    try:
        conn = task_connection(settings)
        conn.rollback()
        with work(conn, settings, "outbox task") as cur:
            queue.release(cur, shards, token, settings.pause_seconds)
    except Exception:  # noqa: BLE001 - the lease still recovers the shards
        log.exception("could not release shards %s", shards)


class RetryTask(Task):
    """Marks the rows dead when the last retry failed."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):  # noqa: D102
        bury_rows(args, kwargs, exc)


def bury_rows(args: Any, kwargs: Any, exc: BaseException) -> int:
    """Mark the rows of a failed retry task dead (idempotent)."""
    params = {**dict(zip(("ids", "token"), args or (), strict=False)), **(kwargs or {})}
    ids, token = params.get("ids"), params.get("token")
    if not ids or not token or not isinstance(exc, DeliveryFailed):
        return 0  # other errors: the lease runs out and the dispatcher re-drives the rows
    settings = get_settings()
    return bury_spent(
        outbox_queue(settings),
        settings,
        "outbox-bridge bury",
        ids,
        token,
        f"{type(exc).__name__}: {exc}",
        settings.max_retries,
    )


@app.task(
    bind=True,
    base=RetryTask,
    name=RETRY_TASK,
    autoretry_for=(DeliveryFailed,),
    retry_backoff=_settings.retry_backoff,
    retry_backoff_max=_settings.retry_backoff_max,
    retry_jitter=_settings.retry_jitter,
    max_retries=_settings.max_retries,
)
def retry(self: Task, ids: list[int], token: str) -> dict:
    """Retry exactly the rows ``ids`` that ``token`` still holds; raise if some fail again.
    Each attempt is counted (committed) before it runs: a row whose produce kills
    its process is dead after its retries, not retried for ever."""
    settings = get_settings()
    queue = outbox_queue(settings)
    relay = get_relay(settings)
    lease = lease_for(self, self.request.retries, settings.lease_seconds)
    try:
        conn = task_connection(settings)
        with work(conn, settings, "outbox task") as cur:
            # every attempt has started already: the last one died with its process
            buried = queue.bury(cur, ids, token, None, settings.max_retries)
            started = [i for i, _n in queue.start_held(cur, ids, token, lease)]
        until = in_lease(settings)
        fire_dead(buried)
        sent = (
            _retry_round(settings, queue, relay, started, token, lease, until) if started else None
        )
    except Exception as exc:
        try:
            reraise_database_error(exc)
        except TransientError as transient:  # the database is away: not these rows' fault
            again_later(self, transient_countdown(settings.pause_seconds), transient)
            return {"delivered": 0, "transient": True}
        raise
    if sent is None:
        return {"delivered": 0, "stale": not started and not buried, "dead": len(buried)}
    rows, outcome, acked_at, pause = sent
    emit("counted", "retried", "outbox", len(rows))
    _record("outbox", rows, outcome, acked_at)
    if outcome.later and not outcome.failed:
        # the topic or the producer is away: try again later without spending a retry
        again_later(self, pause, "topic paused")
        return {"delivered": len(outcome.delivered), "paused": True}
    if outcome.failed:
        raise DeliveryFailed(next(iter(outcome.failed.values())))
    return {"delivered": len(outcome.delivered)}


def _retry_round(
    settings: Settings, queue: Queue, relay, ids: list[int], token, lease: float, until: float
):
    """Produce the held rows ``ids`` of ``token`` (their attempt already counted; Kafka's
    reports awaited until ``until``) and book what Kafka said: (rows, outcome, acked at,
    pause), or None when none is held."""
    conn = task_connection(settings)
    with work(conn, settings, "outbox task") as cur:
        held = queue.fetch_held(cur, ids, token)
        if not held:
            return None
        rows = [row for row, _attempts, _shard in held]
        shard_of = {row.id: shard for row, _attempts, shard in held}
        with around("sending", rows), paused():
            outcome = relay.deliver(rows, until)
        acked_at = time.time()
        queue.complete(cur, outcome.delivered)
        expired = queue.expire(cur, outcome.expired)
        pause = settings.pause_seconds
        cur.execute("SAVEPOINT outbox_bridge_book")  # see _book
        try:
            by_id = {row.id: row for row in rows}
            released = [*outcome.delivered, *outcome.expired]  # their keys go on
            queue.unpark(cur, [(shard_of[i], by_id[i].topic, by_id[i].key) for i in released])
            if released:
                queue.wake_shards(cur, (shard_of[i] for i in released))
            if outcome.later:
                if outcome.paused_topics:
                    pause = max(s for _t, s in pause_topics(cur, settings, outcome.paused_topics))
                # not an attempt: the topic or the producer was away
                why = next(iter(outcome.paused_topics.values()), None) or outcome.fatal
                queue.extend_held(
                    cur,
                    outcome.later,
                    token,
                    pause + settings.lease_seconds,
                    uncount=True,
                    why=f"waits, not counted: {why}",
                )
            queue.hold(cur, outcome.failed, token, lease, count=False)
            cur.execute("RELEASE SAVEPOINT outbox_bridge_book")
        except psycopg2.Error as exc:
            if is_transient(exc):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT outbox_bridge_book")
            log.exception(
                "outbox bookkeeping of a retry failed; its rows come back after their lease"
            )
    fire_dead(expired)  # committed
    return rows, outcome, acked_at, pause


def _solo(
    settings: Settings, queue: Queue, owned, token, region, recovering, clock: Linger
) -> tuple[int, str]:
    """The rows that a dead owner of these shards may have had in hand, one at a
    time (``shardtask.one_at_a_time``). Returns the rows delivered and how it ended
    ("done", "cut": the shards went back, "stale": they are no longer ours)."""
    lease = lease_for(retry, 0, settings.lease_seconds)
    delivered = 0

    def attempt(row_id: int, retry_token: str) -> float | None:
        nonlocal delivered
        until = in_lease(settings)
        sent = _retry_round(
            settings, queue, get_relay(settings), [row_id], retry_token, lease, until
        )
        if sent is None:
            return None
        rows, outcome, acked_at, pause = sent
        _record("outbox", rows, outcome, acked_at)
        delivered += len(outcome.delivered)
        if outcome.failed:
            return backoff(retry, 0)
        return pause if outcome.later else None

    def again(row_id: int, retry_token: str, countdown: float) -> None:
        enqueue_retry(retry, [row_id], retry_token, retries=1, countdown=countdown)

    ended = one_at_a_time(
        queue,
        settings,
        "outbox task",
        token,
        owned,
        recovering,
        region,
        lease,
        attempt,
        again,
        clock.deadline,
    )
    return delivered, ended


@signals.task_failure.connect
def _bury_on_failure(sender=None, args=None, kwargs=None, exception=None, **_):
    # Same as RetryTask.on_failure, for failures that bypass it; burying is idempotent.
    if getattr(sender, "name", None) == RETRY_TASK and exception is not None:
        bury_rows(args or (), kwargs or {}, exception)


@signals.worker_process_shutdown.connect
def _close(**_):
    reset_relay()
    drop_task_connection()
