"""The publish contract, run against every adapter (the way FastStream runs one
behaviour against each backend): psycopg2, psycopg 3, SQLAlchemy (sync and async,
on each driver), Django and asyncpg, with the real PostgreSQL, Kafka and worker.

A subclass says only how its driver opens, commits and rolls back a transaction,
writes an application row in it, and calls publish; the tests are the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2
import pytest

from outbox_bridge import (
    InvalidHeaders,
    InvalidKey,
    InvalidMessage,
    InvalidTopic,
    MessageTooLarge,
    NotInTransaction,
    NotSerializable,
    publish,
    publish_async,
)
from outbox_bridge.config import reset_settings
from tests.conftest import (
    ROOT,
    KafkaReader,
    WorkerProcess,
    create_database,
    create_topic,
    query,
    sqlalchemy_url,
    wait_for,
)

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq]


@dataclass
class Env:
    url: str
    topic: str
    reader: KafkaReader

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return query(self.url, sql, params)

    def app_rows(self, note: str) -> int:
        return self.query("SELECT count(*) FROM app_rows WHERE note = %s", (note,))[0][0]

    def outbox_ids(self, topic: str | None = None) -> set[str]:
        return {
            str(r[0])
            for r in self.query(
                "SELECT message_id FROM outbox_bridge.outbox WHERE topic = %s",
                (topic or self.topic,),
            )
        }


@pytest.fixture(scope="module")
def env(services, template_db, kafka_admin_module, tmp_path_factory) -> Iterator[Env]:
    """One database, topic and worker for every adapter of this module."""
    url, drop = create_database(services["OUTBOX_BRIDGE_DATABASE_URL"], template_db)
    before = os.environ.get("OUTBOX_BRIDGE_DATABASE_URL")
    os.environ["OUTBOX_BRIDGE_DATABASE_URL"] = url
    reset_settings()
    c = psycopg2.connect(url)
    with c, c.cursor() as cur:
        cur.execute("CREATE TABLE app_rows (id serial PRIMARY KEY, note text)")
    c.close()
    topic = "adapters-" + uuid.uuid4().hex[:8]
    create_topic(kafka_admin_module, topic, 2)
    worker_env = {
        **os.environ,
        "OUTBOX_BRIDGE_CELERY_QUEUE": "test-" + uuid.uuid4().hex[:10],
        "OUTBOX_BRIDGE_POLL_INTERVAL": "0.5",
        "PYTHONPATH": str(ROOT),
    }
    log = tmp_path_factory.mktemp("adapters") / "worker.log"
    worker = WorkerProcess(worker_env, log, 2, ("--without-inbox-consumer",)).start()
    reader = KafkaReader(services["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"], topic)
    try:
        yield Env(url, topic, reader)
    finally:
        reader.close()
        worker.stop()
        print(f"--- worker ---\n{worker.log_tail()}")
        if before is None:
            os.environ.pop("OUTBOX_BRIDGE_DATABASE_URL", None)
        else:
            os.environ["OUTBOX_BRIDGE_DATABASE_URL"] = before
        reset_settings()
        drop()


@pytest.fixture(scope="module")
def kafka_admin_module(services):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": services["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"]})


@dataclass
class Tx:
    """One open transaction of some driver: publish in it, write an app row in it."""

    publish: Callable[..., uuid.UUID]
    write: Callable[[str], None]
    tx: Any


class Boom(Exception):
    """The caller's own failure, which rolls its transaction back."""


BAD_INPUT = [
    ({"topic": ""}, InvalidTopic, "non-empty"),
    ({"topic": "bad topic"}, InvalidTopic, "illegal Kafka topic name"),
    ({"value": object()}, NotSerializable, "not JSON-serializable"),
    ({"headers": {3: "x"}}, InvalidHeaders, "header names"),
    ({"key": 5}, InvalidKey, "key must be str, bytes or None"),
    ({"value": "x" * 1_000_001}, MessageTooLarge, "outbox_bridge_max_message_bytes"),
]


