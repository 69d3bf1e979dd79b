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

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from celery import Task

from ..config import Settings, get_settings
from ..db import task_connection, work
from ..errors import DecodeError, OutboxBridgeError, TransientError
from ..events import active, around, emit
from ..message import JSONSerializer, Message, Serializer, decode_stored, expiry_of
from ..queries import render
from ..queue import fire_dead
from ..shardtask import (
    ROUND_SECONDS,
    HeldKeys,
    Linger,
    RoundSize,
    Source,
    again_later,
    backoff,
    bury_spent,
    enqueue_retry,
    lease_for,
    next_round,
    one_at_a_time,
    provides,
    provides_served,
    reraise_database_error,
    transient_countdown,
)
from ..watchdog import paused
from ..worker.app import app
from . import inbox_queue

log = logging.getLogger(__name__)


class HandlerFailed(OutboxBridgeError):
    """Some deliveries of a handler task failed; Celery retries them."""


@dataclass(frozen=True)
class HandlerSpec:
    topic: str
    task: Task
    func: Callable[[Any, Any], None]
    serializer: Serializer
    # a SQLAlchemy sessionmaker or Session class: the handler gets a Session, not a cursor
    session: Callable[..., Any] | None = None
    # the function takes a list of messages (``@outbox_handler(topic, batch=True)``)
    batch: bool = False


def _call(spec: HandlerSpec, messages: list[Message], cur: Any) -> None:
    # the handler's own statements may take as long as they need (its time limit)
    payload: Any = messages if spec.batch else messages[0]
    with paused():
        if spec.session is None:
            spec.func(payload, cur)
            return
        from ..contrib.sqlalchemy import session_for

        with session_for(spec.session, cur.connection) as session:
            spec.func(payload, session)
            session.flush()  # the ORM's pending writes join "done" in this transaction


def _handle(spec: HandlerSpec, messages: list[Message], cur: Any, queue: str) -> None:
    """One handler call (of one message, or of a batch handler's list), inside the
    middleware's ``processing`` of each message (a trace span each) and timed, when
    some middleware is active: each message of a batch gets its share of the time."""
    if not active():
        _call(spec, messages, cur)
        return
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            for message in messages:
                stack.enter_context(around("processing", message, queue))
            _call(spec, messages, cur)
    finally:
        share = (time.perf_counter() - started) / max(1, len(messages))
        for _message in messages:
            emit("handled_in", queue, share)


# topic -> handlers, filled as handler modules are imported
REGISTRY: dict[str, list[HandlerSpec]] = {}


def handlers() -> list[HandlerSpec]:
    return [spec for specs in REGISTRY.values() for spec in specs]


@provides
def handler_sources(settings: Settings) -> list[Source]:
    """A queue per registered handler, served by its task (which retries itself too)."""
    return [
        Source(
            inbox_queue(settings, spec.task.name),
            spec.task.name,
            spec.task.name,
            spec.task.max_retries if spec.task.max_retries is not None else 10**9,
            batch_size=settings.batch_size,
        )
        for spec in handlers()
    ]


def handler_rows() -> list[tuple[str, str, int | None, str | None]]:
    """(task name, topic, max_retries, queue) of every handler, as the database registers
    them (queue: the handler's ``queue=``, None for the default queue)."""
    return [
        (s.task.name, s.topic, s.task.max_retries, getattr(s.task, "queue", None))
        for s in handlers()
    ]


@provides_served
def served_handler_sources(cur, settings: Settings) -> list[Source]:
    """A queue per handler that some connected worker serves, also one this process
    lacks: the elected dispatcher sends its tasks by name, to the recorded queue."""
    cur.execute(render("inbox.served_handlers", settings.schema), {"schema": settings.schema})
    return [
        Source(
            inbox_queue(settings, name),
            name,
            name,
            max_retries if max_retries is not None else 10**9,
            batch_size=settings.batch_size,
            route=queue,
        )
        for name, max_retries, queue in cur.fetchall()
    ]


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
        return 0  # not a handler error: the lease runs out and the dispatcher re-drives
    settings = get_settings()
    return bury_spent(
        inbox_queue(settings, handler),
        settings,
        f"handler {handler}",
        ids,
        token,
        f"{exc}",
        max_retries,
    )


