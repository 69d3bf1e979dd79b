"""The durable queue that the outbox (and the inbox) are built on.

Rows live in a PostgreSQL table and carry a shard, a hash of (topic, key). A
task owns a whole shard at a time through a claim, a row in ``claims`` with a
token and a lease, so the hot path never rewrites a row just to claim it, and
the rows of one key are handled by one task, in id order. A row that fails on
its own becomes ``retrying``: it gets a token and lease of its own, and holds
back the later rows of its key until it is done or dead. PostgreSQL is the
source of truth: a lost task or a crashed worker costs at most one lease.
"""

from __future__ import annotations

import random
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .db import channel
from .events import emit
from .queries import render


def shard_of(topic: str, key: bytes | None, shards: int) -> int:
    """The shard of a message: all messages of one (topic, key) share it."""
    if key is None:
        return random.randrange(shards)  # no order to keep: spread them
    return zlib.crc32(topic.encode() + b"\0" + key) % shards


@dataclass(frozen=True)
class DeadMessage:
    """A message that has just become dead.

    ``queue`` is ``"outbox"`` (it could not be sent to Kafka) or the name of
    the handler task that could not handle it; ``id`` is the row id that
    ``outbox-bridge dead retry --id`` takes.
    """

    queue: str
    id: int
    message_id: uuid.UUID
    topic: str
    key: bytes | None
    attempts: int
    last_error: str | None


# RETURNING columns of a row that became dead, in DeadMessage's order after queue
DEAD_COLUMNS = "queue.dead_columns"


def dead_messages(queue: str, rows: Iterable[tuple]) -> list[DeadMessage]:
    return [
        DeadMessage(queue, r[0], r[1], r[2], None if r[3] is None else bytes(r[3]), r[4], r[5])
        for r in rows
    ]


def fire_dead(dead: Iterable[DeadMessage]) -> None:
    """Announce messages that became dead (the ``dead`` event: the ``message_dead``
    signal, the dead hook, metrics); call only after their change committed."""
    for message in dead:
        emit("dead", message)


class Renewed(NamedTuple):
    """A renewed claim: the shards still ours, those of them recovering, each one's
    round limit (see ``renew``; None: unknown), and whether the queue has more tasks
    at work than its share of the pool (``crowded``: another queue waits)."""

    owned: list[int]
    recovering: list[int]
    limits: dict[int, int | None]
    crowded: bool = False

    def region_limit(self, shards: Sequence[int], default: int) -> int:
        """The most rows a round of the dead owners of ``shards`` fetched."""
        found = [self.limits.get(s) for s in shards]
        return default if None in found or not found else min(default, max(found))


