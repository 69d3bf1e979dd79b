"""A saga over the outbox: an order asks the payment service for its money, and the
payment service's reply confirms (or cancels) it.

    order service                 payment service
    place_order()  --payments-->  charge()
    settle()  <--payment-replies--  message.reply()

Each step is one transaction of its service: its own rows and the message it sends
commit together, and the inbox hands each message to its handler once. Run both
sides in one worker with ``celery -A outbox_bridge worker --include examples.saga``.
"""

import os
from decimal import Decimal

from outbox_bridge import outbox_handler, publish

PAYMENTS = os.environ.get("SAGA_PAYMENTS_TOPIC", "payments")
REPLIES = os.environ.get("SAGA_REPLIES_TOPIC", "payment-replies")
LIMIT = Decimal("100")  # the payment service declines more than this

SCHEMA = """
CREATE TABLE IF NOT EXISTS saga_orders (
    id serial PRIMARY KEY, total numeric NOT NULL, state text NOT NULL, request uuid);
CREATE TABLE IF NOT EXISTS saga_payments (
    order_id int PRIMARY KEY, amount numeric NOT NULL, accepted boolean NOT NULL);
"""


def place_order(conn, total: Decimal) -> int:
    """The order service: the order and its payment request, in one transaction."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO saga_orders (total, state) VALUES (%s, 'awaiting payment') RETURNING id",
            (total,),
        )
        (order_id,) = cur.fetchone()
        request = publish(
            cur,
            PAYMENTS,
            {"order": order_id, "amount": str(total)},
            key=f"order-{order_id}",
            reply_to=REPLIES,
        )
        cur.execute("UPDATE saga_orders SET request = %s WHERE id = %s", (str(request), order_id))
    return order_id


@outbox_handler(PAYMENTS, name="saga.charge")
def charge(message, tx):
    """The payment service: charge (or decline) and answer, in one transaction."""
    amount = Decimal(message.value["amount"])
    accepted = amount <= LIMIT
    tx.execute(
        "INSERT INTO saga_payments (order_id, amount, accepted) VALUES (%s, %s, %s)",
        (message.value["order"], amount, accepted),
    )
    message.reply(tx, {"order": message.value["order"], "paid": accepted})


@outbox_handler(REPLIES, name="saga.settle")
def settle(message, tx):
    """The order service again: the reply's correlation id is its request's message id."""
    state = "confirmed" if message.value["paid"] else "cancelled"
    tx.execute(
        "UPDATE saga_orders SET state = %s WHERE request = %s AND state = 'awaiting payment'",
        (state, str(message.correlation_id)),
    )
