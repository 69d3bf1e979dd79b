from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0013_admin_models")]
    operations = [sql_migrations(upto=15)]  # 0015_share_tasks