class _NeedsSavepoints(Exception):
    """A handler failed in the fast path: run the batch again, one savepoint each."""


class _CommitFailed(Exception):
    """The COMMIT of a handler transaction failed (a deferred constraint or trigger, a
    serialization failure): every write of that transaction is gone."""


# In the careful path each handler runs with the deferrable constraints deferred, as
# in its own transaction, and they are checked before its savepoint is released: a
# Django-style DEFERRABLE INITIALLY DEFERRED foreign key that a handler breaks fails
# that delivery alone, not the COMMIT of the batch.


def run_deliveries(
    task: Task, spec: HandlerSpec, ids: list[int], token: str, shards: list[int] | None
) -> dict:
    """Handle deliveries ``ids``: a fresh batch of claimed shards, or held retries.

    Fast path: every handler of the batch in one transaction, "done" marked in
    bulk at the end. If a handler raises, that transaction is rolled back and
    the batch runs again with a savepoint per delivery, so that the failure
    undoes only its own delivery's writes. (A handler may thus be called twice
    for one delivery; its database writes still commit once.) If the COMMIT
    fails, or the shard's last owner died with a batch in hand, the next
    deliveries run one per transaction, each attempt counted before it runs
    (``_solo``). A shard task then lingers (see ``linger``): it fetches the
    next deliveries of its shards itself while they keep coming.
    """
    try:
        if shards is None:
            return _retry(task, spec, ids, token)
        settings = get_settings()
        clock = Linger(settings)
        size = RoundSize(task.name, settings.batch_size)
        totals = {"done": 0, "failed": 0, "dead": 0, "batches": 0}
        owned = list(shards)
        # a task message delivered again: its first run may have died inside a batch
        suspect = bool((task.request.delivery_info or {}).get("redelivered"))
        while True:
            result = _attempt(task, spec, token, owned, clock, size, suspect)
            suspect = False
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


def _attempt(task, spec, token, shards, clock, size, suspect: bool) -> dict:
    """One round of a shard task: fast; careful after a handler raised; one delivery
    per transaction after a COMMIT failed or on a shard whose owner died."""
    try:
        try:
            result = _run_round(task, spec, token, shards, False, clock, size, suspect)
        except _NeedsSavepoints:
            task_connection(get_settings()).rollback()
            result = _run_round(task, spec, token, shards, True, clock, size)
    except _CommitFailed as exc:
        log.warning("%s: %s; its deliveries run one per transaction", task.name, exc)
        result = _run_round(task, spec, token, shards, False, clock, size, True)
    if "solo" in result:
        result = _solo(task, spec, token, result, clock)
    return result


def _retry(task: Task, spec: HandlerSpec, ids: list[int], token: str) -> dict:
    """A retry task's attempt at its held deliveries, counted (and committed) before
    it runs; one whose last attempt has started already (and died) is dead."""
    settings = get_settings()
    queue = inbox_queue(settings, task.name)
    conn = task_connection(settings)
    lease = lease_for(task, task.request.retries, settings.lease_seconds)
    with work(conn, settings, task.name) as cur:
        # every attempt has started already: the last one died with its process
        buried = (
            [] if task.max_retries is None else queue.bury(cur, ids, token, None, task.max_retries)
        )
        started = [i for i, _n in queue.start_held(cur, ids, token, lease)]
    fire_dead(buried)
    if not started:
        return {"done": 0, "dead": len(buried), "stale": not buried}
    return _held_attempt(task, spec, started, token, lease)


def _held_attempt(task: Task, spec: HandlerSpec, ids: list[int], token: str, lease: float):
    """Run held deliveries whose attempt is counted; raises HandlerFailed if one fails."""
    try:
        try:
            return _run_held(task, spec, ids, token, False)
        except _NeedsSavepoints:
            task_connection(get_settings()).rollback()
            return _run_held(task, spec, ids, token, True)
    except _CommitFailed as exc:
        if len(ids) == 1:  # it is this delivery's failure
            conn = task_connection(get_settings())
            with work(conn, get_settings(), task.name) as cur:
                queue = inbox_queue(get_settings(), task.name)
                queue.hold(cur, {ids[0]: str(exc)}, token, lease, count=False)
            raise HandlerFailed(str(exc)) from exc
    totals: dict[str, int] = {}
    failure: HandlerFailed | None = None
    for delivery_id in ids:  # which one: each in a transaction of its own
        try:
            for name, n in _held_attempt(task, spec, [delivery_id], token, lease).items():
                totals[name] = totals.get(name, 0) + (n if isinstance(n, int) else 0)
        except HandlerFailed as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
    return totals


