"""The Celery tasks that move outbox rows to Kafka.

``publish`` drains one claimed shard in batches: fetch the oldest rows, produce
them, wait for every delivery report, delete what Kafka acknowledged, all in
one transaction that also renews the claim. Rows that Kafka refuses on their
own go to ``retry``, which re-drives exactly those rows with Celery's
``autoretry_for`` / ``retry_backoff`` / ``max_retries``; after the last retry
they are dead. While Kafka is unreachable nothing is charged an attempt: the
shard pauses (a circuit breaker kept in PostgreSQL) and resumes later.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

from celery import Task, signals
from celery.utils.time import get_exponential_backoff_interval

from .celery import app
from .config import Settings, get_settings
from .db import TRANSIENT_ERRORS, connect, transaction
from .errors import DeliveryFailed
from .producer import Outcome, get_relay, reset_relay
from .queue import Queue

log = logging.getLogger(__name__)

PUBLISH_TASK = "outbox_bridge.outbox.publish"
RETRY_TASK = "outbox_bridge.outbox.retry"

_settings = get_settings()


def outbox_queue(settings: Settings) -> Queue:
    return Queue(name="outbox", table="outbox", schema=settings.schema)


_conn: Any = None


def task_connection(settings: Settings):
    """This process's connection for relay tasks (made after the worker forked)."""
    global _conn
    if _conn is None or _conn.closed or _conn.info.backend_pid == 0 or _conn_pid != os.getpid():
        _set_conn(connect(settings, name="outbox-bridge relay"))
    return _conn


_conn_pid = -1


def _set_conn(conn) -> None:
    global _conn, _conn_pid
    _conn, _conn_pid = conn, os.getpid()


def _drop_connection() -> None:
    global _conn
    if _conn is not None and _conn_pid == os.getpid():
        _conn.close()
    _conn = None


def backoff(settings: Settings, retries: int, jitter: bool | None = None) -> float:
    """The countdown Celery's autoretry uses before retry number ``retries + 1``."""
    return get_exponential_backoff_interval(
        factor=int(max(1.0, settings.retry_backoff)),
        retries=retries,
        maximum=int(settings.retry_backoff_max),
        full_jitter=settings.retry_jitter if jitter is None else jitter,
    )


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


def circuit_pause(settings: Settings, pauses: int) -> float:
    return min(settings.pause_max_seconds, settings.pause_seconds * 2**pauses)


@app.task(
    bind=True,
    name=PUBLISH_TASK,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=True,
    max_retries=5,
)
def publish(self: Task, shards: list[int], token: str) -> dict:
    """Drain the claimed ``shards`` while ``token`` still owns them."""
    settings = get_settings()
    queue = outbox_queue(settings)
    relay = get_relay(settings)
    stats = {"shards": shards, "delivered": 0, "failed": 0, "batches": 0}
    deadline = time.monotonic() + settings.lease_seconds / 3
    try:
        conn = task_connection(settings)
        while True:
            retry_ids: list[int] = []
            retry_token = uuid.uuid4()
            first_countdown = backoff(settings, 0)
            with conn, conn.cursor() as cur:
                owned = queue.renew(cur, shards, token, settings.lease_seconds)
                if not owned:
                    stats["stale"] = True
                    return stats
                rows, full = queue.fetch(cur, owned, settings.batch_size)
                if not rows:
                    # claimed for rows that are all held back by their keys
                    queue.release(cur, owned, token, held=owned if not stats["batches"] else ())
                    return stats
                stats["batches"] += 1
                outcome: Outcome = relay.deliver(rows)
                queue.complete(cur, outcome.delivered)
                heads = first_per_key({r.id: r for r in rows}, outcome.failed)
                queue.hold(cur, heads, retry_token, first_countdown + settings.lease_seconds)
                retry_ids = list(heads)
                stats["delivered"] += len(outcome.delivered)
                stats["failed"] += len(heads)
                done = True
                if outcome.unreachable:
                    pause = circuit_pause(settings, queue.pauses(cur, owned))
                    log.warning(
                        "Kafka unreachable (%d rows of shards %s wait); pausing them %.1fs",
                        len(outcome.unreachable), owned, pause,
                    )  # fmt: skip
                    queue.release(cur, owned, token, pause, unreachable=True)
                elif not full or time.monotonic() > deadline:
                    queue.release(cur, owned, token)
                else:
                    done = False
            if retry_ids:
                enqueue_retry(retry_ids, retry_token, retries=1, countdown=first_countdown)
            if done:
                return stats
    except TRANSIENT_ERRORS:
        _drop_connection()
        raise
    except Exception:
        # a bug must not hold the shards for a whole lease; the error still shows in Flower
        _release_quietly(queue, shards, token, settings)
        raise


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
        count = outbox_queue(settings).bury(cur, ids, token, f"{type(exc).__name__}: {exc}")
    if count:
        log.error("%d outbox rows are dead after their last retry: %s", count, exc)
    return count


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
    conn = task_connection(settings)
    failed: dict[int, str] = {}
    try:
        with conn, conn.cursor() as cur:
            held = queue.fetch_held(cur, ids, token)
            if not held:
                return {"delivered": 0, "stale": True}
            rows = [row for row, _attempts, _shard in held]
            shard_of = {row.id: shard for row, _attempts, shard in held}
            outcome = relay.deliver(rows)
            queue.complete(cur, outcome.delivered)
            if outcome.delivered:
                queue.wake_shards(cur, (shard_of[i] for i in outcome.delivered))
            if outcome.unreachable:
                pause = circuit_pause(settings, 0)
                queue.extend_held(cur, outcome.unreachable, token, pause + settings.lease_seconds)
            failed = outcome.failed
            if failed:
                countdown = backoff(settings, self.request.retries, jitter=False)
                queue.hold(cur, failed, token, countdown + settings.lease_seconds)
    except TRANSIENT_ERRORS:
        _drop_connection()
        raise
    if outcome.unreachable and not failed:
        # Kafka is away: try again later without spending a retry
        self.apply_async((ids, token), countdown=pause, retries=self.request.retries)
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
    _drop_connection()
