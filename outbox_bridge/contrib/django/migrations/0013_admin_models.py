"""The admin's read-only models of outbox-bridge's tables: state only (unmanaged)."""

from django.db import migrations, models

from ..models import table


class Migration(migrations.Migration):
    dependencies = [
        ("outbox_bridge", "0012_message_model"),
    ]

    operations = [
        migrations.CreateModel(
            name="Delivery",
            fields=[
                ("id", models.BigIntegerField(primary_key=True, serialize=False)),
                ("message_id", models.UUIDField()),
                ("handler", models.TextField()),
                ("topic", models.TextField()),
                ("key", models.BinaryField(null=True)),
                ("shard", models.SmallIntegerField()),
                (
                    "state",
                    models.TextField(
                        choices=[
                            ("pending", "pending"),
                            ("waiting", "waiting"),
                            ("retrying", "retrying"),
                            ("dead", "dead"),
                            ("expired", "expired"),
                            ("done", "done"),
                        ]
                    ),
                ),
                ("attempts", models.IntegerField()),
                ("last_error", models.TextField(null=True)),
                ("created_at", models.DateTimeField()),
                ("failed_at", models.DateTimeField(null=True)),
                ("dead_at", models.DateTimeField(null=True)),
                ("done_at", models.DateTimeField(null=True)),
            ],
            options={
                "verbose_name_plural": "deliveries",
                "db_table": table("deliveries"),
                "ordering": ["id"],
                "managed": False,
            },
        ),
        migrations.CreateModel(
            name="InboxMessage",
            fields=[
                ("id", models.BigIntegerField(primary_key=True, serialize=False)),
                ("message_id", models.UUIDField()),
                ("topic", models.TextField()),
                ("partition", models.IntegerField()),
                ("offset", models.BigIntegerField()),
                ("key", models.BinaryField(null=True)),
                ("value", models.BinaryField(null=True)),
                ("headers", models.JSONField(default=list)),
                ("timestamp", models.DateTimeField(null=True)),
                ("received_at", models.DateTimeField()),
            ],
            options={
                "verbose_name": "inbox message",
                "db_table": table("inbox"),
                "ordering": ["-id"],
                "managed": False,
            },
        ),
        migrations.CreateModel(
            name="OutboxMessage",
            fields=[
                ("id", models.BigIntegerField(primary_key=True, serialize=False)),
                ("message_id", models.UUIDField()),
                ("topic", models.TextField()),
                ("key", models.BinaryField(null=True)),
                ("value", models.BinaryField(null=True)),
                ("headers", models.JSONField(default=list)),
                ("shard", models.SmallIntegerField()),
                (
                    "state",
                    models.TextField(
                        choices=[
                            ("pending", "pending"),
                            ("waiting", "waiting"),
                            ("retrying", "retrying"),
                            ("dead", "dead"),
                            ("expired", "expired"),
                        ]
                    ),
                ),
                ("attempts", models.IntegerField()),
                ("last_error", models.TextField(null=True)),
                ("created_at", models.DateTimeField()),
                ("failed_at", models.DateTimeField(null=True)),
                ("dead_at", models.DateTimeField(null=True)),
            ],
            options={
                "verbose_name": "outbox message",
                "db_table": table("outbox"),
                "ordering": ["id"],
                "managed": False,
            },
        ),
    ]