def _solo(task: Task, spec: HandlerSpec, token: str, result: dict, clock: Linger) -> dict:
    """The deliveries that a dead owner of these shards may have had in hand (or a
    batch whose COMMIT failed), one per transaction (``shardtask.one_at_a_time``)."""
    settings = get_settings()
    queue = inbox_queue(settings, task.name)
    lease = lease_for(task, 0, settings.lease_seconds)
    totals = {"done": 0, "failed": 0, "dead": 0, "batches": 0}

    def attempt(delivery_id: int, retry_token: str) -> float | None:
        try:
            for name, n in _held_attempt(task, spec, [delivery_id], retry_token, lease).items():
                if name in totals:
                    totals[name] += n
        except HandlerFailed:
            totals["failed"] += 1
            return backoff(task, 0)
        return None

    def again(delivery_id: int, retry_token: str, countdown: float) -> None:
        enqueue_retry(task, [delivery_id], retry_token, countdown=countdown, retries=1)

    owned = result["owned"]
    ended = one_at_a_time(
        queue,
        settings,
        task.name,
        token,
        owned,
        result["recovering"],
        result["solo"],
        lease,
        attempt,
        again,
        clock.deadline,
    )
    if ended == "stale":
        return {**totals, "stale": True}
    if ended == "cut":
        return {**totals, "released": True}
    return {**totals, "owned": owned}


@dataclass
class _Handled:
    """What one transaction's handlers did: ids done, failed and dead (with why), and
    each loaded delivery's (shard, topic, key)."""

    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    dead: dict[int, str] = field(default_factory=dict)
    expired: list[int] = field(default_factory=list)  # past their expiry: not handled
    key_of: dict[int, tuple[int, str, bytes | None]] = field(default_factory=dict)
    cut: bool = False  # the round's budget ended it before its last delivery

    @property
    def count(self) -> int:
        return len(self.done) + len(self.failed) + len(self.dead) + len(self.expired)

    def totals(self) -> dict[str, int]:
        return {
            "done": len(self.done),
            "failed": len(self.failed),
            "dead": len(self.dead),
            "expired": len(self.expired),
            "batches": 1,
        }


def _run_handlers(
    cur,
    task: Task,
    spec: HandlerSpec,
    ids: list[int],
    owned: list[int] | None,
    careful: bool,
    budget: float | None = None,
) -> _Handled:
    """Run the handlers of deliveries ``ids`` in the transaction of ``cur``, in id
    order, the later deliveries of a key that fails waiting behind it. ``owned``:
    the shards a shard task still holds (a delivery elsewhere is its new owner's).
    Not ``careful``: the first failure raises ``_NeedsSavepoints``; careful: each
    runs in a savepoint that its failure alone rolls back. ``budget``: seconds after
    which no further delivery starts (the rest stay pending, in order: ``out.cut``)."""
    settings = get_settings()
    out = _Handled()
    until = None if budget is None else time.monotonic() + budget
    # only what is still pending is ours to run (a redelivered task message); the
    # claim row locked by the caller keeps it so until commit
    cur.execute(
        render("inbox.load", settings.schema), {"ids": list(ids), "fresh": owned is not None}
    )
    held = HeldKeys()
    batch: list[tuple[int, Message]] = []  # a batch handler's messages, called at the end
    for row in cur.fetchall():
        delivery_id, row_shard, _attempts, message_id, topic, key = row[:6]
        key = None if key is None else bytes(key)
        out.key_of[delivery_id] = (row_shard, topic, key)
        if owned is not None and row_shard not in owned:
            continue  # no longer ours: its new owner runs it
        if held.holds(topic, key):
            continue  # waits behind its key's failed head
        if until is not None and out.count and time.monotonic() > until:
            out.cut = True  # this one and the later ones: the next round
            break
        expires = expiry_of(row[7])
        if expires is not None and expires <= time.time():
            out.expired.append(delivery_id)  # holds no key: its key's later ones go on
            continue
        try:
            value = spec.serializer.loads(bytes(row[6])) if row[6] is not None else None
        except Exception as exc:  # noqa: BLE001 - any decoder error makes it dead
            reason = exc if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"
            out.dead[delivery_id] = f"cannot decode the value: {reason}"
            held.add(topic, key)
            continue
        message = Message(
            message_id=message_id,
            topic=topic,
            key=key,
            value=value,
            headers=decode_stored(row[7]),
            partition=row[8],
            offset=row[9],
            timestamp=row[10],
        )
        if spec.batch:
            batch.append((delivery_id, message))
            continue
        if not careful:
            try:
                _handle(spec, [message], cur, task.name)
            except Exception as exc:
                raise _NeedsSavepoints() from exc
            out.done.append(delivery_id)
            continue
        _in_savepoint(cur, task, spec, [(delivery_id, message)], out, held)
    if not batch:
        return out
    if not careful:
        try:
            _handle(spec, [m for _i, m in batch], cur, task.name)
        except Exception as exc:
            raise _NeedsSavepoints() from exc
        out.done += [i for i, _m in batch]
        return out
    _in_savepoint(cur, task, spec, batch, out, held)
    return out


