"""Signals of outbox-bridge: ``message_dead``, fired once per message that becomes dead.

Connect a receiver the Celery way::

    from outbox_bridge.signals import message_dead

    @message_dead.connect
    def alert(sender, message, **kwargs):  # sender: "outbox" or the handler's name
        page_the_team(message.topic, message.key, message.last_error)

or name a callable ``f(message)`` in the setting ``outbox_bridge_dead_hook``.
Both run in the process that made the message dead (a pool process, or the
worker's main process for the dispatcher and the consumer), after that change
committed; an exception in one is logged and changes nothing. A process that
dies between the commit and the call does not call it: the message is dead all
the same (``outbox-bridge dead list``).
"""

from __future__ import annotations

import logging

from celery.utils.dispatch import Signal
from kombu.utils.imports import symbol_by_name

from .config import get_settings
from .queue import DeadMessage

__all__ = ["DeadMessage", "DeadSignal", "message_dead"]

log = logging.getLogger(__name__)

message_dead = Signal(name="outbox_bridge.message_dead", providing_args={"message"})


class DeadSignal:
    """The built-in subscriber of the ``dead`` event: the signal, then the hook."""

    def __init__(self) -> None:
        self._hooks: dict[str, object] = {}

    def dead(self, message: DeadMessage) -> None:
        for receiver, result in message_dead.send_robust(sender=message.queue, message=message):
            if isinstance(result, Exception):
                log.error("message_dead receiver %r failed: %r", receiver, result)
        path = get_settings().dead_hook
        if not path:
            return
        try:
            hook = self._hooks.get(path) or self._hooks.setdefault(path, symbol_by_name(path))
        except Exception:  # noqa: BLE001 - a bad setting must not stop the caller
            log.exception("outbox_bridge_dead_hook %r cannot be imported", path)
            return
        try:
            hook(message)
        except Exception:  # noqa: BLE001
            log.exception("outbox_bridge_dead_hook failed for %s %d", message.queue, message.id)
