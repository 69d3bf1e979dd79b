"""``@outbox_handler``: Celery tasks that handle inbox deliveries effectively once.

A handler task gets delivery ids and a claim token, never payloads. It runs
each delivery's handler inside one transaction, each in a savepoint, and marks
the delivery done in that same savepoint: the handler's writes and "done"
commit together or not at all. A delivery whose handler raises becomes
``retrying`` and holds back its key for that handler; it is re-driven by the
same task with Celery's own ``autoretry_for`` / ``retry_backoff`` /
``max_retries`` of that handler, and is dead after the last retry.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Task

from .celery import app
from .config import Settings, get_settings
from .contrib import metrics, tracing
from .db import q, task_connection
from .errors import DecodeError, OutboxBridgeError, TransientError
from .linger import Linger
from .message import JSONSerializer, Message, Serializer
from .queue import Queue
from .retrying import again_later, backoff, lease_for, reraise_database_error, transient_countdown
from .signals import fire_dead

log = logging.getLogger(__name__)


class HandlerFailed(OutboxBridgeError):
    """Some deliveries of a handler task failed; Celery retries them."""


@dataclass(frozen=True)
class HandlerSpec:
    topic: str
    task: Task
    func: Callable[[Message, Any], None]
    serializer: Serializer
    # a SQLAlchemy sessionmaker or Session class: the handler gets a Session, not a cursor
    session: Callable[..., Any] | None = None


def _call(spec: HandlerSpec, message: Message, cur: Any) -> None:
    if spec.session is None:
        spec.func(message, cur)
        return
    from .contrib.sqlalchemy import session_for

    with session_for(spec.session, cur.connection) as session:
        spec.func(message, session)
        session.flush()  # the ORM's pending writes join "done" in this transaction


def _handle(spec: HandlerSpec, message: Message, cur: Any, queue: str) -> None:
    """One handler call, in a trace span, timed (when tracing or metrics are on)."""
    if not (metrics.on() or tracing.recording()):
        _call(spec, message, cur)
        return
    started = time.perf_counter()
    try:
        with tracing.processing(message, queue):
            _call(spec, message, cur)
    finally:
        metrics.handler_seconds(queue, time.perf_counter() - started)


# topic -> handlers, filled as handler modules are imported
REGISTRY: dict[str, list[HandlerSpec]] = {}


def handlers() -> list[HandlerSpec]:
    return [spec for specs in REGISTRY.values() for spec in specs]


def handler_rows() -> list[tuple[str, str, int | None]]:
    """(task name, topic, max_retries) of every handler, as the database registers them."""
    return [(s.task.name, s.topic, s.task.max_retries) for s in handlers()]


def inbox_queue(settings: Settings, handler: str) -> Queue:
    return Queue(
        name=f"inbox:{handler}", table="deliveries", schema=settings.schema, scope=handler,
        done="done", size_column=None,
    )  # fmt: skip


_LOAD = """
SELECT d.id, d.shard, d.attempts, i.message_id, i.topic, i.key, i.value, i.headers,
       i."partition", i."offset", i."timestamp"
FROM {deliveries} d JOIN {inbox} i ON i.message_id = d.message_id
WHERE d.id = ANY(%s) AND (d.state = 'pending' OR NOT %s)
ORDER BY d.id
"""


class HandlerTask(Task):
    """Base of handler tasks: marks deliveries dead after the last retry."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):  # noqa: D102
        bury_deliveries(self.name, args, kwargs, exc, self.max_retries)


def bury_deliveries(
    handler: str, args: Any, kwargs: Any, exc: BaseException, max_retries: int | None = None
) -> int:
    """Mark the retrying deliveries of a failed handler task dead (idempotent)."""
    params = {**dict(zip(("ids", "token", "shards"), args or (), strict=False)), **(kwargs or {})}
    ids, token = params.get("ids"), params.get("token")
    if not ids or not token or params.get("shards") is not None:
        return 0  # a shard task's failures were already handed to a retry
    if not isinstance(exc, HandlerFailed):
        return 0  # not a handler error: the lease runs out and the watcher re-drives
    settings = get_settings()
    conn = task_connection(settings)
    conn.rollback()
    with conn, conn.cursor() as cur:
        # only deliveries that used up their own attempts; the others (their task ran
        # out of retries for another reason) are re-driven after their lease
        dead = inbox_queue(settings, handler).bury(cur, ids, token, f"{exc}", max_retries)
    if dead:
        log.error("%d deliveries to %s are dead after their last retry: %s", len(dead), handler,
                  exc)  # fmt: skip
        fire_dead(dead)
    return len(dead)


def _decode_headers(stored: list) -> list[tuple[str, bytes | None]]:
    out = []
    for name, value in stored:
        if isinstance(value, dict):
            out.append((name, base64.b64decode(value["b64"])))
        else:
            out.append((name, None if value is None else value.encode()))
    return out


