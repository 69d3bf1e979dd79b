from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0004_prune_without_cascade")]
    operations = [sql_migrations(upto=7)]  # 0007_recovering
