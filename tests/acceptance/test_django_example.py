"""examples/django_shop under Django's own test runner, against the real PostgreSQL:
its migrate applies outbox-bridge's SQL, its view publishes inside atomic()."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SESSION_PREFIX

pytestmark = pytest.mark.postgres

SHOP = ROOT / "examples" / "django_shop"
# Django picks psycopg 3 when it is installed; hiding it makes Django use psycopg2
HIDE_PSYCOPG = "import sys; sys.modules['psycopg'] = None; "


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_the_django_example_passes_djangos_test_runner(services, driver):
    run = (
        ("" if driver == "psycopg" else HIDE_PSYCOPG)
        + "import runpy, sys; sys.argv = ['manage.py', 'test', '--noinput', '-v', '2'];"
        " runpy.run_path('manage.py', run_name='__main__')"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_BRIDGE_")},
        "DATABASE_URL": services["OUTBOX_BRIDGE_DATABASE_URL"],
        # Django's test database is test_<this>: one per session and driver
        "SHOP_DATABASE_NAME": f"{SESSION_PREFIX}shop_{driver}",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", run],
        cwd=SHOP,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Ran 14 tests" in output and "\nOK" in output, output
    assert "Applying outbox_bridge.0001_initial... OK" in output, output
    backend = "psycopg" if driver == "psycopg" else "psycopg2"
    assert _django_driver(env, driver) == backend


def _django_driver(env: dict, driver: str) -> str:
    """Which driver Django loaded under the same interpreter setup."""
    probe = ("" if driver == "psycopg" else HIDE_PSYCOPG) + (
        "import django.db.backends.postgresql.psycopg_any as p;"
        " print('psycopg' if p.is_psycopg3 else 'psycopg2')"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return out.stdout.strip()


def test_every_sql_migration_has_a_django_migration():
    """A new outbox_bridge/sql/migrations/NNNN file needs a Django migration that applies it."""
    from outbox_bridge.migrate import available

    names = os.listdir(ROOT / "outbox_bridge" / "contrib" / "django" / "migrations")
    text = "".join(
        (ROOT / "outbox_bridge" / "contrib" / "django" / "migrations" / n).read_text()
        for n in names
        if n[:4].isdigit()
    )
    newest = max(version for version, _, _ in available())
    assert f"sql_migrations(upto={newest})" in text


_OPTIONS_PROBE = """
import json, sys
import django
from django.conf import settings
from psycopg2.extensions import parse_dsn
dsn = parse_dsn(sys.argv[1])
settings.configure(INSTALLED_APPS=["outbox_bridge.contrib.django"], DATABASES={"default": {
    "ENGINE": "django.db.backends.postgresql", "NAME": dsn["dbname"], "USER": dsn.get("user", ""),
    "HOST": dsn["host"], "PORT": dsn["port"], "OPTIONS": json.loads(sys.argv[2])}})
django.setup()
import psycopg2
from outbox_bridge.config import get_settings
from outbox_bridge.db import connect
try:
    conn = connect(get_settings())
except psycopg2.OperationalError as exc:
    print(json.dumps({"refused": str(exc)}))
else:
    with conn.cursor() as cur:
        cur.execute("SHOW statement_timeout")
        print(json.dumps({"statement_timeout": cur.fetchone()[0]}))
"""


def test_the_worker_connects_with_the_django_databases_options(db_url):
    """OPTIONS reach libpq: a server setting in ``options`` applies, and ``sslmode=require``
    against this server without TLS refuses to connect instead of connecting in clear."""
    import json

    def probe(options: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_BRIDGE_")}
        done = subprocess.run(
            [sys.executable, "-c", _OPTIONS_PROBE, db_url, json.dumps(options)],
            cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    carried = probe({"options": "-c statement_timeout=12345", "isolation_level": 1})
    assert carried == {"statement_timeout": "12345ms"}
    refused = probe({"sslmode": "require"})
    assert "SSL" in refused.get("refused", ""), refused
