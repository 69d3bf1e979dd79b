"""`outbox-bridge migrate --check` and `--sql` against a real, empty PostgreSQL."""

import os
import shutil
import subprocess
import uuid

import psycopg2
import pytest

from outbox_bridge.config import Settings
from outbox_bridge.migrate import available, migrate, pending
from tests.conftest import ROOT, SESSION_PREFIX, _with_db, query

pytestmark = pytest.mark.postgres


@pytest.fixture
def empty_db(services):
    """A database without outbox-bridge's schema (not cloned from the template)."""
    admin_url = services["OUTBOX_BRIDGE_DATABASE_URL"]
    name = SESSION_PREFIX + "empty_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield _with_db(admin_url, name)
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUTBOX_BRIDGE_DATABASE_URL": url}
    return subprocess.run(
        ["outbox-bridge", "migrate", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_exits_1_with_what_is_pending_then_0_once_migrated(empty_db):
    every = [f"{v:04d}_{n}" for v, n, _ in available()]
    out = cli(empty_db, "--check")
    assert (out.returncode, out.stdout.strip()) == (1, "pending: " + ", ".join(every))
    assert cli(empty_db).returncode == 0
    out = cli(empty_db, "--check")
    assert (out.returncode, out.stdout.strip()) == (0, "schema is up to date")


def test_the_sql_script_builds_the_same_schema_that_migrate_records_as_applied(empty_db, db_url):
    script = cli(empty_db, "--sql").stdout
    # as a team would run it: psql sends one statement at a time (the script holds its own
    # BEGIN/COMMIT per version, and CREATE INDEX CONCURRENTLY outside any)
    psql = shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"
    run = subprocess.run(
        [psql, "-v", "ON_ERROR_STOP=1", "-q", empty_db],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    settings = Settings(database_url=empty_db)
    assert pending(settings) == []
    assert migrate(settings) == []  # nothing left: the script recorded every version
    tables = (
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'outbox_bridge' ORDER BY 1, 2"
    )
    assert query(empty_db, tables) == query(db_url, tables)  # db_url: by `migrate`
    indexes = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'outbox_bridge' ORDER BY 1"
    assert query(empty_db, indexes) == query(db_url, indexes)


def test_migrate_under_a_long_transaction_never_blocks_the_writers_for_longer_than_its_timeout(
    db_url,
):
    """0008 takes ACCESS EXCLUSIVE on the inbox. Queued behind a handler's transaction
    that holds the table, its lock request would stall every insert queued behind it;
    with the lock timeout the writers wait at most that long, and migrate tries again."""
    import threading
    import time

    # the database as it was before 0008
    query(
        db_url,
        "DROP INDEX outbox_bridge.inbox_topic_message_id;"
        " ALTER TABLE outbox_bridge.inbox ADD CONSTRAINT inbox_message_id_key"
        " UNIQUE (message_id);"
        " DELETE FROM outbox_bridge.migrations WHERE version = 8",
    )
    handler = psycopg2.connect(db_url)  # a handler transaction that reads the inbox
    handler.cursor().execute("SELECT count(*) FROM outbox_bridge.inbox")
    waits, stop = [], threading.Event()

    def consumer() -> None:  # the inbox consumer's inserts, timed
        c = psycopg2.connect(db_url, options="-c statement_timeout=60000")
        c.autocommit = True
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            c.cursor().execute(
                'INSERT INTO outbox_bridge.inbox (message_id, topic, "partition", "offset")'
                " VALUES (gen_random_uuid(), 't', 0, %s)",
                (n,),
            )
            waits.append(time.monotonic() - started)
            n += 1
        c.close()

    writer = threading.Thread(target=consumer)
    writer.start()
    env = {
        **os.environ,
        "OUTBOX_BRIDGE_DATABASE_URL": db_url,
        "OUTBOX_BRIDGE_MIGRATE_LOCK_TIMEOUT": "1",
    }
    migrator = subprocess.Popen(
        ["outbox-bridge", "migrate"],
        env=env,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # the migration waited for its lock at least twice while the handler held the table
        deadline = time.monotonic() + 60
        retried = ""
        while retried.count("was not granted in time") < 2 and time.monotonic() < deadline:
            retried += migrator.stdout.readline()
        assert retried.count("was not granted in time") >= 2, retried
        assert migrator.poll() is None
    finally:
        handler.rollback()  # the handler's transaction ends
        handler.close()
    out, _ = migrator.communicate(timeout=60)
    stop.set()
    writer.join(30)
    assert migrator.returncode == 0, retried + out
    assert "0008_inbox_per_topic" in out
    assert len(waits) > 50 and max(waits) < 1.5, (len(waits), max(waits))
    assert query(db_url, "SELECT count(*) FROM outbox_bridge.migrations WHERE version = 8") == [
        (1,)
    ]
