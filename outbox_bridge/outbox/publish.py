"""Writing messages to the outbox: ``publish`` (your transaction) and ``send`` (its own)."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import psycopg2

from ..config import Settings, get_settings
from ..db import connect, is_transient
from ..errors import InvalidHeaders, InvalidMessage, InvalidTime, MessageTooLarge
from ..events import publishing
from ..message import (
    CE_PREFIX,
    CONTENT_TYPE_HEADER,
    EXPIRES_HEADER,
    REPLY_TO_HEADER,
    TYPE_HEADER,
    Headers,
    JSONSerializer,
    Serializer,
    check_topic,
    encode_headers,
    encode_key,
    format_time,
    parse_time,
    record_size,
    replies_with,
)
from ..queries import render_text
from ..queue import shard_of
from . import adapters

log = logging.getLogger(__name__)

_json = JSONSerializer()


# A deliver_at this far in the past (clocks of two hosts disagree) is sent at once;
# further back it is refused: a time computed wrongly should not go unnoticed.
PAST_TOLERANCE = timedelta(seconds=60)


@dataclass(frozen=True)
class Timing:
    """When a message may go (``due``: None, now) and until when (``expires``)."""

    due: datetime | None = None
    expires: datetime | None = None


NOW = Timing()


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise InvalidTime(f"{name} must be a timedelta or seconds, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidTime(f"{name} must be zero or more seconds, got {value!r}")
    return seconds


def _aware(value: Any, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidTime(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidTime(
            f"{name} {value.isoformat()} has no time zone: give an aware datetime"
            " (datetime.now(timezone.utc) + ...)"
        )
    return value.astimezone(timezone.utc)


def timing(deliver_at: Any, delay: Any, expires_at: Any, ttl: Any) -> Timing:
    """The checked times of a message; InvalidTime names what is wrong."""
    if deliver_at is None and delay is None and expires_at is None and ttl is None:
        return NOW
    now = datetime.now(timezone.utc)
    if deliver_at is not None and delay is not None:
        raise InvalidTime("give deliver_at or delay, not both")
    if expires_at is not None and ttl is not None:
        raise InvalidTime("give expires_at or ttl, not both")
    due = None
    if delay is not None:
        due = now + timedelta(seconds=_seconds(delay, "delay"))
    elif deliver_at is not None:
        due = _aware(deliver_at, "deliver_at")
        if due < now - PAST_TOLERANCE:
            raise InvalidTime(
                f"deliver_at {format_time(due)} is {(now - due).total_seconds():.0f}s in the"
                f" past (more than {PAST_TOLERANCE.total_seconds():.0f}s): not sent"
            )
    start = max(now, due) if due is not None else now
    expires = None
    if ttl is not None:
        seconds = _seconds(ttl, "ttl")
        if seconds == 0:
            raise InvalidTime("ttl must be more than zero seconds")
        expires = start + timedelta(seconds=seconds)
    elif expires_at is not None:
        expires = _aware(expires_at, "expires_at")
        if expires <= start:
            raise InvalidTime(
                f"expires_at {format_time(expires)} is not after "
                + (f"deliver_at {format_time(start)}" if due is not None else "now")
            )
    return Timing(due if due is not None and due > now else None, expires)


def _with_expiry(stored: list, expires: datetime | None) -> list:
    given = [pair for pair in stored if pair[0] == EXPIRES_HEADER]
    if given and expires is not None:
        raise InvalidHeaders(f"header {EXPIRES_HEADER!r} is set by expires_at= or ttl=; not both")
    for _name, value in given:
        if not isinstance(value, str) or parse_time(value) is None:
            raise InvalidHeaders(
                f"header {EXPIRES_HEADER!r} must be an ISO 8601 time with a zone, got {value!r}"
            )
    if expires is None:
        return stored
    return [*stored, [EXPIRES_HEADER, format_time(expires)]]


def _with_reply_to(stored: list, reply_to: str | None) -> list:
    if reply_to is None:
        return stored
    try:
        check_topic(reply_to)
    except InvalidMessage as exc:
        raise type(exc)(f"reply_to: {exc}") from None
    if any(pair[0] == REPLY_TO_HEADER for pair in stored):
        raise InvalidHeaders(f"header {REPLY_TO_HEADER!r} is set by reply_to=; not both")
    return [*stored, [REPLY_TO_HEADER, reply_to]]


def _with_type(stored: list, type_: str | None) -> list:
    if type_ is None:
        return stored
    if not isinstance(type_, str) or not type_:
        raise InvalidHeaders(f"type must be a non-empty string, got {type_!r}")
    if any(pair[0] == TYPE_HEADER for pair in stored):
        raise InvalidHeaders(f"give type= or a {TYPE_HEADER!r} header, not both")
    return [*stored, [TYPE_HEADER, type_]]


# the attributes outbox-bridge sets as CloudEvents headers (a producer's own ce_* go as given)
CE_OWN = ("specversion", "id", "source", "type", "time")


def _as_cloudevent(stored: list, source: str, message_id: UUID, value: Any, serializer) -> list:
    """Stored headers with the CloudEvents attributes (binary content mode): ``type``
    from type= or the ``type`` header, which stays a header of its own only if given so."""
    own = [n for n, _ in stored if n.lower() in {CE_PREFIX + a for a in CE_OWN}]
    if own:
        raise InvalidHeaders(f"header {own[0]!r} is set by outbox-bridge in CloudEvents mode")
    types = [v for n, v in stored if n == TYPE_HEADER]
    if not types or not isinstance(types[0], str) or not types[0]:
        raise InvalidHeaders(
            "CloudEvents mode (outbox_bridge_cloudevents_source) needs each message's type:"
            f" give type= or a {TYPE_HEADER!r} header"
        )
    attributes = [
        ["ce_specversion", "1.0"],
        ["ce_id", str(message_id)],
        ["ce_source", source],
        ["ce_type", types[0]],
        ["ce_time", format_time(datetime.now(timezone.utc))],
    ]
    if not any(n.lower() == CONTENT_TYPE_HEADER for n, _ in stored):
        content_type = getattr(serializer, "content_type", None)
        if serializer is None:
            content_type = "application/octet-stream" if _is_bytes(value) else "application/json"
        if content_type:
            attributes.append([CONTENT_TYPE_HEADER, content_type])
    return [*stored, *attributes]


def _is_bytes(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview))


def _row(
    topic: str,
    value: Any,
    key: str | bytes | None,
    headers: Headers | None,
    serializer: Serializer | None,
    settings: Settings,
    message_id: UUID,
    when: Timing = NOW,
    reply_to: str | None = None,
    type_: str | None = None,
) -> tuple:
    check_topic(topic)
    key_bytes = encode_key(key)
    stored = _with_reply_to(_with_expiry(encode_headers(headers), when.expires), reply_to)
    if settings.cloudevents_source:
        given = _with_type(stored, type_)
        stored = _as_cloudevent(given, settings.cloudevents_source, message_id, value, serializer)
        if type_ is not None:  # carried as ce_type only
            stored = [pair for pair in stored if pair is not given[-1]]
    else:
        stored = _with_type(stored, type_)
    stored_headers = publishing(stored)
    data = (serializer or _json).dumps(value)
    size = record_size(key_bytes, data, stored_headers)
    if size > settings.max_message_bytes:
        raise MessageTooLarge(
            f"message to {topic!r} is {size} bytes as a Kafka record, more than"
            f" outbox_bridge_max_message_bytes ({settings.max_message_bytes})"
        )
    shard = shard_of(topic, key_bytes, settings.shards)
    headers_json = json.dumps(stored_headers, separators=(",", ":"))
    row = (str(message_id), topic, key_bytes, data, headers_json, shard)
    return row if when.due is None else (*row, when.due.isoformat())


# the statement that writes a message, by the ``wake`` setting (and delayed or not)
INSERT = {"poll": "outbox.insert", "notify": "outbox.insert_notify"}
INSERT_SCHEDULED = {"poll": "outbox.insert_scheduled", "notify": "outbox.insert_scheduled_notify"}


def _insert(settings: Settings, row: tuple) -> str:
    names = INSERT if len(row) == 6 else INSERT_SCHEDULED
    return render_text(names[settings.wake], settings.schema)


def publish(
    tx: Any,
    topic: str,
    value: Any,
    *,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    serializer: Serializer | None = None,
    deliver_at: datetime | None = None,
    delay: timedelta | float | None = None,
    expires_at: datetime | None = None,
    ttl: timedelta | float | None = None,
    reply_to: str | None = None,
    type: str | None = None,  # noqa: A002 - the CloudEvents attribute's name
) -> UUID:
    """Write a message to the outbox inside the caller's transaction.

    ``tx`` is what the application already holds: a psycopg2 or psycopg 3
    connection or cursor, a SQLAlchemy ``Session`` or ``Connection``, or a
    Django connection or cursor inside ``transaction.atomic()``. Nothing is
    committed here, and nothing is sent if that transaction rolls back. A
    connection with no transaction open (autocommit) is refused with
    ``NotInTransaction``: use :func:`send` to write a message on its own.
    ``value`` is serialized as JSON unless it is ``bytes`` (sent as is) or a
    ``serializer`` is given. Returns the message id, which travels to Kafka as
    the ``message_id`` header.

    ``delay`` (a ``timedelta`` or seconds from now) or ``deliver_at`` (an aware
    ``datetime``) delays the message: it reaches Kafka no earlier than that, and
    stands outside its key's order until then (later messages of its key are not
    held back; once due it queues behind what its key has queued so far).
    ``ttl`` (from when it may be sent) or ``expires_at``: a message still not sent
    then is not sent at all; it is dead with the reason "expired" and holds no
    key. The expiry travels as the ``expires_at`` header, and handlers do not get
    a message whose expiry has passed.

    ``reply_to`` names the topic that replies go to (the ``reply_to`` header): a
    handler answers with ``message.reply(tx, value)``, which carries a
    ``correlation_id`` header equal to this message's id.

    ``type`` is the message's type: the ``type`` header, or with the setting
    ``cloudevents_source`` (CloudEvents mode: every message a CloudEvent in Kafka's
    binary content mode) its ``ce_type``, which a message then needs (``type=`` or
    a ``type`` header).

    Raises an ``InvalidMessage`` (a ``ValueError``) naming the problem, and
    writes nothing, for an illegal topic, a key or header of the wrong type, an
    unserializable value, a message over ``outbox_bridge_max_message_bytes``, or
    times it cannot keep (``InvalidTime``: a naive datetime, a ``deliver_at`` more
    than a minute past, a negative delay, an expiry not after delivery).
    """
    message_id, sql, row = _prepare(
        topic,
        value,
        key,
        headers,
        serializer,
        timing(deliver_at, delay, expires_at, ttl),
        reply_to,
        type,
    )
    adapters.execute(tx, sql, row)
    return message_id


async def publish_async(
    tx: Any,
    topic: str,
    value: Any,
    *,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    serializer: Serializer | None = None,
    deliver_at: datetime | None = None,
    delay: timedelta | float | None = None,
    expires_at: datetime | None = None,
    ttl: timedelta | float | None = None,
    reply_to: str | None = None,
    type: str | None = None,  # noqa: A002 - the CloudEvents attribute's name
) -> UUID:
    """:func:`publish` for asynchronous code: ``tx`` is an asyncpg connection, a
    psycopg 3 ``AsyncConnection`` or ``AsyncCursor``, or a SQLAlchemy
    ``AsyncSession`` or ``AsyncConnection``. Same arguments, validation, errors and
    guarantees."""
    message_id, sql, row = _prepare(
        topic,
        value,
        key,
        headers,
        serializer,
        timing(deliver_at, delay, expires_at, ttl),
        reply_to,
        type,
    )
    await adapters.execute_async(tx, sql, row)
    return message_id


def _prepare(
    topic, value, key, headers, serializer, when: Timing, reply_to: str | None, type_
) -> tuple[UUID, str, tuple]:
    settings = get_settings()
    message_id = uuid.uuid4()
    row = _row(topic, value, key, headers, serializer, settings, message_id, when, reply_to, type_)
    return message_id, _insert(settings, row), row


def sent(cur: Any, settings: Settings, message_id: UUID) -> bool:
    """Whether a ``send()`` of ``message_id`` committed (its receipt is there)."""
    cur.execute(
        render_text("outbox.receipt", settings.schema),
        (str(message_id),),
    )
    return cur.fetchone() is not None


def send(
    topic: str,
    value: Any,
    *,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    serializer: Serializer | None = None,
    retries: int | None = None,
    deliver_at: datetime | None = None,
    delay: timedelta | float | None = None,
    expires_at: datetime | None = None,
    ttl: timedelta | float | None = None,
    reply_to: str | None = None,
    type: str | None = None,  # noqa: A002 - the CloudEvents attribute's name
) -> UUID:
    """Write a message to the outbox in a transaction of its own, and commit it.

    For code that has no transaction at hand. Transient database errors
    (connection lost, serialization failure, deadlock) are retried up to
    ``retries`` times (default ``outbox_bridge_send_retries``) with a short
    backoff. A commit whose outcome was lost is never written twice, nor
    skipped: the transaction also writes a receipt (``send_receipts``), and the
    next attempt writes the message again only if that receipt is not there.
    (Not ``txid_status()`` alone: after a crash that lost the commit,
    PostgreSQL can give the same transaction id to a later transaction.)
    Invalid input raises as in :func:`publish`, before any connection is made;
    ``deliver_at``, ``delay``, ``expires_at``, ``ttl``, ``reply_to`` and ``type`` are
    as there.
    """
    settings = get_settings()
    message_id = uuid.uuid4()
    when = timing(deliver_at, delay, expires_at, ttl)
    row = _row(topic, value, key, headers, serializer, settings, message_id, when, reply_to, type)
    attempts = 1 + (settings.send_retries if retries is None else retries)
    unknown: tuple[int, int] | None = None  # (txid, backend pid) of a commit we did not hear
    for attempt in range(1, attempts + 1):
        conn = None
        txid = None
        try:
            conn = connect(settings, name="outbox-bridge send")
            with conn.cursor() as cur:
                if unknown is not None:
                    # its backend may not have noticed yet that we left: end it first
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE pid = %s AND backend_xid::text = (%s %% 4294967296)::text",
                        (unknown[1], unknown[0]),
                    )
                    if cur.fetchall():
                        raise psycopg2.errors.SerializationFailure(
                            f"transaction {unknown[0]} was still in progress"
                        )
                    if sent(cur, settings, message_id):
                        return message_id
                    unknown = None  # it did not commit: write it again
                cur.execute("SELECT txid_current(), pg_backend_pid()")
                txid = cur.fetchone()
                cur.execute(_insert(settings, row), row)
                cur.execute(
                    render_text("outbox.insert_receipt", settings.schema),
                    (str(message_id),),
                )
            conn.commit()
            return message_id
        except psycopg2.Error as exc:
            if txid is not None:
                unknown = txid  # maybe committed: ask before writing again
            if not is_transient(exc) or attempt == attempts:
                raise
            delay = min(2.0, 0.1 * 2 ** (attempt - 1))
            log.warning("send to %r failed (%s); retry %d in %.1fs", topic, exc, attempt, delay)
            time.sleep(delay)
        finally:
            if conn is not None:
                conn.close()
    raise AssertionError("unreachable")


replies_with(publish)  # Message.reply() publishes with it
