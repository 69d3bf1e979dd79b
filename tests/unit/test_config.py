"""Settings: environment overrides, and defaults that match scripts/services."""

import subprocess

import pytest

from outbox_bridge.config import Settings
from tests.conftest import ROOT


def test_environment_overrides_config_and_parses_types():
    conf = {"outbox_bridge_max_retries": 7, "outbox_bridge_batch_size": 10}
    s = Settings.from_conf(
        conf,
        {
            "OUTBOX_BRIDGE_MAX_RETRIES": "3",
            "OUTBOX_BRIDGE_WATCHER": "off",
            "OUTBOX_BRIDGE_POLL_INTERVAL": "0.25",
            "OUTBOX_BRIDGE_PRODUCER_CONFIG": '{"linger.ms": 1}',
        },
    )
    assert (s.max_retries, s.batch_size, s.watcher, s.poll_interval) == (3, 10, False, 0.25)
    assert s.producer_config == {"linger.ms": 1}


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="OUTBOX_BRIDGE_MAX_RETRIES='many'"):
        Settings.from_conf({}, {"OUTBOX_BRIDGE_MAX_RETRIES": "many"})


def test_defaults_match_the_native_service_stack():
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [str(ROOT / "scripts" / "services"), "env"], capture_output=True, text=True, env=env
    ).stdout
    exported = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    defaults = Settings()
    assert exported["OUTBOX_BRIDGE_DATABASE_URL"] == defaults.database_url
    assert exported["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"] == defaults.kafka_bootstrap_servers
    from outbox_bridge.config import DEFAULT_BROKER_URL

    assert exported["CELERY_BROKER_URL"] == DEFAULT_BROKER_URL