class PublishContract:
    """What publish() promises, whatever ``tx`` is. Subclasses implement the three
    context managers below for one adapter."""

    name = "?"

    def transaction(self, url: str) -> Any:  # -> ContextManager[Tx]; commits on exit
        raise NotImplementedError

    def autocommit(self, url: str) -> Any:  # -> ContextManager[Tx] with no transaction open
        raise NotImplementedError

    def other_call(self, tx: Any) -> None:
        """publish_async on a sync tx, or publish on an async one."""
        raise NotImplementedError

    # the contract

    def test_committed_messages_reach_kafka_with_key_headers_and_id(self, env: Env):
        note = f"{self.name}-{uuid.uuid4().hex[:6]}"
        with self.transaction(env.url) as tx:
            tx.write(note)
            ids = [
                tx.publish(
                    env.topic,
                    {"adapter": self.name, "n": n},
                    key=note,
                    headers={"type": "T", "raw": b"\x00\xff"},
                )
                for n in range(3)
            ]
        assert env.app_rows(note) == 1
        env.reader.read_message_ids({str(i) for i in ids}, 60)
        mine = [m for m in env.reader.messages if m.key() == note.encode()]
        assert [json.loads(m.value()) for m in mine] == [
            {"adapter": self.name, "n": n} for n in range(3)
        ]  # in publish order: one key, one partition
        assert [dict(m.headers()) for m in mine] == [
            {"message_id": str(i).encode(), "type": b"T", "raw": b"\x00\xff"} for i in ids
        ]
        wait_for(lambda: not env.outbox_ids() & {str(i) for i in ids}, 30, "rows deleted")

    def test_a_delayed_expiring_request_goes_at_its_time_with_its_headers(self, env: Env):
        note = f"{self.name}-{uuid.uuid4().hex[:6]}"
        with self.transaction(env.url) as tx:
            tx.write(note)
            (message_id,) = [
                tx.publish(env.topic, {"n": 1}, key=note, delay=1.0, ttl=600, reply_to="replies")
            ]
        ((due,),) = env.query(  # written by this driver's statement, waiting for its time
            "SELECT deliver_at FROM outbox_bridge.scheduled WHERE message_id = %s",
            (str(message_id),),
        )
        env.reader.read_message_ids({str(message_id)}, 60)
        (m,) = [m for m in env.reader.messages if m.key() == note.encode()]
        headers = dict(m.headers())
        assert headers["reply_to"] == b"replies" and b"T" in headers["expires_at"]
        assert m.timestamp()[1] >= int(due.timestamp() * 1000)  # no earlier than its time

    def test_a_rolled_back_transaction_writes_nothing(self, env: Env):
        note = f"{self.name}-{uuid.uuid4().hex[:6]}"
        topic = "never-" + note  # a row left would stay: nobody creates this topic
        with pytest.raises(Boom), self.transaction(env.url) as tx:
            tx.write(note)
            tx.publish(topic, {"n": 1}, key=note)
            raise Boom()
        assert (env.app_rows(note), env.outbox_ids(topic)) == (0, set())

    @pytest.mark.parametrize("bad, error, words", BAD_INPUT)
    def test_bad_input_names_the_problem_and_the_transaction_stays_usable(
        self, env: Env, bad, error, words
    ):
        note = f"{self.name}-{uuid.uuid4().hex[:6]}"
        call = {"topic": "never-" + note, "value": {"n": 1}, **bad}
        with self.transaction(env.url) as tx:
            with pytest.raises(error, match=words) as raised:
                tx.publish(call.pop("topic"), call.pop("value"), **call)
            assert isinstance(raised.value, InvalidMessage)
            assert isinstance(raised.value, ValueError)
            tx.write(note)  # still usable: this commits
        assert (env.app_rows(note), env.outbox_ids("never-" + note)) == (1, set())

    def test_a_connection_with_no_transaction_open_is_refused(self, env: Env):
        topic = "never-" + uuid.uuid4().hex[:8]
        with self.autocommit(env.url) as tx, pytest.raises(NotInTransaction, match="send()"):
            tx.publish(topic, {"n": 1})
        assert env.outbox_ids(topic) == set()

    def test_the_other_call_is_a_clear_type_error(self, env: Env):
        with self.transaction(env.url) as tx, pytest.raises(TypeError, match="publish"):
            self.other_call(tx.tx)


