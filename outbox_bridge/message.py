"""The message as a handler sees it, and how messages are encoded."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol
from uuid import UUID, uuid5

from .errors import (
    DecodeError,
    InvalidHeaders,
    InvalidKey,
    InvalidTopic,
    NoReplyTo,
    NotSerializable,
)

# The Kafka header that carries the outbox message id, for deduplication.
MESSAGE_ID_HEADER = "message_id"
# The Kafka header that carries a message's expiry (``publish(..., ttl=)``), an ISO 8601
# UTC time such as 2026-12-04T21:30:00.000Z, so that any consumer can honour it.
EXPIRES_HEADER = "expires_at"
# Request/reply: the topic a reply goes to, and a reply's request (its message id).
REPLY_TO_HEADER = "reply_to"
CORRELATION_HEADER = "correlation_id"
# CloudEvents' Kafka binding, binary content mode: attributes as ce_* headers, the
# data's media type as content-type
CE_PREFIX = "ce_"
CONTENT_TYPE_HEADER = "content-type"
TYPE_HEADER = "type"
# ids of CloudEvents whose ce_id is not a UUID: uuid5 of this and "source\0id"
CLOUDEVENT_NAMESPACE = UUID("0b6f3b4c-2b8e-4f7a-9d55-5c6c1c3e7a21")
# Longest key whose order outbox-bridge keeps: with the topic it must fit a
# btree index entry (2704 bytes) of the held-keys index.
MAX_KEY_BYTES = 2000
# What Kafka adds to a record around key, value and headers (varints, batch
# header), counted generously so that what publish() accepts, Kafka accepts.
RECORD_OVERHEAD = 128

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

HeaderValue = str | bytes | None
Headers = Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]]


@dataclass(frozen=True)
class Message:
    """A message consumed from Kafka, as passed to an ``@outbox_handler``."""

    message_id: UUID
    topic: str
    key: bytes | None
    value: Any
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    partition: int | None = None
    offset: int | None = None
    timestamp: datetime | None = None

    def header(self, name: str) -> str | None:
        """The first header ``name`` as text (None: absent or empty)."""
        for found, value in self.headers:
            if found == name and value is not None:
                return value.decode("utf-8", errors="replace")
        return None

    @property
    def reply_to(self) -> str | None:
        """The topic that replies to this message go to (``publish(..., reply_to=)``)."""
        return self.header(REPLY_TO_HEADER)

    @property
    def correlation_id(self) -> UUID | str | None:
        """For a reply: the message id of the request it answers (its ``correlation_id``
        header; a UUID when it is one, else the text another producer put there)."""
        text = self.header(CORRELATION_HEADER)
        if text is None:
            return None
        try:
            return UUID(text)
        except ValueError:
            return text

    def reply(
        self,
        tx: Any,
        value: Any,
        *,
        headers: Headers | None = None,
        serializer: Serializer | None = None,
        **options: Any,
    ) -> UUID:
        """Publish a reply to this message in ``tx`` (the handler's transaction): to its
        ``reply_to`` topic, with its key (replies keep the requests' per-key order) and
        a ``correlation_id`` header equal to its message id. ``options`` are
        :func:`~outbox_bridge.publish`'s (``delay``, ``ttl``, ...). Raises ``NoReplyTo``
        when the message has no ``reply_to``."""
        topic = self.reply_to
        if topic is None:
            raise NoReplyTo(
                f"message {self.message_id} on {self.topic!r} has no {REPLY_TO_HEADER!r} header:"
                " publish the request with reply_to= to reply to it"
            )
        pairs = list(headers.items() if isinstance(headers, Mapping) else headers or ())
        if any(
            isinstance(p, (tuple, list)) and p[:1] == type(p)([CORRELATION_HEADER]) for p in pairs
        ):
            raise InvalidHeaders(f"header {CORRELATION_HEADER!r} is set by reply()")
        if not _publishers:
            raise RuntimeError("outbox_bridge.outbox.publish is not imported")
        return _publishers[0](
            tx,
            topic,
            value,
            key=self.key,
            headers=[*pairs, (CORRELATION_HEADER, str(self.message_id))],
            serializer=serializer,
            **options,
        )

    @property
    def cloudevent(self) -> dict[str, str] | None:
        """The CloudEvents attributes of a message in binary content mode (``ce_*``
        headers; ``datacontenttype`` from content-type), or None if it is not one."""
        attributes = {}
        for name, value in self.headers:
            lowered = name.lower()
            if lowered.startswith(CE_PREFIX) and value is not None:
                attributes[lowered[len(CE_PREFIX) :]] = value.decode("utf-8", errors="replace")
        if "specversion" not in attributes:
            return None
        content_type = self.header(CONTENT_TYPE_HEADER)
        if content_type is not None:
            attributes["datacontenttype"] = content_type
        return attributes

    @property
    def expires_at(self) -> datetime | None:
        """When the message expires (its ``expires_at`` header), or None."""
        when = parse_time(self.header(EXPIRES_HEADER))
        return None if when is None else datetime.fromtimestamp(when, timezone.utc)


# publish(), registered by the outbox side when it is imported: the core imports no side
_publishers: list[Callable[..., UUID]] = []


def replies_with(publish: Callable[..., UUID]) -> None:
    """Make ``publish`` the function that ``Message.reply`` calls."""
    _publishers[:] = [publish]


def cloudevent_id(source: str | None, event_id: str) -> UUID:
    """The inbox's message id of a CloudEvent with no ``message_id`` header: its
    ``ce_id`` when that is a UUID, else a UUID derived from ``ce_source`` and ``ce_id``
    (which CloudEvents makes unique together), so copies of one event dedupe."""
    try:
        return UUID(event_id)
    except ValueError:
        return uuid5(CLOUDEVENT_NAMESPACE, f"{source or ''}\0{event_id}")


def format_time(when: datetime) -> str:
    """An aware datetime as carried in headers: ISO 8601 in UTC, milliseconds, "Z"."""
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> float | None:
    """Epoch seconds of a header time (None: absent, or not a time with a zone)."""
    if not text:
        return None
    text = text.strip()
    if text[-1:] in ("Z", "z"):  # Python 3.10's fromisoformat does not read "Z"
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return None if when.tzinfo is None else when.timestamp()


def stored_value(stored: list[list[Any]] | None, name: str) -> str | None:
    """The first text value of header ``name`` in stored headers."""
    for pair in stored or ():
        if pair[0] == name and isinstance(pair[1], str):
            return pair[1]
    return None


def expiry_of(stored: list[list[Any]] | None) -> float | None:
    """Epoch seconds at which a message with these stored headers expires, or None."""
    return parse_time(stored_value(stored, EXPIRES_HEADER)) if stored else None


class Serializer(Protocol):
    """Turns a value into bytes (``dumps``) and back (``loads``)."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JSONSerializer:
    """The default: compact UTF-8 JSON; ``bytes`` pass through untouched."""

    def dumps(self, value: Any) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        try:
            # allow_nan=False: NaN and Infinity are not JSON, and other consumers refuse them
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            return text.encode()
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError: a lone surrogate
            raise NotSerializable(
                f"value of type {type(value).__name__} is not JSON-serializable: {exc}"
            ) from exc

    def loads(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"not JSON: {exc}") from exc


def check_topic(topic: object) -> str:
    """The topic, or InvalidTopic naming what is wrong with it."""
    if not isinstance(topic, str) or not topic:
        raise InvalidTopic(f"topic must be a non-empty string, got {topic!r}")
    if topic in (".", "..") or not _TOPIC.match(topic):
        raise InvalidTopic(f"illegal Kafka topic name {topic!r}: use 1 to 249 of A-Z a-z 0-9 . _ -")
    return topic


def encode_key(key: str | bytes | None) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        key = _utf8(key, "the key", InvalidKey)
    elif isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    elif not isinstance(key, bytes):
        raise InvalidKey(f"key must be str, bytes or None, got {type(key).__name__}")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidKey(
            f"key is {len(key)} bytes; outbox-bridge keeps the order of keys up to"
            f" {MAX_KEY_BYTES} bytes (hash longer keys)"
        )
    return key


def _utf8(text: str, what: str, error: type[Exception]) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise error(f"{what} is not valid Unicode (a lone surrogate?): {exc.reason}") from None


def encode_headers(headers: Headers | None) -> list[list[Any]]:
    """Headers as stored in the outbox: [[name, str | {"b64": ...} | None], ...]."""
    if headers is None:
        return []
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    stored = []
    for pair in pairs:
        try:
            name, value = pair
        except (TypeError, ValueError):
            raise InvalidHeaders(
                f"headers must be a mapping or (name, value) pairs, got {pair!r}"
            ) from None
        if not isinstance(name, str) or not name:
            raise InvalidHeaders(f"header names must be non-empty strings, got {name!r}")
        _utf8(name, f"header name {name!r}", InvalidHeaders)
        if "\x00" in name:
            raise InvalidHeaders(f"header name {name!r} contains NUL")
        if name == MESSAGE_ID_HEADER:
            raise InvalidHeaders(f"header {MESSAGE_ID_HEADER!r} is set by outbox-bridge")
        if isinstance(value, str):
            raw = _utf8(value, f"header {name!r}", InvalidHeaders)
            if "\x00" in value:  # jsonb text cannot hold NUL: carry the bytes instead
                value = as_bytes(raw)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            value = as_bytes(bytes(value))
        elif value is not None:
            raise InvalidHeaders(
                f"header {name!r} must be str, bytes or None, got {type(value).__name__}"
            )
        stored.append([name, value])
    return stored


def as_bytes(raw: bytes) -> dict[str, str]:
    """A header value as stored when it cannot be jsonb text: its bytes in base64."""
    return {"b64": base64.b64encode(raw).decode()}


def as_stored(value: bytes | None) -> str | dict[str, str] | None:
    """A header value from Kafka as stored: text when it is UTF-8 without NUL (which
    jsonb refuses), else its bytes (``as_bytes``)."""
    if value is None:
        return None
    text = value.decode("utf-8", errors="replace")
    return as_bytes(value) if "\ufffd" in text or "\x00" in text else text


def decode_stored(stored: list[list[Any]] | None) -> list[tuple[str, bytes | None]]:
    """Stored headers as (name, bytes) pairs again."""
    return [
        (
            name,
            base64.b64decode(value["b64"])
            if isinstance(value, dict)
            else None
            if value is None
            else value.encode(),
        )
        for name, value in stored or ()
    ]


def kafka_headers(
    stored: list[list[Any]] | None, message_id: UUID | str
) -> list[tuple[str, bytes | None]]:
    """Stored headers as Kafka headers, with the message id first."""
    return [(MESSAGE_ID_HEADER, str(message_id).encode()), *decode_stored(stored)]


def record_size(key: bytes | None, value: bytes | None, stored: list[list[Any]]) -> int:
    """Bytes of the Kafka record: key, value, headers with the message id, overhead."""
    headers = kafka_headers(stored, "00000000-0000-0000-0000-000000000000")
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(n.encode()) + len(v or b"") for n, v in headers)
        + RECORD_OVERHEAD
    )
