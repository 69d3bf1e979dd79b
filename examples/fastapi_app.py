"""A FastAPI route that writes an order and its message in one transaction
(SQLAlchemy AsyncSession on asyncpg): uvicorn examples.fastapi_app:app"""

import os
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from examples.models import Order
from outbox_bridge import publish_async

DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:55432/outbox_bridge"
engine = create_async_engine(os.environ.get("DATABASE_URL", DATABASE_URL))
Session = async_sessionmaker(engine, expire_on_commit=False)
app = FastAPI()


async def session() -> AsyncIterator[AsyncSession]:
    async with Session() as db:
        yield db


class NewOrder(BaseModel):
    total: Decimal


@app.post("/orders", status_code=201)
async def create_order(new: NewOrder, db: Annotated[AsyncSession, Depends(session)]) -> dict:
    async with db.begin():  # the order and its message commit together, or neither
        order = Order(total=new.total)
        db.add(order)
        await db.flush()  # gives the order its id
        await publish_async(
            db,
            "orders",
            {"id": order.id, "total": str(order.total)},
            key=f"order-{order.id}",
            headers={"type": "OrderCreated"},
        )
    return {"id": order.id}
