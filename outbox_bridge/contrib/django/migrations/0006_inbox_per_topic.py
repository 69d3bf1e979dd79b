from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    # 0008 builds an index CONCURRENTLY, which cannot run in a transaction
    atomic = False
    dependencies = [("outbox_bridge", "0005_recovering")]
    operations = [sql_migrations(upto=8)]  # 0008_inbox_per_topic
