"""A SQLAlchemy unit of work: the order and its message in one transaction."""

from decimal import Decimal

from sqlalchemy.orm import Session, sessionmaker

from examples.models import Order
from outbox_bridge import publish


def place_order(sessions: sessionmaker[Session], total: Decimal) -> int:
    with sessions.begin() as session:  # commits at the end; an exception rolls back both
        order = Order(total=total)
        session.add(order)
        session.flush()  # gives the order its id
        publish(
            session,
            "orders",
            {"id": order.id, "total": str(order.total)},
            key=f"order-{order.id}",
            headers={"type": "OrderCreated"},
        )
        order_id = order.id
    return order_id
