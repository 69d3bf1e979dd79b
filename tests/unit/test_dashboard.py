"""The Grafana dashboard and the Prometheus config in the repository match the metrics."""

import json
import re

from tests.conftest import ROOT

DASHBOARD = ROOT / "docs" / "ops" / "grafana" / "dashboards" / "outbox-bridge.json"


def defined_metrics() -> set[str]:
    """Metric names outbox-bridge defines (counters and histograms, scrape-time gauges)."""
    source = (ROOT / "outbox_bridge" / "contrib" / "metrics.py").read_text()
    return set(re.findall(r'"(outbox_bridge_[a-z_]+)"', source))


def test_every_metric_the_dashboard_queries_exists():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(total|bucket|count|sum)$", "", name)
        for e in exprs
        for name in re.findall(r"outbox_bridge_[a-z_]+", e)
    }
    assert used and used <= defined_metrics(), used - defined_metrics()
    # every metric has a panel: what is measured is shown
    assert defined_metrics() <= used, defined_metrics() - used


def test_compose_scrapes_the_worker_port():
    compose = (ROOT / "docker-compose.yml").read_text()
    prometheus = (ROOT / "docs" / "ops" / "prometheus.yml").read_text()
    port = re.search(r'OUTBOX_BRIDGE_METRICS_PORT: "(\d+)"', compose).group(1)
    assert f"worker:{port}" in prometheus
