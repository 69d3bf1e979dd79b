from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0009_handler_routes")]
    operations = [sql_migrations(upto=12)]  # 0012_idle_lock
