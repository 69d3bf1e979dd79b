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

from celery import Task, signals

from .celery import app
from .config import Settings, get_settings
from .contrib import metrics, tracing
from .db import drop_task_connection, q, task_connection, transaction
from .errors import DeliveryFailed, TransientError
from .linger import Linger
from .producer import Outcome, get_relay, reset_relay
from .queue import Queue
from .retrying import (
    again_later,
    backoff,
    lease_for,
    reraise_database_error,
    transient_countdown,
)
from .signals import fire_dead

log = logging.getLogger(__name__)

PUBLISH_TASK = "outbox_bridge.outbox.publish"
RETRY_TASK = "outbox_bridge.outbox.retry"

_settings = get_settings()


def outbox_queue(settings: Settings) -> Queue:
    return Queue(name="outbox", table="outbox", schema=settings.schema)


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
def paused_topics(cur, settings: Settings) -> dict[str, float]:
    """Every topic with a pause row -> seconds its pause still runs (<= 0: over)."""
    cur.execute(
        q("SELECT topic, extract(epoch FROM until - now()) FROM {topic_pauses}", settings.schema)
    )
    return {topic: float(left) for topic, left in cur.fetchall()}


def pause_topics(cur, settings: Settings, reasons: dict[str, str]) -> list[tuple[str, float]]:
    """Pause these topics, each for longer than its last pause; returns (topic, seconds)."""
    cur.execute(
        q(
            "INSERT INTO {topic_pauses} AS p (topic, until, pauses, last_error)"
            " SELECT t, now() + %(base)s * interval '1s', 1, e"
            " FROM unnest(%(topics)s::text[], %(errors)s::text[]) AS x(t, e)"
            " ON CONFLICT (topic) DO UPDATE SET pauses = p.pauses + 1,"
            "  until = now() + least(%(max)s, %(base)s * 2 ^ p.pauses) * interval '1s',"
            "  last_error = excluded.last_error"
            " RETURNING topic, extract(epoch FROM until - now())",
            settings.schema,
        ),
        {
            "base": settings.pause_seconds,
            "max": settings.pause_max_seconds,
            "topics": list(reasons),
            "errors": list(reasons.values()),
        },
    )
    return cur.fetchall()


def resume_topics(cur, settings: Settings, topics: set[str]) -> None:
    if topics:
        cur.execute(
            q("DELETE FROM {topic_pauses} WHERE topic = ANY(%s)", settings.schema), (list(topics),)
        )


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
    try:
        conn = task_connection(settings)
        while True:
            relay = get_relay(settings)  # a new producer after a fatal error
            retry_ids: list[int] = []
            retry_token = uuid.uuid4()
            sent: tuple | None = None  # (rows, outcome, acked at), for the metrics
            with conn, conn.cursor() as cur:
                owned = queue.renew(cur, owned, token, settings.lease_seconds, clock.adopt)
                if not owned:
                    stats["stale"] = True
                    return stats
                known = paused_topics(cur, settings)
                skip = {t: left for t, left in known.items() if left > 0}
                rows, full = queue.fetch(
                    cur, owned, settings.batch_size, settings.batch_bytes, skip_topics=list(skip)
                )
                if not rows:
                    if clock.idle():
                        clock.wait()
                        continue
                    # every pending row is held back by its key, or its topic is paused:
                    # look again when a key is released, a row arrives or a pause ends
                    recheck = min(skip.values()) if skip else None
                    queue.release(cur, owned, token, held=owned, recheck=recheck)
                    return stats
                clock.busy()
                stats["batches"] += 1
                with tracing.sending(rows):
                    outcome: Outcome = relay.deliver(rows)
                sent = (rows, outcome, time.time())
                queue.complete(cur, outcome.delivered)
                by_id = {r.id: r for r in rows}
                resume_topics(
                    cur, settings, {by_id[i].topic for i in outcome.delivered} & set(known)
                )
                heads = first_per_key(by_id, outcome.failed)
                queue.hold(cur, heads, retry_token, first_lease)
                if heads:  # the rows behind them wait out of the fetch's way
                    queue.park(cur, owned)
                retry_ids = list(heads)
                stats["delivered"] += len(outcome.delivered)
                stats["failed"] += len(heads)
                if outcome.paused_topics:
                    for topic, seconds in pause_topics(cur, settings, outcome.paused_topics):
                        log.warning(
                            "topic %s paused for %.1fs (%d rows wait): %s",
                            topic,
                            seconds,
                            len(outcome.later),
                            outcome.paused_topics[topic],
                        )
                done = True
                more = full or bool(outcome.paused_topics)  # other topics behind paused ones
                if outcome.fatal:
                    queue.release(cur, owned, token, settings.pause_seconds)
                elif clock.over(more):
                    queue.release(cur, owned, token)
                else:
                    done = False  # more rows, or linger for the next ones
            if sent is not None:  # committed
                _record("outbox", *sent)
            if retry_ids:
                enqueue_retry(retry_ids, retry_token, retries=1, countdown=backoff(retry, 0))
            if done:
                return stats
    except TransientError:
        raise
    except Exception as exc:
        reraise_database_error(exc)
        # a bug must not hold the shards for a whole lease; the error still shows in Flower
        _release_quietly(queue, owned, token, settings)
        raise


