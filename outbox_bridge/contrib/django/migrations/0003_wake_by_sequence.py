from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0002_send_receipts")]
    operations = [sql_migrations(upto=5)]  # 0005_wake_by_sequence
