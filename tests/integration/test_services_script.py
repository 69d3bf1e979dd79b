"""scripts/services fails fast with a one-line reason (and the log tail), never hangs."""

import os
import socket
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.services
SCRIPT = str(ROOT / "scripts" / "services")


def run(tmp_path, *args, **env):
    return subprocess.run(
        [SCRIPT, *args],
        env={**os.environ, "OUTBOX_BRIDGE_STATE_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_taken_port_is_reported_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run(tmp_path, "up", "postgres", OUTBOX_BRIDGE_PG_PORT=str(port))
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"services: postgres did not start: port {port} is taken by another process"
        " (set OUTBOX_BRIDGE_PG_PORT)"
    )


def test_missing_java_is_reported(tmp_path):
    out = run(
        tmp_path,
        "up",
        "kafka",
        OUTBOX_BRIDGE_JAVA="/nonexistent/java",
        OUTBOX_BRIDGE_KAFKA_PORT=str(free_port()),
        OUTBOX_BRIDGE_KAFKA_CONTROLLER_PORT=str(free_port()),
    )
    assert out.returncode == 1
    assert "kafka did not start: Java not found: '/nonexistent/java'" in out.stderr


def test_a_service_that_dies_while_starting_shows_its_log_tail(tmp_path):
    out = run(
        tmp_path,
        "up",
        "kafka",
        OUTBOX_BRIDGE_KAFKA_HEAP="1k",  # the JVM refuses such a heap and exits
        OUTBOX_BRIDGE_KAFKA_PORT=str(free_port()),
        OUTBOX_BRIDGE_KAFKA_CONTROLLER_PORT=str(free_port()),
        OUTBOX_BRIDGE_KAFKA_PROXIED_PORT=str(free_port()),
        OUTBOX_BRIDGE_KAFKA_SASL_PORT=str(free_port()),
        OUTBOX_BRIDGE_KAFKA_TLS_PORT=str(free_port()),
    )
    assert out.returncode == 1
    assert "services: kafka did not start:" in out.stderr
    assert "--- last lines of" in out.stderr and "heap" in out.stderr.lower()
