from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    dependencies = [("outbox_bridge", "0011_round_limit")]
    operations = [sql_migrations(upto=14)]  # 0014_message_model
