"""The soak refuses fault kinds its Kafka cannot have, before it starts anything."""

import pytest

from outbox_bridge.config import Settings
from outbox_bridge.tools.soak import Options, Soak


def test_broker_faults_need_the_cluster(tmp_path):
    with pytest.raises(ValueError, match="need the cluster"):
        Soak(Settings(), Options(kinds=("broker_leader",), logdir=tmp_path))


def test_the_cluster_needs_its_bootstrap_servers(tmp_path, monkeypatch):
    monkeypatch.delenv("OUTBOX_BRIDGE_KAFKA_CLUSTER", raising=False)
    with pytest.raises(ValueError, match="OUTBOX_BRIDGE_KAFKA_CLUSTER"):
        Soak(Settings(), Options(cluster=True, logdir=tmp_path))


def test_the_one_brokers_faults_are_not_for_the_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTBOX_BRIDGE_KAFKA_CLUSTER", "127.0.0.1:1")
    with pytest.raises(ValueError, match="broker_leader"):
        Soak(Settings(), Options(cluster=True, kinds=("kafka",), logdir=tmp_path))


def test_an_unknown_kind_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown fault kinds {'nope'}"):
        Soak(Settings(), Options(kinds=("nope",), logdir=tmp_path))