class _NeedsSavepoints(Exception):
    """A handler failed in the fast path: run the batch again, one savepoint each."""


def run_deliveries(
    task: Task, spec: HandlerSpec, ids: list[int], token: str, shards: list[int] | None
) -> dict:
    """Handle deliveries ``ids``: a fresh batch of claimed shards, or held retries.

    Fast path: every handler of the batch in one transaction, "done" marked in
    bulk at the end. If a handler raises, that transaction is rolled back and
    the batch runs again with a savepoint per delivery, so that the failure
    undoes only its own delivery's writes. (A handler may thus be called twice
    for one delivery; its database writes still commit once.) A shard task
    then lingers (see ``linger``): it fetches the next deliveries of its shards
    itself while they keep coming.
    """
    try:
        if shards is None:
            return _attempt(task, spec, ids, token, None, None)
        settings = get_settings()
        clock = Linger(settings)
        totals = {"done": 0, "failed": 0, "dead": 0, "batches": 0}
        owned = list(shards)
        while True:
            # the task fetches its deliveries itself, under its claim: the watcher's
            # ``ids`` may be stale (a task message redelivered after its worker died,
            # whose lingering run had gone past them under the same token)
            result = _attempt(task, spec, None, token, owned, clock)
            for name in totals:
                totals[name] += result.get(name, 0)
            if result.get("stale") or result.get("released"):
                return {**totals, **{k: v for k, v in result.items() if k not in totals}}
            owned = result["owned"]
            if result.get("idle"):
                clock.wait()
    except Exception as exc:
        reraise_database_error(exc)
        raise


def _attempt(task, spec, ids, token, shards, clock) -> dict:
    try:
        return _run(task, spec, ids, token, shards, False, clock)
    except _NeedsSavepoints:
        task_connection(get_settings()).rollback()
        return _run(task, spec, ids, token, shards, True, clock)


def _run(task, spec, ids, token, shards, careful: bool, clock: Linger | None) -> dict:
    settings = get_settings()
    queue = inbox_queue(settings, task.name)
    conn = task_connection(settings)
    done: list[int] = []
    failed: dict[int, str] = {}
    dead: dict[int, str] = {}
    retry_token = uuid.uuid4()
    first_countdown = backoff(task, 0)
    result: dict[str, Any] = {}
    if spec.session is not None:
        from .contrib.sqlalchemy import bind

        bind(conn)  # made while the connection is idle: see bind()
    with conn, conn.cursor() as cur:
        if shards is not None:
            # locked until commit: a handler slower than the lease still finishes;
            # one that hangs is ended by the task's time limit (handler_time_limit)
            owned = queue.renew(cur, shards, token, settings.lease_seconds, clock.adopt)
            if not owned:
                return {"stale": True}
            result["owned"] = owned
            if ids is None:
                ids, _with_rows = queue.fetch_ids(cur, owned, settings.batch_size)
                if not ids:
                    if clock.idle():
                        return {**result, "idle": True}
                    queue.release(cur, owned, token, held=owned)
                    return {"released": True}
            clock.busy()
            mine = ids
        else:
            mine = queue.take_held(cur, ids, token)
        # only what is still pending is ours to run (a redelivered task message); the
        # claim row locked above keeps it so until commit
        cur.execute(q(_LOAD, settings.schema), (list(mine), shards is not None))
        held: set[tuple[str, bytes]] = set()
        key_of: dict[int, tuple[int, str, bytes | None]] = {}  # id -> (shard, topic, key)
        for row in cur.fetchall():
            delivery_id, row_shard, _attempts, message_id, topic, key = row[:6]
            key_of[delivery_id] = (row_shard, topic, None if key is None else bytes(key))
            if shards is not None and row_shard not in owned:
                continue  # no longer ours: its new owner runs it
            key = None if key is None else bytes(key)
            if key is not None and (topic, key) in held:
                continue  # waits behind its key's failed head
            try:
                value = spec.serializer.loads(bytes(row[6])) if row[6] is not None else None
            except Exception as exc:  # noqa: BLE001 - any decoder error makes it dead
                reason = exc if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"
                dead[delivery_id] = f"cannot decode the value: {reason}"
                if key is not None:
                    held.add((topic, key))
                continue
            message = Message(
                message_id=message_id, topic=topic, key=key, value=value,
                headers=_decode_headers(row[7]), partition=row[8], offset=row[9],
                timestamp=row[10],
            )  # fmt: skip
            if not careful:
                try:
                    _handle(spec, message, cur, task.name)
                except Exception as exc:
                    raise _NeedsSavepoints() from exc
                done.append(delivery_id)
                continue
            cur.execute("SAVEPOINT outbox_bridge_delivery")
            try:
                _handle(spec, message, cur, task.name)
                cur.execute("RELEASE SAVEPOINT outbox_bridge_delivery")
                done.append(delivery_id)
            except Exception as exc:  # noqa: BLE001 - the handler's failure, retried
                cur.execute("ROLLBACK TO SAVEPOINT outbox_bridge_delivery")
                failed[delivery_id] = f"{type(exc).__name__}: {exc}"
                if key is not None:
                    held.add((topic, key))
        queue.complete(cur, done)  # in the handlers' transaction: done iff their writes
        if shards is not None:
            queue.hold(
                cur, {**failed, **dead}, retry_token, lease_for(task, 0, settings.lease_seconds)
            )
            buried = queue.bury(cur, list(dead), retry_token, None)
            if clock.over(len(ids) >= settings.batch_size):
                queue.release(cur, owned, token)
                result["released"] = True
        else:
            lease = lease_for(task, task.request.retries, settings.lease_seconds)
            queue.hold(cur, {**failed, **dead}, token, lease)
            buried = queue.bury(cur, list(dead), token, None)
            if done:  # released heads: the rows parked behind them go on now, in order
                queue.unpark(cur, (key_of[i] for i in done))
                queue.wake_shards(cur, (key_of[i][0] for i in done))
    # committed
    fire_dead(buried)
    metrics.count("handled", task.name, len(done))
    metrics.count("failed", task.name, len(failed))
    metrics.batch(task.name, len(done) + len(failed) + len(dead))
    if shards is None:
        metrics.count("retried", task.name, len(done) + len(failed) + len(dead))
    result.update({"done": len(done), "failed": len(failed), "dead": len(dead), "batches": 1})
    if shards is not None:
        if failed:
            try:
                task.apply_async(
                    (list(failed), str(retry_token)), countdown=first_countdown, retries=1
                )
            except Exception:  # noqa: BLE001 - the lease brings them back
                log.exception("could not enqueue the retry of deliveries %s", list(failed)[:10])
        return result
    if failed:
        raise HandlerFailed(next(iter(failed.values())))
    return result


