from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0003_wake_by_sequence")]
    operations = [sql_migrations(upto=6)]  # 0006_prune_without_cascade
