"""What a message carries besides its value, as publish() writes it: when it may go
(``deliver_at``/``delay``), until when (``expires_at``/``ttl``, the ``expires_at``
header), where replies go (``reply_to``), its type, and the CloudEvents attributes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from ..errors import InvalidHeaders, InvalidMessage, InvalidTime
from ..message import (
    CE_PREFIX,
    CONTENT_TYPE_HEADER,
    EXPIRES_HEADER,
    REPLY_TO_HEADER,
    TYPE_HEADER,
    check_topic,
    format_time,
    parse_time,
)

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


def with_expiry(stored: list, expires: datetime | None) -> list:
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


def with_reply_to(stored: list, reply_to: str | None) -> list:
    if reply_to is None:
        return stored
    try:
        check_topic(reply_to)
    except InvalidMessage as exc:
        raise type(exc)(f"reply_to: {exc}") from None
    if any(pair[0] == REPLY_TO_HEADER for pair in stored):
        raise InvalidHeaders(f"header {REPLY_TO_HEADER!r} is set by reply_to=; not both")
    return [*stored, [REPLY_TO_HEADER, reply_to]]


def with_type(stored: list, type_: str | None) -> list:
    if type_ is None:
        return stored
    if not isinstance(type_, str) or not type_:
        raise InvalidHeaders(f"type must be a non-empty string, got {type_!r}")
    if any(pair[0] == TYPE_HEADER for pair in stored):
        raise InvalidHeaders(f"give type= or a {TYPE_HEADER!r} header, not both")
    return [*stored, [TYPE_HEADER, type_]]


# the attributes outbox-bridge sets as CloudEvents headers (a producer's own ce_* go as given)
CE_OWN = ("specversion", "id", "source", "type", "time")


def as_cloudevent(
    stored: list, source: str, message_id: UUID, type_: str | None, value: Any, serializer
) -> list:
    """Stored headers with the CloudEvents attributes (binary content mode). ``ce_type`` is
    ``type_`` or the ``type`` header (which stays a header of its own, as given)."""
    own = [n for n, _ in stored if n.lower() in {CE_PREFIX + a for a in CE_OWN}]
    if own:
        raise InvalidHeaders(f"header {own[0]!r} is set by outbox-bridge in CloudEvents mode")
    with_type(stored, type_)  # the same checks: a non-empty string, not given twice
    event_type = type_ or next((v for n, v in stored if n == TYPE_HEADER), None)
    if not isinstance(event_type, str) or not event_type:
        raise InvalidHeaders(
            "CloudEvents mode (outbox_bridge_cloudevents_source) needs each message's type:"
            f" give type= or a {TYPE_HEADER!r} header"
        )
    attributes = [
        ["ce_specversion", "1.0"],
        ["ce_id", str(message_id)],
        ["ce_source", source],
        ["ce_type", event_type],
        ["ce_time", format_time(datetime.now(timezone.utc))],
    ]
    if not any(n.lower() == CONTENT_TYPE_HEADER for n, _ in stored):
        content_type = getattr(serializer, "content_type", None)
        if serializer is None:
            raw = isinstance(value, (bytes, bytearray, memoryview))
            content_type = "application/octet-stream" if raw else "application/json"
        if content_type:
            attributes.append([CONTENT_TYPE_HEADER, content_type])
    return [*stored, *attributes]


def model_headers(
    stored: list,
    when: Timing,
    reply_to: str | None,
    type_: str | None,
    source: str,
    message_id: UUID,
    value: Any,
    serializer,
) -> list:
    """Stored headers with what the message model adds to them (``source``: the
    CloudEvents mode's ``ce_source``, "" when off)."""
    stored = with_reply_to(with_expiry(stored, when.expires), reply_to)
    if source:
        return as_cloudevent(stored, source, message_id, type_, value, serializer)
    return with_type(stored, type_)
