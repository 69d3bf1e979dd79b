"""The fleet figure's handler: waits 10 ms in PostgreSQL per message, as a handler
that does I/O (``outbox-bridge bench``, ``fleet_capacity``)."""

import os

from outbox_bridge import Message, outbox_handler

TOPIC = os.environ.get("OUTBOX_BRIDGE_BENCH_WAIT_TOPIC", "bench.waits")


@outbox_handler(TOPIC, name="outbox.bench.waits", serializer=None)
def waits(message: Message, tx) -> None:
    tx.execute("SELECT pg_sleep(0.01)")
    tx.execute("INSERT INTO bench_done (message_id, t) VALUES (%s, 0)", (message.message_id,))
