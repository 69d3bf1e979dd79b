from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0007_recover_before")]
    operations = [sql_migrations(upto=10)]  # 0010_fleet
