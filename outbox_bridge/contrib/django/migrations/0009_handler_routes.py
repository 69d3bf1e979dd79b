from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0008_fleet")]
    operations = [sql_migrations(upto=11)]  # 0011_handler_routes
