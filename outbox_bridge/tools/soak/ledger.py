"""The soak's ledger: every message a writer tried, and what became of it.

It lives outside the system under test (a JSON-lines file and this process's
memory), so no fault of PostgreSQL, Kafka or RabbitMQ can change it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

COMMITTED, ROLLED_BACK, UNKNOWN = "committed", "rolled_back", "unknown"


@dataclass
class Entry:
    message_id: str
    writer: int
    txid: str | None  # the transaction's marker (soak_commits)
    key: str | None
    poison: bool
    outcome: str
    at: float  # seconds since the soak began
    # the message model: delayed until, expiring at (epoch seconds), asking for a reply
    deliver_at: float | None = None
    expires_at: float | None = None
    reply: bool = False


class Ledger:
    def __init__(self, path: Path, started: float) -> None:
        self.path = path
        self.started = started
        # the wall clock at ``started``: an entry's ``at`` against Kafka's timestamps
        self.wall = time.time() - (time.monotonic() - started)
        self.entries: list[Entry] = []
        self._lock = threading.Lock()
        self._file = open(path, "a")  # noqa: SIM115 - kept open for the run

    def record(
        self,
        writer: int,
        txid: str | None,
        messages: list[tuple],
        outcome: str,
    ) -> None:
        """``messages``: (message id, key, poison, deliver_at, expires_at, reply)."""
        at = round(time.monotonic() - self.started, 3)
        new = [Entry(m, writer, txid, k, p, outcome, at, d, x, r) for m, k, p, d, x, r in messages]
        with self._lock:
            self.entries += new
            self._file.writelines(json.dumps(asdict(e)) + "\n" for e in new)
            self._file.flush()

    def attempted(self) -> int:
        return len(self.entries)

    def resolve(self, status: dict[str, str | None]) -> dict[str, int]:
        """Unknown outcomes, settled by their transaction's marker row."""
        settled = {"committed": 0, "aborted": 0, "unresolved": 0}
        for e in self.entries:
            if e.outcome != UNKNOWN:
                continue
            found = status.get(e.txid) if e.txid is not None else None
            if found == "committed":
                e.outcome = COMMITTED
                settled["committed"] += 1
            elif found == "aborted":
                e.outcome = ROLLED_BACK
                settled["aborted"] += 1
            else:
                settled["unresolved"] += 1
        return settled

    def close(self) -> None:
        self._file.close()
