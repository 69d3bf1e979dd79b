"""Versioned SQL migrations (``outbox_bridge/sql/migrations/NNNN_name.sql``), applied once each.

Online by rule, since they run under a live pipeline: every statement that takes
a lock waits at most ``migrate_lock_timeout`` for it (a lock request queued
behind a long handler transaction would stall every writer queued behind it),
and a migration that timed out is rolled back and tried again after a pause, up
to ``migrate_lock_retries`` times. A file whose first line is
``-- outbox-bridge: no-transaction`` runs statement by statement outside a
transaction (``CREATE INDEX CONCURRENTLY``); each of its statements must be
safe to run again. See docs/migrations.md for the rules a new migration follows.
"""

from __future__ import annotations

import logging
import re
import time
from importlib import resources
from typing import Any

import psycopg2

from .config import Settings, get_settings
from .db import connect, quote_ident, transaction
from .queries import render_text

log = logging.getLogger(__name__)

_MIGRATION = re.compile(r"^(\d{4})_(\w+)\.sql$")
NO_TRANSACTION = "-- outbox-bridge: no-transaction"
# statements that wait for other transactions without blocking their writes: no timeout
_CONCURRENTLY = re.compile(r"^\s*(CREATE\s+(UNIQUE\s+)?INDEX|DROP\s+INDEX)\s+CONCURRENTLY", re.I)
_LOCK = "hashtext('outbox_bridge.migrate')"


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql text) of every migration shipped, in order."""
    found = []
    for entry in resources.files("outbox_bridge").joinpath("sql", "migrations").iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


def statements(sql_text: str) -> list[str]:
    """The statements of a no-transaction migration (each ends with ``;`` at a line's end;
    such files hold no function bodies)."""
    body = "\n".join(line for line in sql_text.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*$", body, flags=re.M) if s.strip()]


def migrate(settings: Settings | None = None) -> list[str]:
    """Apply the migrations not yet applied; returns their names. Safe to run concurrently
    (one migrator at a time waits for the other) and under load (see the module doc)."""
    settings = settings or get_settings()
    conn = connect(settings, autocommit=True, name="outbox-bridge migrate")
    try:
        with conn.cursor() as cur:
            return apply(
                cur,
                settings.schema,
                autocommit=True,
                lock_timeout=settings.migrate_lock_timeout,
                retries=settings.migrate_lock_retries,
            )
    finally:
        conn.close()


def apply(
    cur: Any,
    schema: str,
    upto: int | None = None,
    *,
    autocommit: bool = False,
    lock_timeout: float = 0.0,
    retries: int = 0,
) -> list[str]:
    """Apply, with the DB-API cursor ``cur``, the migrations not yet applied (up to
    version ``upto``); returns their names. ``outbox-bridge migrate`` and the Django
    app's migrations both come here: one copy of the DDL.

    In the caller's transaction (``autocommit`` false: a Django migration) all of
    them run in it, each lock waited for at most ``lock_timeout`` seconds (0: no
    limit), and a no-transaction migration is refused. On an autocommit cursor
    each migration is a transaction of its own, retried ``retries`` times after a
    lock timeout."""
    if autocommit:
        cur.execute(f"SELECT pg_advisory_lock({_LOCK})")  # one migrator at a time
    else:
        cur.execute(f"SELECT pg_advisory_xact_lock({_LOCK})")
    try:
        done = _prepare(cur, schema, autocommit)
        applied_now = []
        for version, name, sql_text in available():
            if version in done or (upto is not None and version > upto):
                continue
            label = f"{version:04d}_{name}"
            if not autocommit:
                if sql_text.startswith(NO_TRANSACTION):
                    raise RuntimeError(
                        f"migration {label} runs outside a transaction (CREATE INDEX"
                        " CONCURRENTLY): apply it on an autocommit connection (the Django"
                        " migration that applies it has atomic = False)"
                    )
                _in_transaction(cur, schema, version, name, sql_text, lock_timeout)
            else:
                _on_its_own(cur, schema, version, name, sql_text, lock_timeout, retries)
            applied_now.append(label)
        return applied_now
    finally:
        if autocommit:
            cur.execute(f"SELECT pg_advisory_unlock({_LOCK})")


def _prepare(cur: Any, schema: str, autocommit: bool) -> set[int]:
    """The schema and the migrations table, where missing; the versions applied."""
    cur.execute(render_text("migrate.create_schema", schema))
    cur.execute(render_text("migrate.create_migrations", schema))
    cur.execute(render_text("migrate.applied", schema))
    return {row[0] for row in cur.fetchall()}


def _timeout(cur: Any, seconds: float, local: bool) -> None:
    scope = "true" if local else "false"
    cur.execute(f"SELECT set_config('lock_timeout', %s, {scope})", (f"{int(seconds * 1000)}ms",))


def _in_transaction(cur, schema, version, name, sql_text, lock_timeout: float) -> None:
    """One migration in the current transaction (the caller commits)."""
    # the SQL files name our tables without a schema; the caller's path comes back after
    cur.execute("SELECT current_setting('search_path'), current_setting('lock_timeout')")
    search_path, old_timeout = cur.fetchone()
    cur.execute("SELECT set_config('search_path', %s, true)", (quote_ident(schema),))
    _timeout(cur, lock_timeout, local=True)
    cur.execute(sql_text)
    cur.execute(render_text("migrate.record", schema), (version, name))
    cur.execute("SELECT set_config('search_path', %s, true)", (search_path,))
    cur.execute("SELECT set_config('lock_timeout', %s, true)", (old_timeout,))


def _on_its_own(cur, schema, version, name, sql_text, lock_timeout: float, retries: int):
    """One migration on an autocommit cursor: a transaction of its own, tried again
    after a lock timeout; or, for a no-transaction file, statement by statement, each
    tried again on its own (a concurrent index build is not done twice)."""
    label = f"{version:04d}_{name}"
    if not sql_text.startswith(NO_TRANSACTION):

        def run() -> None:
            cur.execute("BEGIN")
            try:
                _in_transaction(cur, schema, version, name, sql_text, lock_timeout)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

        _with_retries(label, retries, run)
        return
    cur.execute("SELECT current_setting('search_path'), current_setting('lock_timeout')")
    search_path, old_timeout = cur.fetchone()
    cur.execute("SELECT set_config('search_path', %s, false)", (quote_ident(schema),))
    try:
        for statement in statements(sql_text):
            # a concurrent build waits for older transactions without blocking writes
            _timeout(cur, 0 if _CONCURRENTLY.match(statement) else lock_timeout, local=False)
            _with_retries(label, retries, lambda s=statement: cur.execute(s))
        cur.execute(render_text("migrate.record", schema), (version, name))
    finally:
        cur.execute("SELECT set_config('search_path', %s, false)", (search_path,))
        cur.execute("SELECT set_config('lock_timeout', %s, false)", (old_timeout,))


def _with_retries(label: str, retries: int, run) -> None:
    for attempt in range(retries + 1):
        try:
            run()
            return
        except psycopg2.errors.LockNotAvailable:
            if attempt == retries:
                raise
            pause = min(5.0, 0.5 * 2**attempt)
            log.warning(
                "migration %s: a lock was not granted in time (a long transaction"
                " holds the table); again in %.1fs",
                label,
                pause,
            )
            time.sleep(pause)


def pending(settings: Settings | None = None) -> list[str]:
    """Names of the shipped migrations this database has not applied yet."""
    settings = settings or get_settings()
    with transaction(settings, "outbox-bridge migrate --check") as cur:
        cur.execute("SELECT to_regclass(%s)", (f"{quote_ident(settings.schema)}.migrations",))
        done: set[int] = set()
        if cur.fetchone()[0] is not None:
            cur.execute(render_text("migrate.applied", settings.schema))
            done = {row[0] for row in cur.fetchall()}
    return [f"{v:04d}_{name}" for v, name, _sql in available() if v not in done]


def script(schema: str) -> str:
    """Every migration as one SQL script, for teams whose own tool applies DDL
    (Flyway, Alembic, Liquibase): each version also records itself, so that
    ``outbox-bridge migrate --check`` and the worker see it applied. Each lock is
    waited for at most 2 s (``SET lock_timeout``): a migration that times out under
    load can be run again."""
    parts = [
        f"-- outbox-bridge schema {quote_ident(schema)}: run each version once, in order",
        render_text("migrate.create_schema", schema) + ";",
        render_text("migrate.create_migrations", schema) + ";",
    ]
    for version, name, sql_text in available():
        # a script for another tool: the values (ours, from the file name) as literals
        record = render_text("migrate.record", schema) % (version, f"'{name}'") + ";"
        if sql_text.startswith(NO_TRANSACTION):  # outside a transaction, one by one
            parts += [
                f"\n-- {version:04d}_{name} (outside a transaction)",
                f"SET search_path TO {quote_ident(schema)};",
            ]
            for statement in statements(sql_text):
                timeout = "0" if _CONCURRENTLY.match(statement) else "'2s'"
                parts += [f"SET lock_timeout = {timeout};", statement + ";"]
            parts += [record, "RESET search_path;", "RESET lock_timeout;"]
            continue
        parts += [
            f"\n-- {version:04d}_{name}",
            "BEGIN;",
            f"SET LOCAL search_path TO {quote_ident(schema)};",
            "SET LOCAL lock_timeout = '2s';",
            sql_text.strip(),
            record,
            "COMMIT;",
        ]
    return "\n".join(parts) + "\n"


def notify_trigger(cur: Any, schema: str, on: bool) -> None:
    """Create (``on``) or drop the writer-side NOTIFY trigger, an opt-in since 0005:
    each INSERT statement on the outbox then wakes an idle watcher at commit,
    at a cost to every writer. With it, ``wake_poll`` may be slower or 0."""
    cur.execute(render_text("migrate.drop_notify_trigger", schema))
    if on:
        cur.execute(render_text("migrate.create_notify_trigger", schema))
