"""Writing messages to the outbox: ``publish`` (your transaction) and ``send`` (its own)."""

from __future__ import annotations

import logging
import random
import time
import uuid
import zlib
from typing import Any
from uuid import UUID

import psycopg2
from psycopg2.extras import Json

from .config import Settings, get_settings
from .db import connect, is_transient, q
from .errors import MessageTooLarge
from .message import (
    Headers,
    JSONSerializer,
    Serializer,
    check_topic,
    encode_headers,
    encode_key,
    record_size,
)

log = logging.getLogger(__name__)

_json = JSONSerializer()

_INSERT = (
    "INSERT INTO {outbox} (message_id, topic, key, value, headers, shard)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)


def shard_of(topic: str, key: bytes | None, shards: int) -> int:
    """The shard of a message: all messages of one (topic, key) share it."""
    if key is None:
        return random.randrange(shards)  # no order to keep: spread them
    return zlib.crc32(topic.encode() + b"\0" + key) % shards


def _row(
    topic: str,
    value: Any,
    key: str | bytes | None,
    headers: Headers | None,
    serializer: Serializer | None,
    settings: Settings,
    message_id: UUID,
) -> tuple:
    check_topic(topic)
    key_bytes = encode_key(key)
    stored_headers = encode_headers(headers)
    data = (serializer or _json).dumps(value)
    size = record_size(key_bytes, data, stored_headers)
    if size > settings.max_message_bytes:
        raise MessageTooLarge(
            f"message to {topic!r} is {size} bytes as a Kafka record, more than"
            f" outbox_bridge_max_message_bytes ({settings.max_message_bytes})"
        )
    shard = shard_of(topic, key_bytes, settings.shards)
    return (message_id, topic, key_bytes, data, Json(stored_headers), shard)


def publish(
    conn_or_cursor: Any,
    topic: str,
    value: Any,
    *,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    serializer: Serializer | None = None,
) -> UUID:
    """Write a message to the outbox inside the caller's transaction.

    ``conn_or_cursor`` is a psycopg2 connection or cursor; nothing is committed
    here, and nothing is sent if the caller's transaction rolls back. ``value``
    is serialized as JSON unless it is ``bytes`` (sent as is) or a
    ``serializer`` is given. Returns the message id, which travels to Kafka as
    the ``message_id`` header.

    Raises an ``InvalidMessage`` (a ``ValueError``) naming the problem, and
    writes nothing, for an illegal topic, a key or header of the wrong type, an
    unserializable value or a message over ``outbox_bridge_max_message_bytes``.
    """
    settings = get_settings()
    message_id = uuid.uuid4()
    row = _row(topic, value, key, headers, serializer, settings, message_id)
    if hasattr(conn_or_cursor, "cursor"):
        with conn_or_cursor.cursor() as cur:
            cur.execute(q(_INSERT, settings.schema), row)
    else:
        conn_or_cursor.execute(q(_INSERT, settings.schema), row)
    return message_id


def send(
    topic: str,
    value: Any,
    *,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    serializer: Serializer | None = None,
    retries: int | None = None,
) -> UUID:
    """Write a message to the outbox in a transaction of its own, and commit it.

    For code that has no transaction at hand. Transient database errors
    (connection lost, serialization failure, deadlock) are retried up to
    ``retries`` times (default ``outbox_bridge_send_retries``) with a short
    backoff. A commit whose outcome was lost is never written twice: the next
    attempt first asks PostgreSQL what became of that transaction
    (``txid_status``). Invalid input raises as in :func:`publish`, before any
    connection is made.
    """
    settings = get_settings()
    message_id = uuid.uuid4()
    row = _row(topic, value, key, headers, serializer, settings, message_id)
    attempts = 1 + (settings.send_retries if retries is None else retries)
    unknown: tuple[int, int] | None = None  # (txid, backend pid) of a commit we did not hear
    for attempt in range(1, attempts + 1):
        conn = None
        txid = None
        try:
            conn = connect(settings, name="outbox-bridge send")
            with conn.cursor() as cur:
                if unknown is not None:
                    cur.execute("SELECT txid_status(%s)", (unknown[0],))
                    status = cur.fetchone()[0]
                    if status == "committed":
                        return message_id
                    if status == "in progress":  # its backend has not noticed yet: end it
                        cur.execute("SELECT pg_terminate_backend(%s)", (unknown[1],))
                        raise psycopg2.errors.SerializationFailure(
                            f"transaction {unknown[0]} still in progress"
                        )
                    unknown = None  # aborted (or gone): write it again
                cur.execute("SELECT txid_current(), pg_backend_pid()")
                txid = cur.fetchone()
                cur.execute(q(_INSERT, settings.schema), row)
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
