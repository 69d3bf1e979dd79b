"""The benchmark's trivial handlers: one row per message (``outbox-bridge bench``), one
INSERT per message, or one INSERT per batch (``batch=True``)."""

import os

from outbox_bridge import Message, outbox_handler

TOPIC = os.environ.get("OUTBOX_BRIDGE_BENCH_TOPIC", "bench.e2e")
BATCH_TOPIC = os.environ.get("OUTBOX_BRIDGE_BENCH_BATCH_TOPIC", "bench.e2e-batch")


@outbox_handler(TOPIC, name="outbox.bench.record", serializer=None)
def record(message: Message, tx) -> None:
    tx.execute(
        "INSERT INTO bench_done (message_id, t) VALUES (%s, %s)",
        (message.message_id, message.value["t"]),
    )


@outbox_handler(BATCH_TOPIC, name="outbox.bench.record_batch", serializer=None, batch=True)
def record_batch(messages: list[Message], tx) -> None:
    tx.execute(
        "INSERT INTO bench_done (message_id, t)"
        " SELECT * FROM unnest(%s::uuid[], %s::double precision[])",
        ([str(m.message_id) for m in messages], [m.value["t"] for m in messages]),
    )
