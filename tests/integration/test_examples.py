"""The README's examples (examples/) run against the real PostgreSQL, and the
README shows them as they are in those files."""

import asyncio
import importlib
import re
from decimal import Decimal

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from examples.models import Base
from tests.conftest import ROOT, rows, sqlalchemy_url

pytestmark = pytest.mark.postgres


@pytest.fixture
def orders_db(db_url):
    engine = create_engine(sqlalchemy_url(db_url, "psycopg2"))
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _orders(engine):
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT id, total FROM orders")]


def test_the_sqlalchemy_unit_of_work_commits_the_order_with_its_message(orders_db, db_url):
    from examples.sqlalchemy_uow import place_order

    order_id = place_order(sessionmaker(orders_db), Decimal("9.90"))
    assert _orders(orders_db) == [(order_id, Decimal("9.90"))]
    assert [(r[1], r[2]) for r in rows(db_url)] == [("orders", f"order-{order_id}")]


def test_the_fastapi_route_commits_the_order_with_its_message(orders_db, db_url, monkeypatch):
    import httpx

    monkeypatch.setenv("DATABASE_URL", sqlalchemy_url(db_url, "asyncpg"))
    example = importlib.reload(importlib.import_module("examples.fastapi_app"))

    async def post():
        transport = httpx.ASGITransport(app=example.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            response = await client.post("/orders", json={"total": "9.90"})
        await example.engine.dispose()
        return response

    response = asyncio.run(post())
    assert response.status_code == 201, response.text
    order_id = response.json()["id"]
    assert _orders(orders_db) == [(order_id, Decimal("9.90"))]
    assert [(r[1], r[2]) for r in rows(db_url)] == [("orders", f"order-{order_id}")]


def test_the_readme_shows_the_examples_as_they_are():
    """Each ```python block after <!-- example: PATH --> is a verbatim part of PATH."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 3
    for path, code in blocks:
        assert code.strip() in (ROOT / path).read_text(), f"README differs from {path}"