# synchronous drivers


class SyncContract(PublishContract):
    def other_call(self, tx: Any) -> None:
        asyncio.run(publish_async(tx, "t", 1))

    @staticmethod
    def tx_of(tx: Any, write: Callable[[str], None]) -> Tx:
        return Tx(lambda *a, **kw: publish(tx, *a, **kw), write, tx)


class TestPsycopg2Cursor(SyncContract):
    name = "psycopg2-cursor"

    @contextmanager
    def transaction(self, url):
        conn = psycopg2.connect(url)
        try:
            with conn, conn.cursor() as cur:
                yield self.tx_of(cur, self.writer(cur))
        finally:
            conn.close()

    @contextmanager
    def autocommit(self, url):
        conn = psycopg2.connect(url)
        conn.autocommit = True
        try:
            yield self.tx_of(conn.cursor(), lambda note: None)
        finally:
            conn.close()

    @staticmethod
    def writer(cur):
        return lambda note: cur.execute("INSERT INTO app_rows (note) VALUES (%s)", (note,))


class TestPsycopg2Connection(TestPsycopg2Cursor):
    name = "psycopg2-connection"

    @contextmanager
    def transaction(self, url):
        conn = psycopg2.connect(url)
        try:
            with conn:
                yield self.tx_of(conn, self.writer(conn.cursor()))
        finally:
            conn.close()


class TestPsycopgCursor(SyncContract):
    name = "psycopg-cursor"

    @contextmanager
    def transaction(self, url):
        import psycopg

        with psycopg.connect(url) as conn, conn.cursor() as cur:  # commits on exit
            yield self.tx_of(cur, self.writer(cur))

    @contextmanager
    def autocommit(self, url):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            yield self.tx_of(conn.cursor(), lambda note: None)

    @staticmethod
    def writer(cur):
        return lambda note: cur.execute("INSERT INTO app_rows (note) VALUES (%s)", (note,))


class TestPsycopgConnection(TestPsycopgCursor):
    name = "psycopg-connection"

    @contextmanager
    def transaction(self, url):
        import psycopg

        # autocommit with an explicit transaction block: also "a transaction open"
        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            yield self.tx_of(conn, self.writer(conn))


class SQLAlchemyContract(SyncContract):
    driver = "psycopg2"

    @pytest.fixture(autouse=True)
    def engine(self, env):
        from sqlalchemy import create_engine

        self._engine = create_engine(sqlalchemy_url(env.url, self.driver))
        yield
        self._engine.dispose()

    def writer(self, conn_or_session):
        from sqlalchemy import text

        insert = text("INSERT INTO app_rows (note) VALUES (:note)")
        return lambda note: conn_or_session.execute(insert, {"note": note})


class TestSQLAlchemySession(SQLAlchemyContract):
    name = "sqlalchemy-session-psycopg2"

    @contextmanager
    def transaction(self, url):
        from sqlalchemy.orm import Session

        with Session(self._engine) as session, session.begin():
            yield self.tx_of(session, self.writer(session))

    @contextmanager
    def autocommit(self, url):
        from sqlalchemy.orm import Session

        with Session(self._engine.execution_options(isolation_level="AUTOCOMMIT")) as session:
            yield self.tx_of(session, lambda note: None)

    def test_a_session_not_yet_begun_begins_like_an_orm_write(self, env):
        from sqlalchemy.orm import Session

        topic = "never-" + uuid.uuid4().hex[:8]
        with Session(self._engine) as session:
            publish(session, topic, {"n": 1})  # autobegin, as session.add() would
            assert session.in_transaction()
            session.rollback()
            assert env.outbox_ids(topic) == set()
            message_id = publish(session, topic, {"n": 2})
            session.commit()
        assert env.outbox_ids(topic) == {str(message_id)}
        env.query("DELETE FROM outbox_bridge.outbox WHERE topic = %s", (topic,))

    def test_a_session_that_cannot_begin_is_refused(self, env):
        from sqlalchemy.orm import Session

        with Session(self._engine, autobegin=False) as session:
            with pytest.raises(NotInTransaction, match="cannot begin"):
                publish(session, "never-x", {"n": 1})
            with session.begin():
                publish(session, "never-x", {"n": 2})
        assert len(env.outbox_ids("never-x")) == 1
        env.query("DELETE FROM outbox_bridge.outbox WHERE topic = 'never-x'")


