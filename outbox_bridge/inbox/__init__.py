"""The inbox side: the Kafka consumer stores messages and one delivery per handler
(``consumer``); handler tasks run them effectively once (``handlers``)."""

from __future__ import annotations

from ..config import Settings
from ..queue import Queue


def inbox_queue(settings: Settings, handler: str) -> Queue:
    return Queue(
        name=f"inbox:{handler}",
        table="deliveries",
        schema=settings.schema,
        scope=handler,
        done="done",
        size_column=None,
    )