def _in_savepoint(
    cur, task: Task, spec: HandlerSpec, items: list[tuple[int, Message]], out: _Handled, held
) -> None:
    """The careful path: ``items`` (delivery id, message) in one savepoint; if the
    handler raises, that savepoint is rolled back and the list is halved, each half in
    a savepoint of its own, in order, until the failing messages stand alone (a batch
    of n with one failure: about 2 log2 n calls). A failed message holds back its key:
    the later ones of that key in the list wait behind it."""
    items = [(i, m) for i, m in items if not held.holds(m.topic, m.key)]
    if not items:
        return
    cur.execute(render("inbox.before_handler", get_settings().schema))
    try:
        _handle(spec, [m for _i, m in items], cur, task.name)
        cur.execute(render("inbox.after_handler", get_settings().schema))
        out.done += [i for i, _m in items]
        return
    except Exception as exc:  # noqa: BLE001 - the handler's failure, retried
        cur.execute("ROLLBACK TO SAVEPOINT outbox_bridge_delivery")
        if len(items) == 1:
            ((delivery_id, message),) = items
            out.failed[delivery_id] = f"{type(exc).__name__}: {exc}"
            held.add(message.topic, message.key)
            return
    half = len(items) // 2
    _in_savepoint(cur, task, spec, items[:half], out, held)
    _in_savepoint(cur, task, spec, items[half:], out, held)


@contextlib.contextmanager
def _handlers_transaction(task: Task, spec: HandlerSpec) -> Iterator[tuple[Any, list[bool]]]:
    """The transaction the handlers run in, on this thread's connection; set the
    flag (``flag[0] = True``) once the handlers ran: a database error after that
    is the COMMIT's (``_CommitFailed``), whose batch then runs one per transaction."""
    settings = get_settings()
    conn = task_connection(settings)
    if spec.session is not None:
        from ..contrib.sqlalchemy import bind

        bind(conn)  # made while the connection is idle: see bind()
    flag = [False]
    try:
        with work(conn, settings, task.name) as cur:
            yield cur, flag
    except psycopg2.Error as exc:
        if flag[0] and exc.pgcode is not None and not conn.closed:
            raise _CommitFailed(f"COMMIT failed: {type(exc).__name__}: {exc}".strip()) from exc
        raise


def _counted(task: Task, handled: _Handled) -> None:
    emit("counted", "handled", task.name, len(handled.done))
    emit("counted", "failed", task.name, len(handled.failed))
    emit("batch", task.name, handled.count)


