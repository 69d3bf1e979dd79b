"""The outbox side: ``publish`` writes a message in the caller's transaction
(``publish``), the publish tasks send it to Kafka (``tasks``, ``kafka``)."""

from __future__ import annotations

from ..config import Settings
from ..queue import Queue


def outbox_queue(settings: Settings) -> Queue:
    return Queue(name="outbox", table="outbox", schema=settings.schema)
