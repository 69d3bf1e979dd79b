"""Each Django migration applies outbox-bridge's SQL migrations up to a version."""

from __future__ import annotations

from typing import Any

from django.db import migrations


def sql_migrations(upto: int) -> migrations.RunPython:
    """The operation that applies ``outbox_bridge/sql`` up to version ``upto``."""

    def forward(apps: Any, schema_editor: Any) -> None:
        from outbox_bridge.config import get_settings
        from outbox_bridge.migrate import apply

        connection = schema_editor.connection
        with connection.cursor() as cur:
            # a migration with atomic = False runs on an autocommit connection
            apply(cur, get_settings().schema, upto=upto, autocommit=not connection.in_atomic_block)

    return migrations.RunPython(forward, elidable=False)