@dataclass(frozen=True)
class Queue:
    """One durable queue: a table of rows and its claims (see the module doc).

    ``scope`` narrows a shared table to one consumer of it: the inbox's
    deliveries table holds one queue per handler (``handler = scope``).
    ``done`` is what completing a row does: delete it, or mark it done.
    """

    name: str
    table: str
    schema: str
    scope: str | None = None
    done: str = "delete"
    # the column whose bytes bound a fetch (None: rows only)
    size_column: str | None = "value"
    # the fetch plans for a table in memory (queue.in_memory); only where no user code
    # shares the fetch's transaction
    in_memory: bool = False

    def _run(self, cur, name: str, pieces: dict[str, Any] | None = None, **params: Any) -> None:
        """Execute statement ``queue.<name>`` (or one named in full, ``area.name``) on
        this queue's table and scope."""
        given = {
            "table": (self.schema, self.table),
            "size": "queue.size" if self.size_column else "queue.zero",
            "size_column": (self.size_column or "value",),
            "recover_before": "queue.recover_before",
            "dead_columns": DEAD_COLUMNS,
            **{f"scope_{a}": f"queue.scope_{a}" if self.scope else "queue.nothing" for a in "ohtw"},
            **(pieces or {}),
        }
        cur.execute(
            render(name if "." in name else f"queue.{name}", self.schema, given),
            {"queue": self.name, "scope": self.scope, **params},
        )

    def _notify(self, cur, why: str) -> None:
        self._run(cur, "notify", channel=self.channel, why=why)

    @property
    def channel(self) -> str:
        return channel(self.schema, self.name.split(":")[0])

    # -- the watcher's side -------------------------------------------------
    def ready_shards(self, cur, since: int | None = None) -> list[int]:
        """Shards with pending rows that may go now. ``since``: ids from it on may be of
        transactions that committed only lately, whatever the shard's release saw."""
        self._run(cur, "ready_shards", since=since)
        return [r[0] for r in cur.fetchall()]

    def claim(
        self,
        cur,
        shards: Sequence[int],
        lease: float,
        groups: int = 1,
        per_group: int | None = None,
    ) -> list[tuple[list[int], uuid.UUID]]:
        """Claim the given shards that nobody holds, split into up to ``groups``
        claims of one token each, of at most ``per_group`` shards: [(shards, token), ...]."""
        if not shards:
            return []
        self.add_claims(cur, shards)
        groups = max(1, groups)
        most = len(shards) if per_group is None else groups * max(1, per_group)
        tokens = [str(uuid.uuid4()) for _ in range(groups)]
        self._run(
            cur,
            "claim",
            shards=list(shards),
            lease=lease,
            groups=groups,
            tokens=tokens,
            most=most,
        )
        claimed: dict[Any, list[int]] = {}
        for shard, token in cur.fetchall():
            claimed.setdefault(token, []).append(shard)
        return [(sorted(group), token) for token, group in claimed.items()]

    def set_share(self, cur, per_task: int, tasks: int | None = None) -> None:
        """The most shards one task of this queue keeps (a lingering task gives the
        rest back at its next round, ``renew``), and the queue's share of the pool
        in ``tasks`` (more at work: they are ``crowded``)."""
        self._run(
            cur,
            "set_share",
            per_task=max(1, per_task),
            tasks=None if tasks is None else max(0, tasks),
        )

    def add_claims(self, cur, shards: Sequence[int]) -> None:
        """The claim rows of these shards, free, where missing (a lingering task can
        only take on a shard that has one)."""
        self._run(cur, "add_claims", shards=list(shards))

    def expired_retries(self, cur, lease: float, limit: int = 1000) -> list[tuple[int, Any, int]]:
        """Take over retrying rows whose retry task was lost: (id, new token, attempts)."""
        self._run(cur, "expired_retries", lease=lease, limit=limit)
        return cur.fetchall()

    def repair(self, cur) -> None:
        """The safety net for held rows: park rows that arrived behind held keys, free
        waiting rows whose key has no held head any more (releasing a key frees them at
        once), and look at every shard released as "all held" again (rows that
        committed late)."""
        self.park(cur)
        self._run(cur, "free_waiting")
        self._run(cur, "look_again")

    # -- the shard task's side ----------------------------------------------
    def renew(
        self,
        cur,
        shards: Sequence[int],
        token: Any,
        lease: float,
        adopt: bool = False,
        limit: int | None = None,
    ) -> list[int]:
        """Extend our claim; the shards still ours (none: a stale task). With
        ``adopt``, also claim free shards that have become ready. ``limit``: the
        most rows our rounds fetch until the next renewal commits (None: as before)."""
        return self.renew_round(cur, shards, token, lease, adopt, limit).owned

    def renew_round(
        self,
        cur,
        shards: Sequence[int],
        token: Any,
        lease: float,
        adopt: bool = False,
        limit: int | None = None,
    ) -> Renewed:
        """``renew``, and which of the shards are recovering: their previous owner
        died with a batch in hand (see ``start_held``)."""
        params = {"shards": list(shards), "token": token, "lease": lease, "limit": limit}
        pieces = {"round_limit": "queue.round_limit", "crowded": "queue.crowded"}
        self._run(cur, "renew_adopt" if adopt else "renew", pieces, **params)
        found = cur.fetchall()
        if found and found[0][2]:  # shards over the queue's share went back: claim them
            self._notify(cur, "released")
        return Renewed(
            sorted(r[0] for r in found),
            sorted(r[0] for r in found if r[1]),
            {r[0]: r[3] for r in found},
            any(r[4] for r in found),
        )

    def recovered(self, cur, shards: Sequence[int], token: Any, limit: int | None = None) -> None:
        """These shards of ours are past what their dead owner may have had in hand;
        ``limit`` is what our rounds fetch from now on (see ``renew``)."""
        self._run(cur, "recovered", shards=list(shards), token=token, limit=limit)

    def still_recovering(self, cur, shards: Sequence[int], token: Any) -> None:
        """These shards of ours go back before their recovery is over: the next owner
        runs the rest of what their dead owner may have had one row at a time."""
        self._run(cur, "still_recovering", shards=list(shards), token=token)

    def _fetch(
        self,
        cur,
        columns: str,
        shards: Sequence[int],
        limit: int,
        max_bytes: int,
        skip_topics=(),
        region: bool = False,
    ):
        per_shard = max(1, -(-limit // max(1, len(shards))))
        bytes_per_shard = max(1, max_bytes // max(1, len(shards)))
        pieces = {
            "columns": columns,
            "region": "queue.region" if region else "queue.nothing",
            "plan": "queue.in_memory" if self.in_memory else "queue.nothing",
        }
        self._run(
            cur,
            "fetch",
            pieces,
            shards=list(shards),
            limit=per_shard,
            bytes=bytes_per_shard,
            skip=list(skip_topics),
        )
        rows = cur.fetchall()
        counts: dict[int, int] = {}
        sizes: dict[int, int] = {}
        for r in rows:
            counts[r[-2]] = counts.get(r[-2], 0) + 1
            sizes[r[-2]] = max(sizes.get(r[-2], 0), r[-1] or 0)
        full = {
            shard
            for shard, n in counts.items()
            if n >= per_shard or sizes[shard] >= bytes_per_shard
        }
        return rows, full

    def fetch_ids(
        self, cur, shards: Sequence[int], limit: int, skip_topics: Sequence[str] = ()
    ) -> tuple[list[int], set[int]]:
        """Like ``fetch``, ids only; and the shards that had rows."""
        rows, _full = self._fetch(cur, "queue.id_column", shards, limit, 2**62, skip_topics)
        return [r[0] for r in rows], {r[1] for r in rows}

    def suspects(
        self, cur, shards: Sequence[int], limit: int, skip_topics: Sequence[str] = ()
    ) -> list[int]:
        """The ids that the dead owner of these recovering shards may have had in hand:
        what ``fetch_ids`` gives, of the rows that existed at its last renewal."""
        rows, _full = self._fetch(
            cur, "queue.id_column", shards, limit, 2**62, skip_topics, region=True
        )
        return [r[0] for r in rows]

    def release(
        self,
        cur,
        shards: Sequence[int],
        token: Any,
        pause: float = 0.0,
        held: Iterable[int] = (),
        recheck: float | None = None,
        skip_topics: Sequence[str] = (),
    ) -> None:
        """Give the shards back; with ``pause``, nobody re-claims them before then.

        ``held``: shards whose pending rows are all held back (by their keys, or
        by a paused topic in ``skip_topics``); they are skipped until a newer row
        arrives, a held key is released (``wake_shards``), or ``recheck`` seconds
        have passed.
        """
        self._run(
            cur,
            "release",
            pause=pause,
            held=list(held),
            recheck=recheck,
            shards=list(shards),
            token=token,
            skip=list(skip_topics),
        )
        self._notify(cur, "released")

    def wake_shards(self, cur, shards: Iterable[int]) -> None:
        """Let the watcher claim these shards again (a held key was released).

        A wake-up is a row of its own, not a change to the claim: a task that
        runs on the shard now cannot overwrite it with its older view when it
        releases the shard as "all held". The next claim of the shard consumes it.
        """
        self._run(cur, "wake_shards", shards=sorted(set(shards)))
        self._notify(cur, "unblocked")

    # -- completing, retrying, burying ---------------------------------------
    def complete(self, cur, ids: Sequence[int]) -> None:
        if not ids:
            return
        if self.done == "delete":
            self._run(cur, "delete", ids=list(ids))
        else:
            self._run(cur, "mark_done", ids=list(ids))

    def hold(
        self, cur, failures: dict[int, str], token: Any, lease: float, count: bool = True
    ) -> None:
        """A failed attempt of these rows: they become (or stay) retrying heads owned by
        ``token``, with a lease that covers the next countdown. Rows that another token
        took over meanwhile are left alone. ``count``: the attempt is not counted yet
        (a retry's attempt is counted when it starts, by ``start_held``)."""
        if not failures:
            return
        self._run(
            cur,
            "hold",
            token=token,
            lease=lease,
            ids=list(failures),
            errors=list(failures.values()),
            count=int(count),
        )

    def start_held(
        self, cur, ids: Sequence[int], token: Any, lease: float
    ) -> list[tuple[int, int]]:
        """Count an attempt of these retrying rows of ``token`` before it runs, in a
        transaction of its own that the caller commits first: an attempt whose
        process dies (killed, out of memory, its time limit) or whose COMMIT fails
        is counted all the same, so a message that keeps killing its process
        becomes dead after its retries. Returns (id, attempts now)."""
        if not ids:
            return []
        self._run(cur, "start_held", lease=lease, ids=list(ids), token=token)
        return sorted(cur.fetchall())

    def park(self, cur, shards: Sequence[int] | None = None) -> int:
        """Pending rows of held keys become 'waiting', out of the pending index: a
        fetch no longer walks past them. Heads being retried right now are skipped
        (SKIP LOCKED); those locked here make their release wait for this commit,
        so the release always sees, and frees, what was parked."""
        self._run(cur, "park", all=shards is None, shards=list(shards or ()))
        return cur.rowcount

    def unpark(self, cur, keys: Iterable[tuple[int, str, bytes | None]]) -> None:
        """These (shard, topic, key) are free again (their head was delivered, retried
        or purged): their waiting rows become pending, in their original order."""
        found = sorted({k for k in keys if k[2] is not None})
        if not found:
            return
        shards, topics, keys_ = (list(c) for c in zip(*found, strict=True))
        self._run(cur, "unpark", shards=shards, topics=topics, keys=keys_)

    def take_held(self, cur, ids: Sequence[int], token: Any) -> list[int]:
        """Ids of retrying rows still owned by ``token``, locked, in order."""
        self._run(cur, "take_held", ids=list(ids), token=token)
        return [r[0] for r in cur.fetchall()]

    def extend_held(
        self,
        cur,
        ids: Sequence[int],
        token: uuid.UUID,
        lease: float,
        uncount: bool = False,
        why: str | None = None,
    ) -> None:
        """Keep these held rows of ``token`` longer; ``uncount``: their attempt (counted
        when it started) did not happen after all, the topic or producer was away."""
        self._run(
            cur,
            "extend_held",
            lease=lease,
            uncount=int(uncount),
            why=why,
            ids=list(ids),
            token=token,
        )

    def bury(
        self,
        cur,
        ids: Sequence[int],
        token: Any,
        error: str | None,
        max_retries: int | None = None,
    ) -> list[DeadMessage]:
        """Retrying rows of ``token`` become dead (idempotent); returns those that did,
        for ``fire_dead`` after the commit. With ``max_retries``, only rows
        that failed more often than that."""
        self._run(
            cur,
            "bury",
            error=error,
            ids=list(ids),
            token=token,
            max_retries=-1 if max_retries is None else max_retries,
        )
        return dead_messages(self.scope or self.name, cur.fetchall())

    def expire(self, cur, ids: Sequence[int]) -> list[DeadMessage]:
        """These rows' expiry passed before they were sent or handled: they become
        'expired', dead with the reason "expired" and holding no key. Returns those
        that did, for ``fire_dead`` after the commit."""
        if not ids:
            return []
        self._run(cur, "expire", ids=list(ids))
        return dead_messages(self.scope or self.name, cur.fetchall())

    # -- what the commands and the metrics show ---------------------------------
    def counts(self, cur, cap: int | None = None, done: bool = False) -> dict[str, int]:
        """Rows per state (pending, waiting, retrying, dead, expired; ``done`` too), each count
        bounded by ``cap`` (None: exact)."""
        self._run(cur, "counts", cap=cap)
        found = dict(cur.fetchall())
        if done:
            self._run(cur, "done_count")
            found["done"] = cur.fetchone()[0]
        return found

    def oldest_pending(self, cur, shards: int) -> float | None:
        """Seconds since the oldest pending row was written (None: no pending row)."""
        self._run(cur, "oldest_pending", shards=shards)
        (value,) = cur.fetchone()
        return None if value is None else float(value)

    def blocked_count(self, cur, cap: int | None = None) -> int:
        """Keys held back by a retrying or dead head (bounded by ``cap``)."""
        self._run(cur, "blocked_count", cap=cap)
        return cur.fetchone()[0]

    def blocked_keys(self, cur) -> list[tuple]:
        """(topic, key, state, attempts, last_error, rows waiting) of the first 100 held
        heads."""
        self._run(cur, "blocked_keys")
        return cur.fetchall()

    def keys_of(self, cur, ids: Sequence[int]) -> dict[int, tuple[str, bytes | None]]:
        """id -> (topic, key) of the rows ``ids`` still there."""
        self._run(cur, "keys_of", ids=list(ids))
        return {i: (t, None if k is None else bytes(k)) for i, t, k in cur.fetchall()}
