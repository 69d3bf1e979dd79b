"""Writing messages to the outbox: ``publish`` (your transaction) and ``send`` (its own)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg2

from ..config import Settings, get_settings
from ..db import connect, is_transient
from ..errors import MessageTooLarge
from ..events import publishing
from ..message import (
    Headers,
    JSONSerializer,
    Serializer,
    check_topic,
    encode_headers,
    encode_key,
    record_size,
    replies_with,
)
from ..queries import render_text
from ..queue import shard_of
from . import adapters
from .model import NOW, Timing, model_headers, timing

log = logging.getLogger(__name__)

_json = JSONSerializer()


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
    stored = model_headers(
        encode_headers(headers),
        when,
        reply_to,
        type_,
        settings.cloudevents_source,
        message_id,
        value,
        serializer,
    )
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
