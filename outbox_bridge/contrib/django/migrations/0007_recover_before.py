from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0006_inbox_per_topic")]
    operations = [sql_migrations(upto=9)]  # 0009_recover_before