class TestSQLAlchemySessionOnPsycopg(TestSQLAlchemySession):
    name = "sqlalchemy-session-psycopg"
    driver = "psycopg"


class TestSQLAlchemyConnection(SQLAlchemyContract):
    name = "sqlalchemy-connection-psycopg2"

    @contextmanager
    def transaction(self, url):
        with self._engine.begin() as conn:
            yield self.tx_of(conn, self.writer(conn))

    @contextmanager
    def autocommit(self, url):
        with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield self.tx_of(conn, lambda note: None)


@pytest.fixture(scope="module")
def django_setup(env):
    import django
    from django.conf import settings

    from outbox_bridge import config

    before = config.current_conf()
    if not settings.configured:
        dsn = psycopg2.extensions.parse_dsn(env.url)
        settings.configure(
            INSTALLED_APPS=["outbox_bridge.contrib.django"],
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": dsn["dbname"],
                    "USER": dsn.get("user", ""),
                    "PASSWORD": dsn.get("password", ""),
                    "HOST": dsn.get("host", ""),
                    "PORT": dsn.get("port", ""),
                }
            },
        )
        django.setup()
    yield
    from django.db import connection

    connection.close()
    config.use_conf(before)
    reset_settings()


@pytest.mark.usefixtures("django_setup")
class TestDjango(SyncContract):
    """In-process Django on this module's database (psycopg 3 underneath when it is
    installed, as Django picks; examples/django_shop also runs on psycopg2)."""

    name = "django-connection"

    def handle(self, connection):
        return connection

    @contextmanager
    def transaction(self, url):
        from django.db import connection, transaction

        with transaction.atomic():
            yield self.tx_of(self.handle(connection), self.writer(connection))

    @contextmanager
    def autocommit(self, url):
        from django.db import connection

        yield self.tx_of(self.handle(connection), lambda note: None)

    @staticmethod
    def writer(connection):
        def write(note):
            with connection.cursor() as cur:
                cur.execute("INSERT INTO app_rows (note) VALUES (%s)", (note,))

        return write


class TestDjangoCursor(TestDjango):
    name = "django-cursor"

    def handle(self, connection):
        return connection.cursor()


# asynchronous drivers: the same tests, each step run on one event loop


class AsyncContract(PublishContract):
    def other_call(self, tx: Any) -> None:
        publish(tx, "t", 1)

    @contextmanager
    def loop(self) -> Iterator[asyncio.Runner]:
        with asyncio.Runner() as runner:
            yield runner

    @staticmethod
    def tx_of(runner, tx, write) -> Tx:
        return Tx(
            lambda *a, **kw: runner.run(publish_async(tx, *a, **kw)),
            lambda note: runner.run(write(note)),
            tx,
        )


def _asyncpg_params(url: str) -> dict:
    dsn = psycopg2.extensions.parse_dsn(url)
    return {
        "host": dsn.get("host"),
        "port": dsn.get("port"),
        "user": dsn.get("user"),
        "password": dsn.get("password"),
        "database": dsn.get("dbname"),
    }


