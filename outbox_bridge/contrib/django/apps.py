"""The Django app of outbox-bridge."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig

from ... import config


class DjangoSettings:
    """outbox-bridge's settings from Django settings (``OUTBOX_BRIDGE_<NAME>``), over
    those it had before (a Celery config); the database from ``DATABASES``."""

    def __init__(self, before: Any) -> None:
        self.before = before

    def get(self, key: str, default: Any = None) -> Any:
        from django.conf import settings

        value = getattr(settings, key.upper(), None)
        if value is None and key == "outbox_bridge_database_url":
            value = database_url(getattr(settings, "OUTBOX_BRIDGE_DATABASE", "default"))
        if value is None and self.before is not None:
            value = self.before.get(key)
        return default if value is None else value


def database_url(alias: str) -> str | None:
    """A libpq DSN for the Django database ``alias`` (read when first needed, so the
    test runner's test database counts)."""
    from django.db import connections
    from psycopg2.extensions import make_dsn

    if alias not in connections.settings:
        return None
    db = connections.settings[alias]
    if "postgresql" not in db.get("ENGINE", ""):
        return None
    parts = {
        "dbname": db.get("NAME"),
        "user": db.get("USER"),
        "password": db.get("PASSWORD"),
        "host": db.get("HOST"),
        "port": db.get("PORT"),
    }
    # OPTIONS holds libpq's own settings too (sslmode, sslrootcert, sslcert, sslkey,
    # options, target_session_attrs, ...): the worker connects as the web app does
    for name, value in (db.get("OPTIONS") or {}).items():
        if name not in _DJANGO_ONLY_OPTIONS and isinstance(value, str | int | float):
            parts[name] = value
    return make_dsn(**{k: str(v) for k, v in parts.items() if v not in (None, "")})


# OPTIONS that Django's PostgreSQL backend uses itself instead of handing them to libpq
_DJANGO_ONLY_OPTIONS = frozenset(
    {"isolation_level", "assume_role", "server_side_binding", "pool", "cursor_factory", "context"}
)


class OutboxBridgeConfig(AppConfig):
    name = "outbox_bridge.contrib.django"
    label = "outbox_bridge"
    verbose_name = "outbox-bridge"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        config.use_conf(DjangoSettings(config.current_conf()))
