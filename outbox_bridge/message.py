"""The message as a handler sees it, and how messages are encoded."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from .errors import DecodeError, InvalidHeaders, InvalidTopic, NotSerializable

# The Kafka header that carries the outbox message id, for deduplication.
MESSAGE_ID_HEADER = "message_id"

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
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
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
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    raise InvalidHeaders(f"key must be str, bytes or None, got {type(key).__name__}")


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
        if name == MESSAGE_ID_HEADER:
            raise InvalidHeaders(f"header {MESSAGE_ID_HEADER!r} is set by outbox-bridge")
        if isinstance(value, bytes):
            value = {"b64": base64.b64encode(value).decode()}
        elif value is not None and not isinstance(value, str):
            raise InvalidHeaders(
                f"header {name!r} must be str, bytes or None, got {type(value).__name__}"
            )
        stored.append([name, value])
    return stored


def kafka_headers(
    stored: list[list[Any]] | None, message_id: UUID | str
) -> list[tuple[str, bytes | None]]:
    """Stored headers as Kafka headers, with the message id first."""
    out: list[tuple[str, bytes | None]] = [(MESSAGE_ID_HEADER, str(message_id).encode())]
    for name, value in stored or ():
        if isinstance(value, dict):
            out.append((name, base64.b64decode(value["b64"])))
        else:
            out.append((name, None if value is None else value.encode()))
    return out


def headers_size(stored: list[list[Any]]) -> int:
    return sum(len(n) + len(json.dumps(v)) for n, v in stored)