class TestAsyncpg(AsyncContract):
    name = "asyncpg"

    @contextmanager
    def transaction(self, url):
        import asyncpg

        with self.loop() as run:
            conn = run.run(asyncpg.connect(**_asyncpg_params(url)))
            try:
                block = conn.transaction()
                run.run(block.start())
                try:
                    yield self.tx_of(run, conn, self.writer(conn))
                except BaseException:
                    run.run(block.rollback())
                    raise
                run.run(block.commit())
            finally:
                run.run(conn.close())

    @contextmanager
    def autocommit(self, url):
        import asyncpg

        with self.loop() as run:
            conn = run.run(asyncpg.connect(**_asyncpg_params(url)))
            try:
                yield self.tx_of(run, conn, None)
            finally:
                run.run(conn.close())

    @staticmethod
    def writer(conn):
        return lambda note: conn.execute("INSERT INTO app_rows (note) VALUES ($1)", note)


class TestPsycopgAsyncConnection(AsyncContract):
    name = "psycopg-async-connection"

    def handle(self, conn):
        return conn

    @contextmanager
    def transaction(self, url):
        import psycopg

        with self.loop() as run:
            conn = run.run(psycopg.AsyncConnection.connect(url))
            try:
                tx = self.handle(conn)
                yield self.tx_of(run, tx, self.writer(conn))
                run.run(conn.commit())
            except BaseException:
                run.run(conn.rollback())
                raise
            finally:
                run.run(conn.close())

    @contextmanager
    def autocommit(self, url):
        import psycopg

        with self.loop() as run:
            conn = run.run(psycopg.AsyncConnection.connect(url, autocommit=True))
            try:
                yield self.tx_of(run, self.handle(conn), None)
            finally:
                run.run(conn.close())

    @staticmethod
    def writer(conn):
        async def write(note):
            await conn.execute("INSERT INTO app_rows (note) VALUES (%s)", (note,))

        return write


class TestPsycopgAsyncCursor(TestPsycopgAsyncConnection):
    name = "psycopg-async-cursor"

    def handle(self, conn):
        return conn.cursor()


class AsyncSQLAlchemyContract(AsyncContract):
    driver = "asyncpg"

    @contextmanager
    def engine(self, run, **options):
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(
            sqlalchemy_url(os.environ["OUTBOX_BRIDGE_DATABASE_URL"], self.driver), **options
        )
        try:
            yield engine
        finally:
            run.run(engine.dispose())

    @staticmethod
    def writer(conn_or_session):
        from sqlalchemy import text

        insert = text("INSERT INTO app_rows (note) VALUES (:note)")

        async def write(note):
            await conn_or_session.execute(insert, {"note": note})

        return write


class TestSQLAlchemyAsyncSession(AsyncSQLAlchemyContract):
    name = "sqlalchemy-async-session-asyncpg"

    @contextmanager
    def transaction(self, url):
        from sqlalchemy.ext.asyncio import AsyncSession

        with self.loop() as run, self.engine(run) as engine:
            session = AsyncSession(engine)
            try:
                yield self.tx_of(run, session, self.writer(session))
                run.run(session.commit())
            finally:
                run.run(session.close())  # rolls back what was not committed

    @contextmanager
    def autocommit(self, url):
        from sqlalchemy.ext.asyncio import AsyncSession

        with self.loop() as run, self.engine(run, isolation_level="AUTOCOMMIT") as engine:
            session = AsyncSession(engine)
            try:
                yield self.tx_of(run, session, None)
            finally:
                run.run(session.close())


class TestSQLAlchemyAsyncConnectionOnPsycopg(AsyncSQLAlchemyContract):
    name = "sqlalchemy-async-connection-psycopg"
    driver = "psycopg"

    @contextmanager
    def transaction(self, url):
        with self.loop() as run, self.engine(run) as engine:
            conn = run.run(engine.connect().start())
            try:
                yield self.tx_of(run, conn, self.writer(conn))
                run.run(conn.commit())
            finally:
                run.run(conn.close())

    @contextmanager
    def autocommit(self, url):
        with self.loop() as run, self.engine(run, isolation_level="AUTOCOMMIT") as engine:
            conn = run.run(engine.connect().start())
            try:
                yield self.tx_of(run, conn, None)
            finally:
                run.run(conn.close())