def _record(queue: str, rows: list, outcome: Outcome, acked_at: float) -> None:
    metrics.batch(queue, len(rows))
    ids = set(outcome.delivered)
    metrics.delivered((r for r in rows if r.id in ids), acked_at)
    metrics.count("failed", queue, len(outcome.failed))


def _release_quietly(queue: Queue, shards: list[int], token: str, settings: Settings) -> None:
    try:
        conn = task_connection(settings)
        conn.rollback()
        with conn, conn.cursor() as cur:
            queue.release(cur, shards, token, settings.pause_seconds)
    except Exception:  # noqa: BLE001 - the lease still recovers the shards
        log.exception("could not release shards %s", shards)


def enqueue_retry(ids: list[int], token: Any, *, retries: int, countdown: float) -> None:
    """Send a retry task; if that fails the watcher re-drives the rows after their lease."""
    try:
        retry.apply_async((ids, str(token)), countdown=countdown, retries=retries)
    except Exception:  # noqa: BLE001 - PostgreSQL keeps the rows; the lease recovers them
        log.exception("could not enqueue the retry of outbox rows %s", ids[:10])


class RetryTask(Task):
    """Marks the rows dead when the last retry failed."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):  # noqa: D102
        bury_rows(args, kwargs, exc)


def bury_rows(args: Any, kwargs: Any, exc: BaseException) -> int:
    """Mark the rows of a failed retry task dead (idempotent)."""
    params = {**dict(zip(("ids", "token"), args or (), strict=False)), **(kwargs or {})}
    ids, token = params.get("ids"), params.get("token")
    if not ids or not token or not isinstance(exc, DeliveryFailed):
        return 0  # other errors: the lease runs out and the watcher re-drives the rows
    settings = get_settings()
    with transaction(settings, "outbox-bridge bury") as cur:
        # only rows that used up their own attempts: a row whose task ran out of
        # retries for another reason is re-driven by the watcher after its lease
        dead = outbox_queue(settings).bury(
            cur, ids, token, f"{type(exc).__name__}: {exc}", max_retries=settings.max_retries
        )
    if dead:
        log.error("%d outbox rows are dead after their last retry: %s", len(dead), exc)
        fire_dead(dead)
    return len(dead)


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
    """Retry exactly the rows ``ids`` that ``token`` still holds; raise if some fail again."""
    settings = get_settings()
    queue = outbox_queue(settings)
    relay = get_relay(settings)
    failed: dict[int, str] = {}
    later: list[int] = []
    try:
        conn = task_connection(settings)
        with conn, conn.cursor() as cur:
            held = queue.fetch_held(cur, ids, token)
            if not held:
                return {"delivered": 0, "stale": True}
            rows = [row for row, _attempts, _shard in held]
            shard_of = {row.id: shard for row, _attempts, shard in held}
            with tracing.sending(rows):
                outcome = relay.deliver(rows)
            acked_at = time.time()
            by_id = {row.id: row for row in rows}
            queue.unpark(
                cur, [(shard_of[i], by_id[i].topic, by_id[i].key) for i in outcome.delivered]
            )
            queue.complete(cur, outcome.delivered)
            if outcome.delivered:
                queue.wake_shards(cur, (shard_of[i] for i in outcome.delivered))
            later = outcome.later
            if later:
                pause = settings.pause_seconds
                if outcome.paused_topics:
                    pause = max(s for _t, s in pause_topics(cur, settings, outcome.paused_topics))
                queue.extend_held(cur, later, token, pause + settings.lease_seconds)
            failed = outcome.failed
            if failed:
                queue.hold(
                    cur,
                    failed,
                    token,
                    lease_for(self, self.request.retries, settings.lease_seconds),
                )
    except Exception as exc:
        try:
            reraise_database_error(exc)
        except TransientError as transient:  # the database is away: not these rows' fault
            again_later(self, transient_countdown(settings.pause_seconds), transient)
            return {"delivered": 0, "transient": True}
        raise
    metrics.count("retried", "outbox", len(rows))
    _record("outbox", rows, outcome, acked_at)
    if later and not failed:
        # the topic or the producer is away: try again later without spending a retry
        again_later(self, pause, "topic paused")
        return {"delivered": len(outcome.delivered), "paused": True}
    if failed:
        raise DeliveryFailed(next(iter(failed.values())))
    return {"delivered": len(outcome.delivered)}


@signals.task_failure.connect
def _bury_on_failure(sender=None, args=None, kwargs=None, exception=None, **_):
    # Same as RetryTask.on_failure, for failures that bypass it; burying is idempotent.
    if getattr(sender, "name", None) == RETRY_TASK and exception is not None:
        bury_rows(args or (), kwargs or {}, exception)


@signals.worker_process_shutdown.connect
def _close(**_):
    reset_relay()
    drop_task_connection()
