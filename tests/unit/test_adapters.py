"""Which adapter publish() picks, and the SQL text every adapter shares."""

import asyncio

import pytest

from outbox_bridge import publish, publish_async
from outbox_bridge.db import quote_ident
from outbox_bridge.outbox.adapters import _adapter, numbered
from outbox_bridge.queries import plain as text


def test_an_unknown_transaction_object_is_a_type_error_that_lists_what_works():
    with pytest.raises(TypeError, match="psycopg2 or psycopg 3 connection or cursor.*got dict"):
        publish({}, "orders", 1)
    with pytest.raises(TypeError, match="asyncpg connection.*got list"):
        asyncio.run(publish_async([], "orders", 1))


def test_bad_input_is_refused_before_the_transaction_object_is_looked_at():
    from outbox_bridge import InvalidTopic

    with pytest.raises(InvalidTopic):
        publish(object(), "bad topic", 1)


def test_the_adapter_is_told_by_the_package_of_any_class_in_the_mro():
    class Mine(dict):  # a subclass from elsewhere of nothing we know
        pass

    assert _adapter(Mine()) is None
    psycopg2 = pytest.importorskip("psycopg2.extras")
    module = _adapter(psycopg2.DictCursor.__new__(psycopg2.DictCursor))
    assert module.__name__ == "outbox_bridge.contrib.psycopg2"


def test_placeholders_are_renumbered_for_asyncpg_and_sqlalchemy():
    assert numbered("VALUES (%s, CAST(%s AS uuid))", lambda n: f"${n}") == (
        "VALUES ($1, CAST($2 AS uuid))"
    )
    assert numbered("(%s, %s)", lambda n: f":p{n}") == "(:p1, :p2)"


def test_identifiers_are_quoted_and_nul_is_refused():
    assert quote_ident('Odd "Schema"') == '"Odd ""Schema"""'
    assert text("SELECT * FROM {outbox}", "a.b") == 'SELECT * FROM "a.b"."outbox"'
    with pytest.raises(ValueError, match="NUL"):
        quote_ident("a\x00b")
