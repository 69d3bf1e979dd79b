"""Read-only Django models of outbox-bridge's tables, for the admin (``admin.py``).

Unmanaged: the schema is outbox-bridge's own (its SQL migrations make it), and
nothing here writes a row. Changes go through the same code as the commands
(``outbox_bridge.ops``), so they keep the same guarantees.
"""

from __future__ import annotations

from django.db import models

from ... import config
from .apps import DjangoSettings


def table(name: str) -> str:
    """``name`` in outbox-bridge's schema, quoted as Django passes db_table through."""
    schema = config.Settings.from_conf(DjangoSettings(config.current_conf())).schema
    return '"{}"."{}"'.format(schema.replace('"', '""'), name)


STATES = [
    ("pending", "pending"),
    ("waiting", "waiting"),
    ("retrying", "retrying"),
    ("dead", "dead"),
    ("expired", "expired"),
]


class OutboxMessage(models.Model):
    """A message not yet in Kafka (sent ones are deleted), or dead there."""

    id = models.BigIntegerField(primary_key=True)
    message_id = models.UUIDField()
    topic = models.TextField()
    key = models.BinaryField(null=True)
    value = models.BinaryField(null=True)
    headers = models.JSONField(default=list)
    shard = models.SmallIntegerField()
    state = models.TextField(choices=STATES)
    attempts = models.IntegerField()
    last_error = models.TextField(null=True)
    created_at = models.DateTimeField()
    failed_at = models.DateTimeField(null=True)
    dead_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = table("outbox")
        verbose_name = "outbox message"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.topic} {self.message_id}"


class InboxMessage(models.Model):
    """A message consumed from Kafka, kept for deduplication until retention."""

    id = models.BigIntegerField(primary_key=True)
    message_id = models.UUIDField()
    topic = models.TextField()
    partition = models.IntegerField()
    offset = models.BigIntegerField()
    key = models.BinaryField(null=True)
    value = models.BinaryField(null=True)
    headers = models.JSONField(default=list)
    timestamp = models.DateTimeField(null=True)
    received_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = table("inbox")
        verbose_name = "inbox message"
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.topic} {self.message_id}"


class Delivery(models.Model):
    """One handler's delivery of an inbox message."""

    id = models.BigIntegerField(primary_key=True)
    message_id = models.UUIDField()
    handler = models.TextField()
    topic = models.TextField()
    key = models.BinaryField(null=True)
    shard = models.SmallIntegerField()
    state = models.TextField(choices=[*STATES, ("done", "done")])
    attempts = models.IntegerField()
    last_error = models.TextField(null=True)
    created_at = models.DateTimeField()
    failed_at = models.DateTimeField(null=True)
    dead_at = models.DateTimeField(null=True)
    done_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = table("deliveries")
        verbose_name_plural = "deliveries"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.handler} {self.message_id}"
