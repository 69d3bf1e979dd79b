"""The soak's handlers, loaded by its workers (``--include outbox_bridge.tools.soak.handlers``).

``soak.effect`` writes an effect row, chains a message, and replies to a message that
asks for one (``reply_to``); ``soak.flaky``, a batch handler, fails at random (and
always on a poison message) before it writes its batch's effect rows in one statement.
"""

from __future__ import annotations

import os
import random

from outbox_bridge import outbox_handler, publish

TOPIC = os.environ.get("OUTBOX_BRIDGE_SOAK_TOPIC", "soak-events")
CHAINED = os.environ.get("OUTBOX_BRIDGE_SOAK_CHAINED", "soak-chained")
FAIL_RATE = float(os.environ.get("OUTBOX_BRIDGE_SOAK_FAIL_RATE", "0.2"))
RETRIES = {"max_retries": 8, "retry_backoff": 0.5, "retry_backoff_max": 2}


def _effect(tx, handler: str, message) -> None:
    tx.execute(
        "INSERT INTO soak_effects (message_id, handler, key) VALUES (%s, %s, %s)",
        (message.message_id, handler, message.key),
    )


@outbox_handler(TOPIC, name="soak.effect", **RETRIES)
def effect(message, tx) -> None:
    _effect(tx, "soak.effect", message)
    publish(tx, CHAINED, {"from": str(message.message_id)}, key=message.key)
    if message.reply_to:
        message.reply(tx, {"from": str(message.message_id)})


@outbox_handler(TOPIC, name="soak.flaky", batch=True, **RETRIES)
def flaky(messages, tx) -> None:
    # each message of a call fails at random: a failed call is halved until the
    # failing ones stand alone, so each message ends up failing at about FAIL_RATE
    for message in messages:
        if message.value.get("poison"):
            raise RuntimeError("poison: fails on purpose, every time")
        if random.random() < FAIL_RATE:
            raise RuntimeError("injected handler failure")
    tx.execute(
        "INSERT INTO soak_effects (message_id, handler, key)"
        " SELECT m, 'soak.flaky', k FROM unnest(%s::uuid[], %s::bytea[]) AS x(m, k)",
        ([str(m.message_id) for m in messages], [m.key for m in messages]),
    )
