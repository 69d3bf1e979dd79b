"""The benchmark's trivial handler: one row per message (``outbox-bridge bench``)."""

import os

from outbox_bridge import Message, outbox_handler

TOPIC = os.environ.get("OUTBOX_BRIDGE_BENCH_TOPIC", "bench.e2e")


@outbox_handler(TOPIC, name="outbox.bench.record", serializer=None)
def record(message: Message, tx) -> None:
    tx.execute(
        "INSERT INTO bench_done (message_id, t) VALUES (%s, %s)",
        (message.message_id, message.value["t"]),
    )
