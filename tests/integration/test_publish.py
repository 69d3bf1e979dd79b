"""publish() and send() against a real PostgreSQL: written in the caller's
transaction, nothing on rollback, nothing on bad input."""

import uuid

import psycopg2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox_bridge import (
    InvalidHeaders,
    InvalidMessage,
    InvalidTopic,
    MessageTooLarge,
    NotSerializable,
    publish,
    send,
)
from outbox_bridge.config import reset_settings
from outbox_bridge.migrate import migrate
from tests.conftest import rows

pytestmark = pytest.mark.postgres


def test_publish_writes_in_the_callers_transaction(conn, db_url):
    with conn, conn.cursor() as cur:
        message_id = publish(cur, "orders", {"id": 7}, key="order-7", headers={"type": "A"})
        assert rows(db_url) == []  # not visible before the caller commits
    assert isinstance(message_id, uuid.UUID)
    assert [(r[1], r[2], r[3]) for r in rows(db_url)] == [("orders", "order-7", "pending")]


def test_publish_accepts_a_connection_and_bytes(conn, db_url):
    with conn:
        publish(conn, "raw", b"\x00\x01")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT value, key FROM outbox_bridge.outbox")
        value, key = cur.fetchone()
    assert (bytes(value), key) == (b"\x00\x01", None)


def test_nothing_is_written_when_the_transaction_rolls_back(conn, db_url):
    with pytest.raises(RuntimeError), conn, conn.cursor() as cur:
        publish(cur, "orders", {"id": 1})
        raise RuntimeError("business rule failed")
    assert rows(db_url) == []


@pytest.mark.parametrize(
    "args, kwargs, error, words",
    [
        (("", {}), {}, InvalidTopic, "non-empty"),
        (("bad topic", {}), {}, InvalidTopic, "illegal Kafka topic name"),
        (("t", object()), {}, NotSerializable, "not JSON-serializable"),
        (("t", {}), {"headers": {3: "x"}}, InvalidHeaders, "header names"),
        (("t", "x" * 1_000_001), {}, MessageTooLarge, "outbox_bridge_max_message_bytes"),
    ],
)
def test_bad_input_raises_a_clear_error_and_writes_nothing(
    conn, db_url, args, kwargs, error, words
):
    with conn, conn.cursor() as cur:
        with pytest.raises(error, match=words) as exc:
            publish(cur, *args, **kwargs)
        assert type(exc.value) is error  # the documented type itself
        assert isinstance(exc.value, InvalidMessage)
        assert isinstance(exc.value, ValueError)
        cur.execute("SELECT 1")  # the caller's transaction is still usable
    assert rows(db_url) == []
    with pytest.raises(error):
        send(*args, **kwargs)
    assert rows(db_url) == []


def test_max_message_bytes_is_configurable(conn, db_url, monkeypatch):
    # the limit counts the Kafka record: the message_id header and record overhead too
    monkeypatch.setenv("OUTBOX_BRIDGE_MAX_MESSAGE_BYTES", "400")
    reset_settings()
    with conn, conn.cursor() as cur:
        publish(cur, "t", "x" * 50)
        with pytest.raises(MessageTooLarge, match="more than outbox_bridge_max_message_bytes .400"):
            publish(cur, "t", "x" * 300)
    assert len(rows(db_url)) == 1


def test_send_commits_its_own_transaction(db_url):
    message_id = send("orders", {"id": 1}, key="k")
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        cur.execute("SELECT message_id FROM outbox_bridge.outbox")
        assert cur.fetchall() == [(message_id,)]
    c.close()


def test_send_retries_transient_errors_then_gives_up(db_url, monkeypatch):
    """A database that refuses connections: send() tries 1 + retries times, then raises."""
    import outbox_bridge.outbox.publish as pub

    calls = []
    real_connect = pub.connect

    def flaky_connect(settings, **kw):
        calls.append(1)
        if len(calls) < 3:  # the first two attempts meet a server that is not there
            return real_connect(settings.__class__(database_url=_dead_url(db_url)), **kw)
        return real_connect(settings, **kw)

    monkeypatch.setattr(pub, "connect", flaky_connect)
    send("orders", {"id": 1}, retries=3)
    assert len(calls) == 3 and len(rows(db_url)) == 1

    calls.clear()
    monkeypatch.setattr(
        pub,
        "connect",
        lambda s, **kw: real_connect(s.__class__(database_url=_dead_url(db_url)), **kw),
    )
    with pytest.raises(psycopg2.OperationalError):
        send("orders", {"id": 2}, retries=1)
    assert len(rows(db_url)) == 1


def _dead_url(url: str) -> str:
    dsn = psycopg2.extensions.parse_dsn(url)
    dsn["port"] = "1"  # nothing listens there: a real connection refusal
    return psycopg2.extensions.make_dsn(**dsn)


def test_migrate_is_idempotent_and_quotes_the_schema(db_url):
    from outbox_bridge.config import Settings

    odd = Settings(database_url=db_url, schema='Odd "Schema"')
    assert migrate(odd) == [
        "0001_outbox",
        "0002_inbox",
        "0003_wakes_and_pauses",
        "0004_send_receipts",
        "0005_wake_by_sequence",
        "0006_prune_without_cascade",
        "0007_recovering",
        "0008_inbox_per_topic",
        "0009_recover_before",
        "0010_fleet",
        "0011_handler_routes",
        "0012_idle_lock",
        "0013_round_limit",
        "0014_message_model",
        "0015_share_tasks",
    ]
    assert migrate(odd) == []
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        cur.execute('SELECT count(*) FROM "Odd ""Schema""".outbox')
        assert cur.fetchone() == (0,)
    c.close()


@pytest.fixture(scope="module")
def ident_conn(services):
    c = psycopg2.connect(services["OUTBOX_BRIDGE_DATABASE_URL"])
    yield c
    c.close()


@settings(max_examples=200, deadline=None)
@given(name=st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s))
def test_quote_ident_renders_what_psycopg2_sql_identifier_renders(ident_conn, name):
    """The plain-text SQL of the adapters quotes names exactly as psycopg2 does."""
    from psycopg2 import sql

    from outbox_bridge.db import quote_ident

    assert quote_ident(name) == sql.Identifier(name).as_string(ident_conn)


def test_send_decides_by_its_receipt_not_by_a_transaction_id(db_url, conn):
    """A crash that loses a commit lets PostgreSQL reuse its transaction id, so
    txid_status() can read "committed" for a send() that never committed (found by
    the soak). send() writes a receipt in its transaction and asks for that."""
    from outbox_bridge.config import get_settings
    from outbox_bridge.outbox.publish import sent

    message_id = send("orders", {"id": 1})
    with conn, conn.cursor() as cur:
        assert sent(cur, get_settings(), message_id)
        assert not sent(cur, get_settings(), uuid.uuid4())  # never written: write it again
        cur.execute("SELECT count(*) FROM outbox_bridge.send_receipts")
        assert cur.fetchone() == (1,)
