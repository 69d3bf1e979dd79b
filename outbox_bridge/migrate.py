"""Versioned SQL migrations (``outbox_bridge/sql/NNNN_name.sql``), applied once each."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from .config import Settings, get_settings
from .db import quote_ident, text, transaction

_MIGRATION = re.compile(r"^(\d{4})_(\w+)\.sql$")


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql text) of every migration shipped, in order."""
    found = []
    for entry in resources.files("outbox_bridge").joinpath("sql").iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


def migrate(settings: Settings | None = None) -> list[str]:
    """Apply the migrations not yet applied; returns their names. Safe to run concurrently."""
    settings = settings or get_settings()
    with transaction(settings, "outbox-bridge migrate") as cur:
        return apply(cur, settings.schema)


def apply(cur: Any, schema: str, upto: int | None = None) -> list[str]:
    """Apply, with the DB-API cursor ``cur`` and in its transaction, the migrations not
    yet applied (up to version ``upto``); returns their names. ``outbox-bridge migrate``
    and the Django app's migrations both come here: one copy of the DDL."""
    applied_now = []
    # one migrator at a time, per database
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('outbox_bridge.migrate'))")
    cur.execute(text("CREATE SCHEMA IF NOT EXISTS {schema}", schema))
    cur.execute(
        text(
            "CREATE TABLE IF NOT EXISTS {migrations} (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
            schema,
        )
    )
    cur.execute(text("SELECT version FROM {migrations}", schema))
    done = {row[0] for row in cur.fetchall()}
    # the SQL files name our tables without a schema; the caller's path comes back after
    cur.execute("SELECT current_setting('search_path')")
    (search_path,) = cur.fetchone()
    cur.execute("SELECT set_config('search_path', %s, true)", (quote_ident(schema),))
    for version, name, sql_text in available():
        if version in done or (upto is not None and version > upto):
            continue
        cur.execute(sql_text)
        cur.execute(
            text("INSERT INTO {migrations} (version, name) VALUES (%s, %s)", schema),
            (version, name),
        )
        applied_now.append(f"{version:04d}_{name}")
    cur.execute("SELECT set_config('search_path', %s, true)", (search_path,))
    return applied_now


def pending(settings: Settings | None = None) -> list[str]:
    """Names of the shipped migrations this database has not applied yet."""
    settings = settings or get_settings()
    with transaction(settings, "outbox-bridge migrate --check") as cur:
        cur.execute("SELECT to_regclass(%s)", (f"{quote_ident(settings.schema)}.migrations",))
        done: set[int] = set()
        if cur.fetchone()[0] is not None:
            cur.execute(text("SELECT version FROM {migrations}", settings.schema))
            done = {row[0] for row in cur.fetchall()}
    return [f"{v:04d}_{name}" for v, name, _sql in available() if v not in done]


def script(schema: str) -> str:
    """Every migration as one SQL script, for teams whose own tool applies DDL
    (Flyway, Alembic, Liquibase): each version also records itself, so that
    ``outbox-bridge migrate --check`` and the worker see it applied."""
    parts = [
        f"-- outbox-bridge schema {quote_ident(schema)}: run each version once, in order",
        text("CREATE SCHEMA IF NOT EXISTS {schema};", schema),
        text("CREATE TABLE IF NOT EXISTS {migrations} (version integer PRIMARY KEY,"
             " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());", schema),
    ]  # fmt: skip
    for version, name, sql_text in available():
        parts += [
            f"\n-- {version:04d}_{name}",
            "BEGIN;",
            f"SET LOCAL search_path TO {quote_ident(schema)};",
            sql_text.strip(),
            text(f"INSERT INTO {{migrations}} (version, name) VALUES ({version}, '{name}');",
                 schema),
            "COMMIT;",
        ]  # fmt: skip
    return "\n".join(parts) + "\n"


def notify_trigger(cur: Any, schema: str, on: bool) -> None:
    """Create (``on``) or drop the writer-side NOTIFY trigger, an opt-in since 0005:
    each INSERT statement on the outbox then wakes an idle watcher at commit,
    at a cost to every writer. With it, ``wake_poll`` may be slower or 0."""
    cur.execute(text("DROP TRIGGER IF EXISTS outbox_wakeup ON {outbox}", schema))
    if on:
        cur.execute(
            text(
                "CREATE TRIGGER outbox_wakeup AFTER INSERT ON {outbox}"
                " FOR EACH STATEMENT EXECUTE FUNCTION {schema}.outbox_wakeup()",
                schema,
            )
        )