def _run_round(
    task, spec, token, shards, careful: bool, clock: Linger, size: RoundSize, solo=False
) -> dict:
    """One round of a shard task (``shardtask.next_round``), its handlers in one
    transaction with the claim; failures become retrying heads with a retry task."""
    settings = get_settings()
    queue = inbox_queue(settings, task.name)
    retry_token = uuid.uuid4()
    result: dict[str, Any] = {}

    def fetch(cur, owned: list[int], skip: list[str], limit: int) -> tuple[list[int], bool]:
        ids, _with_rows = queue.fetch_ids(cur, owned, limit, skip)
        return ids, len(ids) >= limit

    with _handlers_transaction(task, spec) as (cur, handled_flag):
        # locked until commit: a handler slower than the lease still finishes; one
        # that hangs is ended by the task's time limit (handler_time_limit)
        found = next_round(cur, queue, settings, token, shards, clock, fetch, solo, size=size)
        if found.stale:
            return {"stale": True}
        owned = result["owned"] = found.owned
        if found.solo:
            return {**result, "solo": found.solo, "recovering": found.recovering}
        if found.idle:
            return {**result, "idle": True}
        if found.released:
            return {"released": True}
        started = time.monotonic()
        handled = _run_handlers(cur, task, spec, found.batch, owned, careful, ROUND_SECONDS)
        size.after(len(found.batch), handled.count, handled.cut, time.monotonic() - started)
        queue.complete(cur, handled.done)  # in the handlers' transaction: done iff their writes
        lease = lease_for(task, 0, settings.lease_seconds)
        queue.hold(cur, {**handled.failed, **handled.dead}, retry_token, lease)
        buried = queue.bury(cur, list(handled.dead), retry_token, None)
        buried += queue.expire(cur, handled.expired)
        if clock.over(handled.cut or found.full, found.crowded):
            queue.release(cur, owned, token)
            result["released"] = True
        handled_flag[0] = True
    # committed
    fire_dead(buried)
    _counted(task, handled)
    if handled.failed:
        enqueue_retry(
            task, list(handled.failed), retry_token, countdown=backoff(task, 0), retries=1
        )
    return {**result, **handled.totals()}


def _run_held(task, spec, ids: list[int], token: str, careful: bool) -> dict:
    """A retry's attempt at its held deliveries (counted when it started); raises
    ``HandlerFailed`` when one fails again."""
    settings = get_settings()
    queue = inbox_queue(settings, task.name)
    with _handlers_transaction(task, spec) as (cur, handled_flag):
        mine = queue.take_held(cur, ids, token)
        handled = _run_handlers(cur, task, spec, mine, None, careful)
        queue.complete(cur, handled.done)  # in the handlers' transaction: done iff their writes
        lease = lease_for(task, task.request.retries, settings.lease_seconds)
        queue.hold(cur, {**handled.failed, **handled.dead}, token, lease, count=False)
        buried = queue.bury(cur, list(handled.dead), token, None)
        buried += queue.expire(cur, handled.expired)
        released = [*handled.done, *handled.expired]
        if released:  # released heads: the rows parked behind them go on now, in order
            queue.unpark(cur, (handled.key_of[i] for i in released))
            queue.wake_shards(cur, (handled.key_of[i][0] for i in released))
        handled_flag[0] = True
    # committed
    fire_dead(buried)
    _counted(task, handled)
    emit("counted", "retried", task.name, handled.count)
    if handled.failed:
        raise HandlerFailed(next(iter(handled.failed.values())))
    return handled.totals()


def outbox_handler(
    topic: str,
    *,
    name: str | None = None,
    serializer: Serializer | None = None,
    session: Callable[..., Any] | None = None,
    batch: bool = False,
    **task_options: Any,
) -> Callable[[Callable[[Any, Any], None]], Task]:
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

    With ``batch=True`` the function is ``func(messages, tx)``: ``messages`` is a
    list of the messages of one round of the handler's shards (up to
    ``outbox_bridge_batch_size``), in delivery order, so each key's messages come in
    their order, and the function can write them all with one statement. If it
    raises, its writes are rolled back and the list is halved, each half in a
    savepoint of its own, until the failing message stands alone: only that message
    is retried (and dead after ``max_retries``), only its key waits, and the others
    are done once. The function may therefore see a message more than once; its
    database writes still commit once. Retries, dead messages, the dead hook,
    metrics and traces are per message, as for a single handler.
    """

    def decorate(func: Callable[[Any, Any], None]) -> Task:
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
            bind=True,
            name=task_name,
            base=HandlerTask,
            autoretry_for=(HandlerFailed,),
            **options,
        )(run)
        spec = HandlerSpec(topic, task, func, serializer or JSONSerializer(), session, batch)
        spec_box.append(spec)
        REGISTRY.setdefault(topic, [])
        REGISTRY[topic] = [s for s in REGISTRY[topic] if s.task.name != task_name] + [spec]
        return task

    return decorate
