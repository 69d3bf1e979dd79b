"""The soak's broker faults on the three-broker cluster of ``scripts/services``
(``up kafka-cluster``), each shown to have happened: the partition's leadership
moved, the controller quorum elected another leader, the ISR shrank and grew back.

Who leads what comes from the cluster's metadata; the active controller from each
node's ``quorum-state`` file (KRaft's record of the leader it follows and its epoch),
since a client's DescribeCluster names any broker as "the controller".
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from ...config import Settings, kafka_client

NODES = (1, 2, 3)

log = logging.getLogger(__name__)


def _until(check: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """``check()`` once it is truthy; None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except Exception:  # noqa: BLE001 - a broker going down mid-question
            found = None
        if found:
            return found
        time.sleep(every)
    return None


class Cluster:
    """The cluster's nodes (by their ``scripts/services`` names) and the soak's topic."""

    def __init__(self, settings: Settings, state: Path, topic: str, services: str) -> None:
        missing = [n for n in NODES if not (state / f"kafka-{n}" / "server.pid").exists()]
        if missing:  # the faults would find no node to kill, minutes into the run
            raise RuntimeError(
                f"the cluster's state directory {state} has no running kafka-{missing[0]}:"
                " start it with `scripts/services up kafka-cluster` and take"
                " OUTBOX_BRIDGE_KAFKA_CLUSTER_STATE from `scripts/services env`"
            )
        self.state, self.topic, self.services = state, topic, services
        self.client = Consumer(kafka_client(settings, **{"group.id": f"soak-cluster-{topic}"}))

    def close(self) -> None:
        self.client.close()

    def partitions(self) -> dict[int, tuple[int, set[int]]]:
        """Each partition of the topic: (leader, ISR), as the cluster says now."""
        meta = self.client.list_topics(self.topic, timeout=10).topics[self.topic]
        return {p: (m.leader, set(m.isrs)) for p, m in meta.partitions.items()}

    def busiest(self) -> int:
        """The partition with the most records."""
        ends = {
            p: self.client.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1]
            for p in self.partitions()
        }
        return max(ends, key=ends.__getitem__)

    def controller(self) -> tuple[int, int]:
        """(leader id, epoch) of the controller quorum: the newest epoch a node knows."""
        best = (-1, -1)
        for n in NODES:
            path = self.state / f"kafka-{n}" / "data" / "__cluster_metadata-0" / "quorum-state"
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if state.get("leaderId", -1) >= 0 and state.get("leaderEpoch", -1) > best[1]:
                best = (state["leaderId"], state["leaderEpoch"])
        return best

    def pid(self, node: int) -> int:
        return int((self.state / f"kafka-{node}" / "server.pid").read_text())

    def kill(self, node: int) -> bool:
        """SIGKILL the node; whether its process ended."""
        pid = self.pid(node)
        subprocess.run([self.services, "kill", f"kafka-{node}"], check=True, capture_output=True)
        return not os.path.exists(f"/proc/{pid}") or _zombie(pid)

    def start(self, node: int) -> None:
        """Restart the node; a start that fails (a node that exits while the quorum
        elects, seen under load) is tried again, twice, and logged."""
        for attempt in range(3):
            up = subprocess.run(
                [self.services, "up", f"kafka-{node}"], timeout=300, capture_output=True, text=True
            )
            if up.returncode == 0:
                return
            log.warning("kafka-%d did not start (attempt %d): %s", node, attempt + 1, up.stderr)
            time.sleep(5)
        raise RuntimeError(f"kafka-{node} did not come back: {up.stderr[-2000:]}")

    def rejoined(self, node: int, timeout: float = 180) -> bool:
        """Whether the node is back in the ISR of every partition of the topic."""
        return bool(
            _until(lambda: all(node in isr for _, isr in self.partitions().values()), timeout)
        )

    # -- the faults -----------------------------------------------------------
    def _crash(self, node: int, held: float, changed: Callable[[], Any]) -> tuple[bool, Any, bool]:
        """SIGKILL ``node``, wait (60 s at most) for ``changed()`` to show the cluster
        moved on, restart it after ``held`` seconds and wait for it to rejoin the ISR:
        (its process ended, what changed, rejoined)."""
        ended = self.kill(node)
        moved = _until(changed, 60)
        time.sleep(held)
        self.start(node)
        return ended, moved, self.rejoined(node)

    def kill_leader(self, held: float) -> dict[str, Any]:
        """SIGKILL the leader of the busiest partition; another replica leads it."""
        part = self.busiest()
        leader = self.partitions()[part][0]
        ended, moved, back = self._crash(
            leader, held, lambda: (now := self.partitions()[part][0]) not in (leader, -1) and now
        )
        return {
            "detail": f"SIGKILL kafka-{leader}, leader of partition {part}; leader now"
            f" {moved}; restarted after {held:.1f}s, back in the ISR: {back}",
            "verified": ended and bool(moved) and back,
        }

    def kill_controller(self, held: float) -> dict[str, Any]:
        """SIGKILL the active controller; the quorum elects another."""
        leader, epoch = self.controller()
        ended, new, back = self._crash(
            leader, held, lambda: (c := self.controller())[1] > epoch and c[0] != leader and c
        )
        return {
            "detail": f"SIGKILL kafka-{leader}, the active controller (epoch {epoch}); now"
            f" {new and f'kafka-{new[0]} (epoch {new[1]})'}; restarted, back in the ISR: {back}",
            "verified": ended and bool(new) and back,
        }

    def stall_leader(self) -> dict[str, Any]:
        """SIGSTOP the leader of the busiest partition (a paused VM, a long GC) until
        it leaves the ISR, then SIGKILL and restart it."""
        return self.stall_replica(self.partitions()[self.busiest()][0])

    def stall_replica(self, node: int) -> dict[str, Any]:
        """SIGSTOP a node until it leaves the ISR of a partition of the topic, then
        SIGKILL and restart it: it catches up and rejoins."""
        before = sum(node in isr for _, isr in self.partitions().values())
        os.kill(self.pid(node), signal.SIGSTOP)
        t0 = time.monotonic()
        shrank = _until(
            lambda: [p for p, (_, isr) in self.partitions().items() if node not in isr], 90
        )
        took = time.monotonic() - t0
        self.kill(node)  # SIGKILL reaches a stopped process
        self.start(node)
        back = self.rejoined(node)
        return {
            "detail": f"SIGSTOP kafka-{node} (in the ISR of {before} partitions)"
            f": out of the ISR of {len(shrank or [])} after {took:.0f}s; SIGKILL,"
            f" restarted, back in the ISR: {back}",
            "verified": bool(shrank) and back,
        }


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
