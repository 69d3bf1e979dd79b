from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0010_idle_lock")]
    operations = [sql_migrations(upto=13)]  # 0013_round_limit
