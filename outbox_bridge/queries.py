"""Every statement the runtime runs on outbox-bridge's tables, by name, from
``sql/queries/*.sql`` (the DDL is in ``sql/migrations/``).

A file holds statements, each under a ``-- name: <name>`` line (comments
after it document the statement); a statement's name is ``<file>.<name>``.
Placeholders in braces are filled one way, by ``psycopg2.sql``: a table
(``{outbox}``, ``{claims}``, ...) as a schema-qualified identifier, ``{outbox_channel}``
as the string of the outbox's NOTIFY channel, any other
``{piece}`` by what the caller passes: an identifier (a tuple of names), or
the name of another statement (a fragment), rendered the same way. Values are always parameters
(``%(name)s``), never part of the text.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Mapping
from importlib import resources

from psycopg2 import sql

from .db import TABLES, channel, quote_ident

_NAME = re.compile(r"^-- name: ([\w.]+)\s*$", re.M)


@functools.cache
def statements() -> dict[str, str]:
    """name -> text of every statement in the package's ``sql/queries`` files."""
    found: dict[str, str] = {}
    folder = resources.files("outbox_bridge") / "sql" / "queries"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        prefix = entry.name.removesuffix(".sql")
        parts = _NAME.split(entry.read_text())
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            lines = [ln for ln in body.strip().splitlines() if not ln.startswith("-- ")]
            key = f"{prefix}.{name}"
            if key in found:
                raise ValueError(f"statement {key} is defined twice")
            found[key] = "\n".join(lines).strip()
    return found


def statement(name: str) -> str:
    """The text of statement ``name`` (a KeyError names a statement that is not there)."""
    try:
        return statements()[name]
    except KeyError:
        raise KeyError(f"no statement named {name!r} in outbox_bridge/sql/queries") from None


Piece = str | tuple[str, ...]  # the name of a statement, or an identifier's parts


def compose(text: str, schema: str, pieces: Mapping[str, Piece] | None = None) -> sql.Composed:
    """SQL ``text`` with its placeholders filled, as ``psycopg2.sql`` composes them:
    the one way every statement is rendered (``render``; the tools' own queries)."""
    return _compose(text, schema, tuple(sorted((pieces or {}).items())))


@functools.lru_cache(maxsize=512)
def _compose(text: str, schema: str, pieces: tuple[tuple[str, Piece], ...]) -> sql.Composed:
    named = {field for _, field, _, _ in string.Formatter().parse(text) if field}
    values: dict[str, sql.Composable] = {"schema": sql.Identifier(schema)}
    if "outbox_channel" in named:
        values["outbox_channel"] = sql.Literal(channel(schema, "outbox"))
    values.update((t, sql.Identifier(schema, t)) for t in TABLES if t in named)
    for key, piece in pieces:
        if key in named:
            values[key] = (
                _compose(statement(piece), schema, pieces)
                if isinstance(piece, str)
                else sql.Identifier(*piece)
            )
    return sql.SQL(text).format(**values)


def render(name: str, schema: str, pieces: Mapping[str, Piece] | None = None) -> sql.Composed:
    """Statement ``name`` for ``schema``, its placeholders filled (see the module doc).
    A fragment gets the same pieces as the statement that names it."""
    return compose(statement(name), schema, pieces)


@functools.lru_cache(maxsize=128)
def plain(text: str, schema: str) -> str:
    """SQL ``text`` with its tables as plain text, for drivers that take no ``Composed``
    (psycopg 3, asyncpg, SQLAlchemy, Django); identifiers quoted as psycopg2 does."""
    return text.format(
        schema=quote_ident(schema),
        outbox_channel=quote_literal(channel(schema, "outbox")),
        **{t: f"{quote_ident(schema)}.{quote_ident(t)}" for t in TABLES},
    )


def quote_literal(text: str) -> str:
    """``text`` as an SQL string literal, whatever ``standard_conforming_strings`` says."""
    if "\x00" in text:
        raise ValueError(f"an SQL string cannot contain NUL: {text!r}")
    escaped = text.replace("'", "''").replace("\\", "\\\\")
    return ("E'" if "\\" in text else "'") + escaped + "'"


def render_text(name: str, schema: str) -> str:
    """Statement ``name`` as plain text (see ``plain``)."""
    return plain(statement(name), schema)
