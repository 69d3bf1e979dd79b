"""The soak's workers and its faults, each one checked to have happened.

Service faults go through ``scripts/services`` (``kill``: PostgreSQL in
immediate mode, Kafka with SIGKILL; ``down``: RabbitMQ), then ``up``.
Blackholes silence the proxy (``proxy.py``) between the workers and PostgreSQL
or Kafka for ``silence`` seconds; the flows open meanwhile stay silent for good.
``kill_dispatcher`` SIGKILLs the worker elected to dispatch and times the handover;
the broker faults (``cluster.py``) need the three-broker cluster (``--cluster``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the default kinds (one broker)
KINDS = (
    "kill_child",
    "kill_worker",
    "kafka",
    "postgres",
    "rabbitmq",
    "rebalance",
    "blackhole_postgres",
    "blackhole_kafka",
)
BROKER_KINDS = ("broker_leader", "broker_controller", "broker_isr")
# the default kinds on the cluster: its brokers' faults instead of the one broker's
CLUSTER_KINDS = (
    "kill_child",
    "kill_worker",
    "kill_dispatcher",
    "postgres",
    "rabbitmq",
    "rebalance",
    "blackhole_postgres",
    *BROKER_KINDS,
)
ALL_KINDS = (*KINDS, "kill_dispatcher", *BROKER_KINDS)
# a dispatcher is elected again this soon after a fault ends (a restarted PostgreSQL:
# the workers' reconnect backoff; a silence: network_timeout and the election's own
# timings, worker/election.py), or the soak says so
ELECTED_WITHIN = 60.0


class Worker:
    """``celery -A outbox_bridge worker`` with the soak's handlers, stopped by its pid."""

    def __init__(self, name: str, env: dict[str, str], logdir: Path, pool: str, concurrency: int):
        self.name, self.env, self.pool = name, env, pool
        self.log = logdir / f"{name}.log"
        self.cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "outbox_bridge",
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "-l",
            "info",
            "--without-mingle",
            "--without-gossip",
            "--include",
            "outbox_bridge.tools.soak.handlers",
        ]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log.read_bytes()[offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} did not start; see {self.log}")
            time.sleep(0.2)

    def children(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split()]

    def kill(self) -> list[int]:
        """SIGKILL the main process and its pool processes; returns their pids."""
        pids = [self.proc.pid, *self.children()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        return pids

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        children = self.children()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


def gone(pid: int, timeout: float = 10) -> bool:
    """Whether ``pid`` has ended (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def refused(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` (the service is really down)."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) != 0


def schedule(
    seed: int, count: int, kinds: tuple[str, ...], start: float, end: float
) -> list[tuple[float, str]]:
    """``count`` faults between ``start`` and ``end`` seconds: every kind in turn (each
    round shuffled), evenly spaced with jitter. The same seed gives the same schedule."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < count:
        round_ = list(kinds)
        rng.shuffle(round_)
        order += round_
    gap = (end - start) / max(count, 1)
    return [
        (round(start + gap * (i + 0.5) + rng.uniform(-0.25, 0.25) * gap, 2), order[i])
        for i in range(count)
    ]


class Faults:
    """Injects one fault at a time and says how it went."""

    def __init__(
        self,
        workers: list[Worker],
        spare: Worker,
        services: str,
        urls: dict[str, tuple[str, int]],
        rng: random.Random,
        proxies: dict[str, Any] | None = None,
        silence: float = 60.0,
        query: Callable[..., list[tuple]] | None = None,
        cluster: Any = None,
    ) -> None:
        self.workers, self.spare, self.services = workers, spare, services
        self.urls, self.rng = urls, rng
        self.proxies, self.silence = proxies or {}, silence
        self.query, self.cluster = query, cluster

    def inject(self, kind: str) -> dict[str, Any]:
        if kind == "kill_child" and self.workers[0].pool != "prefork":
            kind = "kill_worker"  # threads and gevent pools have no child processes
        return {"kind": kind, **getattr(self, kind)()}

    def kill_child(self) -> dict[str, Any]:
        worker = self.rng.choice(self.workers)
        children = worker.children()
        pid = self.rng.choice(children)
        os.kill(pid, signal.SIGKILL)
        ok = gone(pid)
        deadline = time.monotonic() + 30  # the worker replaces its pool process
        while not (replaced := set(worker.children()) - set(children)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return {
            "detail": f"SIGKILL pool process {pid} of {worker.name} (ended: {ok},"
            f" replaced by {sorted(replaced)})",
            "verified": ok and bool(replaced),
        }

    def kill_worker(self) -> dict[str, Any]:
        worker = self.rng.choice(self.workers)
        pids = worker.kill()
        ok = worker.proc.returncode == -signal.SIGKILL and all(gone(p) for p in pids)
        time.sleep(self.rng.uniform(0.5, 2))
        worker.start()
        return {"detail": f"SIGKILL {worker.name} (pids {pids}), restarted", "verified": ok}

    def _dispatcher_pid(self) -> int | None:
        """The main pid of the worker holding the dispatcher's election now, heard from
        lately: a holder pings its session every few seconds (worker/election.py), and
        one behind a silent flow, which the server still sees, is not a dispatcher."""
        rows = self.query(
            "SELECT a.application_name FROM pg_stat_activity a"
            " WHERE a.datname = current_database()"
            " AND a.application_name LIKE 'outbox-bridge fleet %%'"
            " AND a.state_change > now() - interval '15 seconds'"
            " AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid"
            " AND l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted)"
        )
        for (name,) in rows:
            for part in name.split():
                if part.startswith("p="):
                    return int(part[2:])
        return None

    def _elected(self, within: float) -> tuple[int | None, float]:
        """Wait until a soak worker holds the election (at most ``within`` seconds):
        its pid (None: none did) and the seconds waited."""
        started = time.monotonic()
        while True:
            holder = self._dispatcher_pid()
            mine = any(w.proc and w.proc.pid == holder for w in self.workers)
            waited = time.monotonic() - started
            if mine or waited > within:
                return (holder if mine else None), waited
            time.sleep(0.1)

    def kill_dispatcher(self) -> dict[str, Any]:
        """SIGKILL the worker elected to dispatch (once one is: an earlier fault may
        have just ended); another worker takes over."""
        holder, waited = self._elected(ELECTED_WITHIN)
        worker = next((w for w in self.workers if w.proc and w.proc.pid == holder), None)
        if worker is None:
            return {
                "detail": f"no soak worker held the election within {ELECTED_WITHIN:.0f}s",
                "verified": False,
                "elected_after_s": None,
            }
        pids = worker.kill()
        killed = time.monotonic()
        ok = worker.proc.returncode == -signal.SIGKILL and all(gone(p) for p in pids)
        others = {w.proc.pid for w in self.workers if w is not worker and w.proc}
        deadline = killed + 60
        while (new := self._dispatcher_pid()) not in others and time.monotonic() < deadline:
            time.sleep(0.1)
        took = time.monotonic() - killed
        time.sleep(self.rng.uniform(0.5, 2))
        worker.start()
        return {
            "detail": f"SIGKILL {worker.name}, the dispatcher (pid {holder}, elected"
            f" {waited:.1f}s after the fault began); the worker with pid {new} dispatches"
            f" {took:.1f}s later; restarted",
            "verified": ok and new in others,
            "handover_s": round(took, 2),
        }

    def broker_leader(self) -> dict[str, Any]:
        return self.cluster.kill_leader(self.rng.uniform(1, 4))

    def broker_controller(self) -> dict[str, Any]:
        return self.cluster.kill_controller(self.rng.uniform(1, 4))

    def broker_isr(self) -> dict[str, Any]:
        return self.cluster.stall_replica(self.rng.choice((1, 2, 3)))

    def _service(self, name: str, stop: str) -> dict[str, Any]:
        subprocess.run([self.services, stop, name], check=True, timeout=120, capture_output=True)
        down = refused(*self.urls[name])
        held = self.rng.uniform(1, 4)
        time.sleep(held)
        started = subprocess.run([self.services, "up", name], timeout=300, capture_output=True)
        if started.returncode != 0:  # slower than the script waits (Kafka recovering its logs)
            deadline = time.monotonic() + 300
            while (
                subprocess.run([self.services, "status", name], capture_output=True).returncode != 0
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not come back: {started.stderr[-2000:]!r}")
                time.sleep(1)
        return {"detail": f"{name}: {stop}, down {held:.1f}s, up", "verified": down}

    def kafka(self) -> dict[str, Any]:
        return self._service("kafka", "kill")

    def postgres(self) -> dict[str, Any]:
        return self._service("postgres", "kill")

    def rabbitmq(self) -> dict[str, Any]:
        return self._service("rabbitmq", "down")

    def rebalance(self) -> dict[str, Any]:
        """A worker joins the consumer group, stays a moment, and leaves."""
        self.spare.start()
        joined = self.spare.proc.poll() is None
        time.sleep(self.rng.uniform(3, 6))
        code = self.spare.stop(timeout=90)  # a warm shutdown waits for running tasks
        return {
            "detail": f"{self.spare.name} joined, left (exit {code})",
            "verified": joined and code == 0,
        }

    def _blackhole(self, name: str) -> dict[str, Any]:
        proxy = self.proxies[name]
        flows = proxy.silence()
        time.sleep(self.silence)
        forwarding, silent = proxy.open_flows()
        proxy.speak()
        return {
            "detail": f"{name}: silent {self.silence:.0f}s ({flows} flows silenced,"
            f" {silent} still open and silent at the end, {forwarding} forwarding)",
            "verified": flows > 0 and forwarding == 0,
        }

    def blackhole_postgres(self) -> dict[str, Any]:
        """The silence, then how long until a worker dispatches again (the holder's
        session may be one the server still sees: ``elected_after_s``, a violation
        past ELECTED_WITHIN)."""
        result = self._blackhole("postgres")
        holder, waited = self._elected(ELECTED_WITHIN)
        result["elected_after_s"] = None if holder is None else round(waited, 1)
        result["detail"] += (
            f"; a dispatcher elected {waited:.1f}s after"
            if holder is not None
            else f"; no dispatcher within {ELECTED_WITHIN:.0f}s after"
        )
        return result

    def blackhole_kafka(self) -> dict[str, Any]:
        return self._blackhole("kafka")
