"""The short soak of CI: `outbox-bridge soak` with one fault of each kind, per pool.

The soak reconciles its own ledger (nothing lost, no effect twice, order kept,
all drained); here we check that it ran what it says and found nothing.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.kafka,
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.services,
]

KINDS = [
    "kill_child",
    "kill_worker",
    "kafka",
    "postgres",
    "rabbitmq",
    "rebalance",
    "blackhole_postgres",
    "blackhole_kafka",
]


@pytest.mark.parametrize("pool, adapter", [("prefork", "psycopg2"), ("threads", "sqlalchemy")])
def test_a_short_soak_loses_nothing_doubles_nothing_and_keeps_order(
    native_services, tmp_path, pool, adapter
):
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [
            "outbox-bridge",
            "soak",
            "--seconds",
            "30",
            "--rate",
            "60",
            "--faults",
            "8",
            "--silence",
            "10",
            "--sample-every",
            "10",
            "--plot",
            str(tmp_path / "soak.png"),
            "--pool",
            pool,
            "--adapter",
            adapter,
            "--seed",
            "7",
            "--max-tail",
            "180",
            "--services",
            native_services.script,
            "--logdir",
            str(tmp_path),
            "--json",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        # a 10 s deadline: each blackhole costs its workers 10 s, not 30 s, after it
        env={**os.environ, "OUTBOX_BRIDGE_NETWORK_TIMEOUT": "10"},
    )
    print(done.stdout[-6000:], done.stderr[-3000:])
    assert report.exists(), done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["violations"] == [], done.stdout[-3000:]
    assert done.returncode == 0
    ran = {f["kind"] for f in result["faults"]}
    expected = set(KINDS) - ({"kill_child"} if pool != "prefork" else set())
    assert ran == expected and all(f["verified"] for f in result["faults"])
    ledger, figures = result["ledger"], result["figures"]
    assert ledger["committed"] > 1000 and ledger["rolled_back"] > 0
    assert figures["lost"] == figures["phantom"] == figures["keys_out_of_order"] == 0
    assert figures["flaky_deliveries_retried"] > 0  # the handler's faults happened too
    assert result["drained_after_s"] is not None
    samples = result["samples"]  # taken all along, and drawn
    assert samples["count"] >= 5 and (tmp_path / "soak.png").stat().st_size > 10_000
    sampled = [json.loads(line) for line in Path(samples["path"]).read_text().splitlines()]
    assert all(s["rss_mb"] and s["fds"] for s in sampled)
    assert any("outbox" in s.get("relations_kb", {}) and s.get("lag") is not None for s in sampled)
