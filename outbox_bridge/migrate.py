"""Versioned SQL migrations (``outbox_bridge/sql/NNNN_name.sql``), applied once each."""

from __future__ import annotations

import re
from importlib import resources

from psycopg2 import sql

from .config import Settings, get_settings
from .db import q, transaction

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
    schema = settings.schema
    applied_now = []
    with transaction(settings, "outbox-bridge migrate") as cur:
        # one migrator at a time, per database
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('outbox_bridge.migrate'))")
        cur.execute(q("CREATE SCHEMA IF NOT EXISTS {schema}", schema))
        cur.execute(
            q(
                "CREATE TABLE IF NOT EXISTS {migrations} (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
                schema,
            )
        )
        cur.execute(q("SELECT version FROM {migrations}", schema))
        done = {row[0] for row in cur.fetchall()}
        cur.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        for version, name, text in available():
            if version in done:
                continue
            cur.execute(text)
            cur.execute(
                q("INSERT INTO {migrations} (version, name) VALUES (%s, %s)", schema),
                (version, name),
            )
            applied_now.append(f"{version:04d}_{name}")
    return applied_now
