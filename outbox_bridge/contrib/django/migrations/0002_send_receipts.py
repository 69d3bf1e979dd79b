from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0001_initial")]
    operations = [sql_migrations(upto=4)]  # 0004_send_receipts
