"""The demo's handler: the sample shipping service records every order it hears of.

Loaded by ``scripts/up`` with ``celery -A outbox_bridge worker --include
outbox_bridge.tools.demo.handlers``.
"""

from outbox_bridge import Message, outbox_handler

DEMO_TOPIC = "demo.orders"


@outbox_handler(DEMO_TOPIC, max_retries=3)
def ship(message: Message, tx) -> None:
    """Record a shipment for the order, in the transaction that marks it handled."""
    # the primary key would refuse a second run of the same order: effectively once
    tx.execute(
        "INSERT INTO demo.shipments (order_id, customer) VALUES (%s, %s)",
        (message.value["order_id"], message.value["customer"]),
    )
