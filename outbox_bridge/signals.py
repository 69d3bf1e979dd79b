"""Signals of outbox-bridge: ``message_dead``, fired once per message that becomes dead.

Connect a receiver the Celery way::

    from outbox_bridge.signals import message_dead

    @message_dead.connect
    def alert(sender, message, **kwargs):  # sender: "outbox" or the handler's name
        page_the_team(message.topic, message.key, message.last_error)

or name a callable ``f(message)`` in the setting ``outbox_bridge_dead_hook``.
Both run in the process that made the message dead (a pool process, or the
worker's main process for the watcher and the consumer), after that change
committed; an exception in one is logged and changes nothing. A process that
dies between the commit and the call does not call it: the message is dead all
the same (``outbox-bridge dead list``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID

from celery.utils.dispatch import Signal
from kombu.utils.imports import symbol_by_name

log = logging.getLogger(__name__)

message_dead = Signal(name="outbox_bridge.message_dead", providing_args={"message"})


@dataclass(frozen=True)
class DeadMessage:
    """A message that has just become dead.

    ``queue`` is ``"outbox"`` (it could not be sent to Kafka) or the name of
    the handler task that could not handle it; ``id`` is the row id that
    ``outbox-bridge dead retry --id`` takes.
    """

    queue: str
    id: int
    message_id: UUID
    topic: str
    key: bytes | None
    attempts: int
    last_error: str | None


# RETURNING columns of a row that became dead, in DeadMessage's order after queue
DEAD_COLUMNS = "id, message_id, topic, key, attempts, last_error"


def dead_messages(queue: str, rows: Iterable[tuple]) -> list[DeadMessage]:
    return [
        DeadMessage(queue, r[0], r[1], r[2], None if r[3] is None else bytes(r[3]), r[4], r[5])
        for r in rows
    ]


_hooks: dict[str, object] = {}


def fire_dead(dead: Iterable[DeadMessage]) -> None:
    """Tell the receivers of ``message_dead`` and the ``dead_hook`` setting; call only
    after the transaction that made them dead has committed."""
    from .config import get_settings

    dead = list(dead)
    if not dead:
        return
    from .contrib import metrics

    for message in dead:
        metrics.count("dead", message.queue)
    path = get_settings().dead_hook
    hook = None
    if path:
        try:
            hook = _hooks.get(path) or _hooks.setdefault(path, symbol_by_name(path))
        except Exception:  # noqa: BLE001 - a bad setting must not stop the caller
            log.exception("outbox_bridge_dead_hook %r cannot be imported", path)
    for message in dead:
        for receiver, result in message_dead.send_robust(sender=message.queue, message=message):
            if isinstance(result, Exception):
                log.error("message_dead receiver %r failed: %r", receiver, result)
        if hook is not None:
            try:
                hook(message)
            except Exception:  # noqa: BLE001
                log.exception("outbox_bridge_dead_hook failed for %s %d", message.queue, message.id)
