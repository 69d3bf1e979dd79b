"""outbox-bridge in Django's admin: the outbox, the inbox and each handler's deliveries.

Read-only views with filters (state, topic, handler; the search box takes a key or
a message id), readable values (JSON pretty-printed, bytes as hex), and two
actions on dead rows, "retry" and "purge". They call what ``outbox-bridge dead
retry`` and ``dead purge`` call (``outbox_bridge.ops``): the same statements,
the same order guarantees. An action needs the model's change permission
(retry) or delete permission (purge), given as for any model.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import datetime, timezone
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Q
from django.utils.html import format_html, format_html_join

from ... import ops
from ...config import get_settings
from ...message import decode_stored
from .models import Delivery, InboxMessage, OutboxMessage


def readable(data: bytes | memoryview | None) -> str:
    """A value as a person reads it: JSON pretty-printed, UTF-8 text, else hex."""
    if data is None:
        return "(none)"
    raw = bytes(data)
    try:
        return json.dumps(json.loads(raw), indent=2, ensure_ascii=False, sort_keys=True)
    except (UnicodeDecodeError, ValueError):
        pass
    with contextlib.suppress(UnicodeDecodeError):
        text = raw.decode()
        if all(c.isprintable() or c in "\n\r\t" for c in text):
            return text
    return "hex: " + raw.hex(" ")


def shown_key(key: bytes | memoryview | None) -> str:
    return ops.show_key(key) or "-"


def since(at: datetime | None) -> str:
    if at is None:
        return "-"
    seconds = (datetime.now(timezone.utc) - at).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


class ReadOnly(admin.ModelAdmin):
    """Nothing is added, edited or deleted here but by the actions."""

    list_per_page = 50
    show_full_result_count = False  # no count(*) of the whole table beside a filtered one
    search_help_text = "a key (text, or hex:ff00) or a message id"

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields] + list(self.readonly_fields)

    def has_retry_permission(self, request) -> bool:
        return request.user.has_perm(f"outbox_bridge.change_{self.model._meta.model_name}")

    def has_purge_permission(self, request) -> bool:
        return request.user.has_perm(f"outbox_bridge.delete_{self.model._meta.model_name}")

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        match = Q()
        with contextlib.suppress(ValueError):
            match |= Q(key=ops.parse_key(term))
        with contextlib.suppress(ValueError):
            match |= Q(message_id=uuid.UUID(term))
        return (queryset.filter(match) if match else queryset.none()), False

    @admin.display(description="key")
    def key_text(self, obj) -> str:
        return shown_key(obj.key)

    @admin.display(description="last error")
    def error(self, obj) -> str:
        text = obj.last_error or ""
        return text if len(text) <= 120 else text[:117] + "..."

    @admin.display(description="age")
    def age(self, obj) -> str:
        return since(obj.created_at)

    @admin.display(description="headers")
    def headers_text(self, obj):
        pairs = [(n, readable(v)) for n, v in decode_stored(obj.headers)]
        return format_html_join("\n", "<div><code>{}</code>: {}</div>", pairs) or "-"

    @admin.display(description="value")
    def value_text(self, obj):
        return format_html("<pre>{}</pre>", readable(obj.value))

    noun = "dead messages"

    def _calls(self, rows: list) -> list[dict[str, Any]]:
        """The ``ops`` calls that change these rows: their keyword arguments."""
        return [{"table": "outbox", "ids": [str(r.id) for r in rows]}]

    def _dead_action(self, request, queryset, retry: bool) -> None:
        dead = list(queryset.filter(state__in=["dead", "expired"]))
        if not dead:
            self.message_user(request, f"No {self.noun} were selected.", messages.WARNING)
            return
        change = ops.dead_retry if retry else ops.dead_purge
        done = sum(change(get_settings(), **call) for call in self._calls(dead))
        skipped = len(dead) - done
        note = f" ({skipped} expired: not retried)" if retry and skipped else ""
        verb = "retried" if retry else "purged"
        self.message_user(request, f"{verb} {done} {self.noun}{note}", messages.SUCCESS)

    @admin.action(description="Retry the selected dead rows", permissions=["retry"])
    def retry_dead(self, request, queryset) -> None:
        self._dead_action(request, queryset, True)

    @admin.action(description="Purge the selected dead rows", permissions=["purge"])
    def purge_dead(self, request, queryset) -> None:
        self._dead_action(request, queryset, False)


class _Registered(admin.SimpleListFilter):
    """Choices from the handlers outbox-bridge registered, not a scan of a table that
    may hold millions of rows (``DISTINCT`` over the inbox or the deliveries)."""

    column = "name"

    def lookups(self, request, model_admin):
        from django.db import connections

        from ...queries import render_text

        alias = getattr(settings, "OUTBOX_BRIDGE_DATABASE", "default")
        with connections[alias].cursor() as cur:
            cur.execute(render_text("ops.handler_names", get_settings().schema))
            names = [r[0] for r in cur.fetchall()]
            cur.execute(render_text("ops.handler_topics", get_settings().schema))
            topics = sorted(r[0] for r in cur.fetchall())
        found = names if self.column == "name" else topics
        return [(v, v) for v in found]

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        return queryset.filter(**{self.parameter_name: self.value()})


class HandlerFilter(_Registered):
    title, parameter_name, column = "handler", "handler", "name"


class TopicFilter(_Registered):
    title, parameter_name, column = "topic", "topic", "topic"


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnly):
    list_display = ("id", "state", "topic", "key_text", "attempts", "error", "age")
    list_filter = ("state", "topic")
    search_fields = ("topic",)  # shows the search box; get_search_results reads it
    readonly_fields = ("value_text", "headers_text")
    actions = ["retry_dead", "purge_dead"]


@admin.register(Delivery)
class DeliveryAdmin(ReadOnly):
    list_display = ("id", "handler", "state", "topic", "key_text", "attempts", "error", "age")
    list_filter = ("state", HandlerFilter, TopicFilter)
    search_fields = ("topic",)
    actions = ["retry_dead", "purge_dead"]

    noun = "dead deliveries"

    def _calls(self, rows: list) -> list[dict[str, Any]]:
        by_handler: dict[str, list[str]] = {}
        for row in rows:  # one call per handler, as `dead retry --handler H --id ...`
            by_handler.setdefault(row.handler, []).append(str(row.id))
        return [{"table": "deliveries", "handler": h, "ids": i} for h, i in by_handler.items()]


@admin.register(InboxMessage)
class InboxMessageAdmin(ReadOnly):
    list_display = ("id", "topic", "key_text", "partition", "offset", "received")
    list_filter = (TopicFilter,)
    search_fields = ("topic",)
    readonly_fields = ("value_text", "headers_text", "deliveries")
    actions = None

    @admin.display(description="received")
    def received(self, obj) -> str:
        return since(obj.received_at)

    @admin.display(description="deliveries")
    def deliveries(self, obj):
        rows = Delivery.objects.filter(message_id=obj.message_id, topic=obj.topic)
        return (
            format_html_join(
                "\n",
                "<div><code>{}</code> {} after {} attempts {}</div>",
                ((d.handler, d.state, d.attempts, d.last_error or "") for d in rows),
            )
            or "-"
        )
