from django.db import migrations

from . import sql_migrations


class Migration(migrations.Migration):
    initial = True
    dependencies: list = []
    operations = [sql_migrations(upto=3)]  # 0001_outbox, 0002_inbox, 0003_wakes_and_pauses
