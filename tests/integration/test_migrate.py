"""`outbox-bridge migrate --check` and `--sql` against a real, empty PostgreSQL."""

import os
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
    return subprocess.run(["outbox-bridge", "migrate", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_check_exits_1_with_what_is_pending_then_0_once_migrated(empty_db):
    every = [f"{v:04d}_{n}" for v, n, _ in available()]
    out = cli(empty_db, "--check")
    assert (out.returncode, out.stdout.strip()) == (1, "pending: " + ", ".join(every))
    assert cli(empty_db).returncode == 0
    out = cli(empty_db, "--check")
    assert (out.returncode, out.stdout.strip()) == (0, "schema is up to date")


def test_the_sql_script_builds_the_same_schema_that_migrate_records_as_applied(empty_db, db_url):
    script = cli(empty_db, "--sql").stdout
    c = psycopg2.connect(empty_db)
    c.autocommit = True  # the script holds its own BEGIN/COMMIT per version
    with c.cursor() as cur:
        cur.execute(script)
    c.close()
    settings = Settings(database_url=empty_db)
    assert pending(settings) == []
    assert migrate(settings) == []  # nothing left: the script recorded every version
    tables = ("SELECT table_name, column_name, data_type FROM information_schema.columns"
              " WHERE table_schema = 'outbox_bridge' ORDER BY 1, 2")  # fmt: skip
    assert query(empty_db, tables) == query(db_url, tables)  # db_url: by `migrate`
