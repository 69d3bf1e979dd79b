"""What the soak samples while it runs, to show that nothing grows: per worker the
RSS and open files of its main and pool processes, PostgreSQL's connections,
the size of every table and index of the schema, and the inbox's Kafka lag;
one JSON line per sample. ``plot`` draws them (``outbox-bridge soak --plot``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_RELATIONS = """
SELECT c.relname, CASE c.relkind WHEN 'i' THEN pg_relation_size(c.oid)
                                 ELSE pg_table_size(c.oid) END  -- with its TOAST
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relkind IN ('r', 'i')
"""
_CONNECTIONS = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"


def process(pid: int) -> tuple[float, int] | None:
    """(RSS in MB, open file descriptors) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Sampler:
    """Takes a sample every ``every`` seconds in a thread, into ``path`` (JSON lines)."""

    def __init__(
        self,
        path: Path,
        every: float,
        workers: Callable[[], dict[str, int]],
        query: Callable[[str, Any], list[tuple]],
        lag: Callable[[], int | None],
        schema: str,
    ) -> None:
        self.path, self.every, self.workers = path, every, workers
        self.query, self.lag, self.schema = query, lag, schema
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak sampler", daemon=True)
        self.count = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        self.sample()  # the end of the run

    def _run(self) -> None:
        while not self.stop_event.wait(0 if self.count == 0 else self.every):
            self.sample()

    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "t": round(time.monotonic() - self.started, 1),
            "at": time.strftime("%H:%M:%S"),
        }
        for name, pid in self.workers().items():
            main = process(pid)
            pool = [p for p in (process(c) for c in children(pid)) if p is not None]
            if main is not None:
                s.setdefault("rss_mb", {})[f"{name} main"] = round(main[0], 1)
                s.setdefault("fds", {})[f"{name} main"] = main[1]
            if pool:  # the largest pool process: one that leaks grows alone
                s["rss_mb"][f"{name} pool (max)"] = round(max(p[0] for p in pool), 1)
                s["fds"][f"{name} pool (max)"] = max(p[1] for p in pool)
        try:
            s["pg_connections"] = self.query(_CONNECTIONS, None)[0][0]
            s["relations_kb"] = {n: b // 1024 for n, b in self.query(_RELATIONS, (self.schema,))}
        except Exception as exc:  # noqa: BLE001 - a sample during a fault: say so, go on
            s["error"] = f"postgres: {exc}"
        try:
            s["lag"] = self.lag()
        except Exception as exc:  # noqa: BLE001
            s["error"] = f"{s.get('error', '')} kafka: {exc}".strip()
        with open(self.path, "a") as f:
            f.write(json.dumps(s) + "\n")
        self.count += 1
        return s


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(samples: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """A PNG of the samples: one panel per measure, minutes on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(5, 1, figsize=(11, 17), sharex=True)

    def lines(ax, field: str, label: str, top: int | None = None) -> None:
        names = sorted({n for s in samples for n in (s.get(field) or {})})
        if top is not None:  # the largest at the end
            names = sorted(names, key=lambda n: -(samples[-1].get(field) or {}).get(n, 0))[:top]
        for name in names:
            ax.plot(minutes, [(s.get(field) or {}).get(name) for s in samples], label=name)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncol=2, loc="upper left")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)

    lines(axes[0], "rss_mb", "RSS (MB)")
    lines(axes[1], "fds", "open files")
    axes[2].plot(minutes, [s.get("pg_connections") for s in samples], label="connections")
    axes[2].set_ylabel("PostgreSQL connections")
    axes[2].set_ylim(bottom=0)
    axes[2].grid(alpha=0.3)
    lines(axes[3], "relations_kb", "size (kB), largest 12", top=12)
    axes[4].plot(minutes, [s.get("lag") for s in samples], label="lag")
    axes[4].set_ylabel("inbox consumer lag (records)")
    axes[4].set_ylim(bottom=0)
    axes[4].grid(alpha=0.3)
    axes[4].set_xlabel("minutes")
    fig.suptitle(title or "outbox-bridge soak")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