def outbox_handler(
    topic: str,
    *,
    name: str | None = None,
    serializer: Serializer | None = None,
    session: Callable[..., Any] | None = None,
    **task_options: Any,
) -> Callable[[Callable[[Message, Any], None]], Task]:
    """Declare ``func(message, tx)`` as the handler of every message on ``topic``.

    Returns a real Celery task named ``outbox.<topic>.<function>`` (or
    ``name``). ``tx`` is a cursor of the transaction that also marks the
    delivery done, so the handler's writes commit exactly when it succeeds;
    ``publish(tx, ...)`` in a handler chains messages atomically. Do not commit
    or roll back ``tx`` yourself. With ``session=`` (a SQLAlchemy ``sessionmaker``
    or ``Session`` class, ``pip install outbox-bridge[sqlalchemy]``) ``tx`` is a
    ``Session`` of that factory bound to the same transaction, so the handler can
    use the service's own models: its ``commit()`` only flushes, its
    ``rollback()`` raises (raise an exception to undo). Celery options such as ``max_retries``,
    ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter`` and ``queue``
    work as for any task (defaults: ``max_retries=outbox_bridge_max_retries``,
    ``retry_backoff=True``). Values are decoded as JSON unless ``serializer``
    says otherwise; a value that cannot be decoded makes the delivery dead.
    """

    def decorate(func: Callable[[Message, Any], None]) -> Task:
        task_name = name or f"outbox.{topic}.{func.__name__}"
        settings = get_settings()
        options = {
            "max_retries": settings.max_retries,
            "retry_backoff": settings.retry_backoff,
            "retry_backoff_max": settings.retry_backoff_max,
            "retry_jitter": settings.retry_jitter,
            # a hung handler keeps its shard locked: end it (prefork: the process)
            "time_limit": settings.handler_time_limit or None,
            **task_options,
        }
        spec_box: list[HandlerSpec] = []

        def run(self: Task, ids: list[int], token: str, shards: list[int] | None = None) -> dict:
            try:
                return run_deliveries(self, spec_box[0], ids, token, shards)
            except TransientError as exc:  # the database is away: not the handler's failure
                again_later(self, transient_countdown(get_settings().pause_seconds), exc)
                return {"transient": True}

        run.__name__ = func.__name__
        run.__doc__ = func.__doc__
        task = app.task(
            bind=True, name=task_name, base=HandlerTask,
            autoretry_for=(HandlerFailed,),
            **options,
        )(run)  # fmt: skip
        spec = HandlerSpec(topic, task, func, serializer or JSONSerializer(), session)
        spec_box.append(spec)
        REGISTRY.setdefault(topic, [])
        REGISTRY[topic] = [s for s in REGISTRY[topic] if s.task.name != task_name] + [spec]
        return task

    return decorate
