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
from typing import Any

from . import events
from .db import channel, q


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
DEAD_COLUMNS = "id, message_id, topic, key, attempts, last_error"


def dead_messages(queue: str, rows: Iterable[tuple]) -> list[DeadMessage]:
    return [
        DeadMessage(queue, r[0], r[1], r[2], None if r[3] is None else bytes(r[3]), r[4], r[5])
        for r in rows
    ]


def fire_dead(dead: Iterable[DeadMessage]) -> None:
    """Announce messages that became dead (the ``dead`` event: the ``message_dead``
    signal, the dead hook, metrics); call only after their change committed."""
    for message in dead:
        events.emit("dead", message)

# {scope_X}: "AND X.handler = %(scope)s" for an inbox handler's queue, else "".

# The oldest pending rows of each claimed shard whose key has no held
# (retrying/dead) head; each shard contributes at most %(limit)s rows and,
# past its first row, at most %(bytes)s bytes of values. ``upto``: the bytes up
# to and including the row (octet_length reads no TOASTed value).
_FETCH = """
SELECT {columns}, o.shard, o.upto
FROM unnest(%(shards)s::int[]) AS s(shard)
CROSS JOIN LATERAL (
    SELECT * FROM (
        SELECT l.*, sum({size}) OVER (ORDER BY l.id) AS upto, {size} AS row_bytes
        FROM (
            SELECT o.* FROM {table} o
            WHERE o.shard = s.shard AND o.state = 'pending' {scope_o}
              AND o.topic <> ALL(%(skip)s::text[]) {region}
              AND NOT EXISTS (
                  SELECT 1 FROM {table} h
                  WHERE h.shard = s.shard AND h.state IN ('retrying', 'dead') {scope_h}
                    AND h.topic = o.topic AND h.key = o.key)
            ORDER BY o.id
            LIMIT %(limit)s
        ) l
    ) w
    WHERE w.upto - w.row_bytes < %(bytes)s
) o
ORDER BY o.id
"""

# Shards with pending rows (a loose index scan, one probe per shard), less
# those whose pending rows are all held back by their keys.
_READY_SHARDS = """
WITH RECURSIVE s(shard) AS (
    (SELECT t.shard FROM {table} t WHERE t.state = 'pending' {scope_t} ORDER BY t.shard LIMIT 1)
    UNION ALL
    SELECT (SELECT t.shard FROM {table} t
            WHERE t.state = 'pending' {scope_t} AND t.shard > s.shard ORDER BY t.shard LIMIT 1)
    FROM s WHERE s.shard IS NOT NULL
)
SELECT s.shard FROM s
LEFT JOIN {claims} c ON c.queue = %(queue)s AND c.shard = s.shard
WHERE s.shard IS NOT NULL
  AND (c.idle_above IS NULL OR c.idle_until < now()
       OR EXISTS (SELECT 1 FROM {wakes} w WHERE w.queue = %(queue)s AND w.shard = s.shard)
       OR EXISTS (
      SELECT 1 FROM {table} o
      WHERE o.shard = s.shard AND o.state = 'pending' {scope_o} AND o.id > c.idle_above)
       -- rows from id %(since)s on may have committed after the shard's release with a lower
       -- id than those it held (a slow writer): one that its key does not hold is new
       -- too (a shard held by a paused topic is looked at when the pause ends)
       OR c.idle_until IS NULL AND EXISTS (
      SELECT 1 FROM {table} o
      WHERE o.shard = s.shard AND o.state = 'pending' {scope_o}
        AND o.id >= %(since)s::bigint AND o.id <= c.idle_above
        AND NOT EXISTS (
            SELECT 1 FROM {table} h
            WHERE h.shard = o.shard AND h.state IN ('retrying', 'dead') {scope_h}
              AND h.topic = o.topic AND h.key = o.key)))
"""

# Free shards are claimed in up to %(groups)s groups, one token per group.
_CLAIM = """
WITH free AS (
    SELECT queue, shard FROM {claims}
    WHERE queue = %(queue)s AND shard = ANY(%(shards)s) AND lease_until < now()
    ORDER BY shard
    FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT queue, shard, (row_number() OVER (ORDER BY shard) - 1) %% %(groups)s AS g FROM free
), claimed AS (
    UPDATE {claims} c SET token = (%(tokens)s::uuid[])[n.g + 1],
        lease_until = now() + %(lease)s * interval '1s', idle_above = NULL, idle_until = NULL,
        -- a token left behind: its task never gave the shard back (died mid-batch)
        recovering = c.recovering OR c.token IS NOT NULL,
        recover_before = CASE WHEN c.token IS NULL THEN c.recover_before
            ELSE greatest(c.recover_before, {recover_before}) END
    FROM numbered n
    WHERE c.queue = n.queue AND c.shard = n.shard
    RETURNING c.shard, c.token
), woken AS (
    -- the new owner fetches after this commit, so it sees what the wake-up announced
    DELETE FROM {wakes} w USING claimed WHERE w.queue = %(queue)s AND w.shard = claimed.shard
)
SELECT shard, token FROM claimed
"""

# A lingering task keeps its shards (renews their lease) and takes on free shards
# that have become ready, as the watcher would claim them (same rules as
# _READY_SHARDS), so a busy period needs no new task per shard.
_RENEW_ADOPT = """
WITH free AS (
    SELECT c.queue, c.shard FROM {claims} c
    WHERE c.queue = %(queue)s AND c.lease_until < now()
      AND EXISTS (SELECT 1 FROM {table} o WHERE o.shard = c.shard AND o.state = 'pending' {scope_o})
      AND (c.idle_above IS NULL OR c.idle_until < now()
           OR EXISTS (SELECT 1 FROM {wakes} w WHERE w.queue = %(queue)s AND w.shard = c.shard)
           OR EXISTS (SELECT 1 FROM {table} o WHERE o.shard = c.shard AND o.state = 'pending'
                      {scope_o} AND o.id > c.idle_above))
    ORDER BY c.shard
    FOR UPDATE SKIP LOCKED
), mine AS (
    UPDATE {claims} c SET token = %(token)s, lease_until = now() + %(lease)s * interval '1s',
        idle_above = NULL, idle_until = NULL,
        recovering = c.recovering OR coalesce(c.token <> %(token)s, false),
        recover_before = CASE WHEN coalesce(c.token <> %(token)s, false)
            THEN greatest(c.recover_before, {recover_before}) ELSE c.recover_before END
    WHERE c.queue = %(queue)s
      AND ((c.shard = ANY(%(shards)s) AND c.token = %(token)s)
           OR c.shard IN (SELECT shard FROM free))
    RETURNING c.shard, c.recovering
), woken AS (
    DELETE FROM {wakes} w USING free WHERE w.queue = %(queue)s AND w.shard = free.shard
)
SELECT shard, recovering FROM mine
"""

# when the dead owner last renewed its lease (the same lease assumed), plus the moments
# its fetch may have come after that in the same transaction
_RECOVER_BEFORE = "c.lease_until - %(lease)s * interval '1s' + interval '2s'"
# The rows a dead owner may have had in hand: a prefix in id order of its shard, up to
# the newest pending row that existed at its last renewal (NULL: a redelivered task's,
# unknown: all). A prefix by id, not a filter by time, so that a key's rows never
# split around it (ids and commit times of concurrent transactions disagree).
_REGION = """AND o.id <= coalesce((
    SELECT CASE WHEN r.recover_before IS NULL THEN 9223372036854775807
        ELSE coalesce((SELECT max(t.id) FROM {table} t
                       WHERE t.shard = s.shard AND t.state = 'pending' {scope_t}
                         AND t.created_at <= r.recover_before), 0) END
    FROM {claims} r WHERE r.queue = %(queue)s AND r.shard = s.shard), 9223372036854775807)"""

# message id as text and empty headers as NULL: less to parse per row on the hot path
_OUTBOX_COLUMNS = (
    "o.id, o.message_id::text, o.topic, o.key, o.value, nullif(o.headers, '[]'::jsonb),"
    " extract(epoch FROM o.created_at)::float8"
)


@dataclass(frozen=True)
class Row:
    """One queued message, as fetched for delivery."""

    id: int
    message_id: str
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list | None
    # when the writer's transaction began (epoch seconds), for the latency metric
    created_at: float | None = None


def _row(r: tuple) -> Row:
    # bytea arrives as memoryview; the Kafka client wants bytes
    key, value = r[3], r[4]
    return Row(
        r[0],
        r[1],
        r[2],
        None if key is None else bytes(key),
        None if value is None else bytes(value),
        r[5],
        r[6],
    )


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

    def _q(self, template: str):
        template = template.replace("{table}", "{" + self.table + "}")
        size = f"coalesce(octet_length(l.{self.size_column}), 0)" if self.size_column else "0"
        template = template.replace("{size}", size).replace("{recover_before}", _RECOVER_BEFORE)
        for alias in ("o", "h", "t"):
            fragment = f"AND {alias}.handler = %(scope)s" if self.scope else ""
            template = template.replace("{scope_" + alias + "}", fragment)
        return q(template, self.schema)

    def _params(self, **params: Any) -> dict[str, Any]:
        return {"queue": self.name, "scope": self.scope, **params}

    @property
    def channel(self) -> str:
        return channel(self.schema, self.name.split(":")[0])

    # -- the watcher's side -------------------------------------------------
    def ready_shards(self, cur, since: int | None = None) -> list[int]:
        """Shards with pending rows that may go now. ``since``: ids from it on may be of
        transactions that committed only lately, whatever the shard's release saw."""
        cur.execute(self._q(_READY_SHARDS), self._params(since=since))
        return [r[0] for r in cur.fetchall()]

    def claim(
        self, cur, shards: Sequence[int], lease: float, groups: int = 1
    ) -> list[tuple[list[int], uuid.UUID]]:
        """Claim the given shards that nobody holds, split into up to ``groups``
        claims of one token each: [(shards, token), ...]."""
        if not shards:
            return []
        self.add_claims(cur, shards)
        groups = max(1, groups)
        tokens = [str(uuid.uuid4()) for _ in range(groups)]
        cur.execute(
            self._q(_CLAIM),
            self._params(shards=list(shards), lease=lease, groups=groups, tokens=tokens),
        )
        claimed: dict[Any, list[int]] = {}
        for shard, token in cur.fetchall():
            claimed.setdefault(token, []).append(shard)
        return [(sorted(group), token) for token, group in claimed.items()]

    def add_claims(self, cur, shards: Sequence[int]) -> None:
        """The claim rows of these shards, free, where missing (a lingering task can
        only take on a shard that has one)."""
        cur.execute(
            self._q(
                # NOT EXISTS first: a task's open transaction has a new version of
                # its claim row, and ON CONFLICT alone would wait for that transaction
                "INSERT INTO {claims} (queue, shard) SELECT %s, s FROM unnest(%s::int[]) s"
                " WHERE NOT EXISTS (SELECT 1 FROM {claims} c WHERE c.queue = %s AND c.shard = s)"
                " ON CONFLICT DO NOTHING"
            ),
            (self.name, list(shards), self.name),
        )

    def set_idle(self, cur, idle: bool) -> None:
        """Whether commits should NOTIFY (only while no dispatch is under way)."""
        cur.execute(
            self._q(
                "UPDATE {wakeup} SET idle = %s, seen_at = now() WHERE queue = %s AND idle <> %s"
            ),
            (idle, self.name, idle),
        )

    def heartbeat(self, cur, alive: bool = True) -> None:
        """A watcher is alive (or stops): commits skip NOTIFY when none is."""
        cur.execute(
            self._q(
                "UPDATE {wakeup} SET seen_at = CASE WHEN %s THEN now() ELSE '-infinity' END"
                " WHERE queue = %s"
            ),
            (alive, self.name),
        )

    def expired_retries(self, cur, lease: float, limit: int = 1000) -> list[tuple[int, Any, int]]:
        """Take over retrying rows whose retry task was lost: (id, new token, attempts)."""
        cur.execute(
            self._q(
                "UPDATE {table} SET claim_token = gen_random_uuid(),"
                " lease_until = now() + %(lease)s * interval '1s'"
                " WHERE id IN (SELECT o.id FROM {table} o WHERE o.state = 'retrying' {scope_o}"
                " AND o.lease_until < now() ORDER BY o.id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " RETURNING id, claim_token, attempts"
            ),
            self._params(lease=lease, limit=limit),
        )
        return cur.fetchall()

    def forget_held(self, cur) -> None:
        """Look at every shard again (a safety net for rows that committed late), park
        rows that arrived behind held keys, and free waiting rows whose key has no
        held head any more (a repair; releasing a key frees them at once)."""
        self.park(cur)
        cur.execute(
            self._q(
                "UPDATE {table} o SET state = 'pending' WHERE o.state = 'waiting' {scope_o}"
                " AND NOT EXISTS (SELECT 1 FROM {table} h WHERE h.shard = o.shard"
                "  AND h.state IN ('retrying', 'dead') {scope_h}"
                "  AND h.topic = o.topic AND h.key = o.key)"
            ),
            self._params(),
        )
        cur.execute(
            self._q(
                "UPDATE {claims} SET idle_above = NULL WHERE (queue, shard) IN ("
                " SELECT queue, shard FROM {claims} WHERE queue = %s AND idle_above IS NOT NULL"
                " FOR UPDATE SKIP LOCKED)"
            ),
            (self.name,),
        )

    # -- the shard task's side ----------------------------------------------
    def renew(
        self, cur, shards: Sequence[int], token: Any, lease: float, adopt: bool = False
    ) -> list[int]:
        """Extend our claim; the shards still ours (none: a stale task). With
        ``adopt``, also claim free shards that have become ready."""
        return self.renew_round(cur, shards, token, lease, adopt)[0]

    def renew_round(
        self, cur, shards: Sequence[int], token: Any, lease: float, adopt: bool = False
    ) -> tuple[list[int], list[int]]:
        """``renew``, and which of the shards are recovering: their previous owner
        died with a batch in hand (see ``start_held``)."""
        if adopt:
            cur.execute(
                self._q(_RENEW_ADOPT),
                self._params(shards=list(shards), token=token, lease=lease),
            )
        else:
            cur.execute(
                self._q(
                    "UPDATE {claims} SET lease_until = now() + %s * interval '1s'"
                    " WHERE queue = %s AND shard = ANY(%s) AND token = %s"
                    " RETURNING shard, recovering"
                ),
                (lease, self.name, list(shards), token),
            )
        found = cur.fetchall()
        return sorted(r[0] for r in found), sorted(r[0] for r in found if r[1])

    def recovered(self, cur, shards: Sequence[int], token: Any) -> None:
        """These shards of ours are past what their dead owner may have had in hand."""
        cur.execute(
            self._q(
                "UPDATE {claims} SET recovering = false, recover_before = NULL"
                " WHERE queue = %s AND shard = ANY(%s) AND token = %s AND recovering"
            ),
            (self.name, list(shards), token),
        )

    def _fetch(
        self, cur, columns: str, shards: Sequence[int], limit: int, max_bytes: int, skip_topics=(),
        region: bool = False,
    ):  # fmt: skip
        per_shard = max(1, -(-limit // max(1, len(shards))))
        bytes_per_shard = max(1, max_bytes // max(1, len(shards)))
        cur.execute(
            self._q(_FETCH.replace("{columns}", columns).replace("{region}",
                                                                 _REGION if region else "")),
            self._params(shards=list(shards), limit=per_shard, bytes=bytes_per_shard,
                         skip=list(skip_topics)),
        )  # fmt: skip
        rows = cur.fetchall()
        counts: dict[int, int] = {}
        sizes: dict[int, int] = {}
        for r in rows:
            counts[r[-2]] = counts.get(r[-2], 0) + 1
            sizes[r[-2]] = max(sizes.get(r[-2], 0), r[-1] or 0)
        full = {
            shard for shard, n in counts.items()
            if n >= per_shard or sizes[shard] >= bytes_per_shard
        }  # fmt: skip
        return rows, full

    def fetch(
        self,
        cur,
        shards: Sequence[int],
        limit: int,
        max_bytes: int = 2**62,
        skip_topics: Sequence[str] = (),
    ) -> tuple[list[Row], set[int]]:
        """The next rows of the shards, oldest first, at most ``limit`` rows and about
        ``max_bytes`` of values, skipping keys held by a failed head and the
        ``skip_topics``; and the shards that may have more."""
        rows, full = self._fetch(cur, _OUTBOX_COLUMNS, shards, limit, max_bytes, skip_topics)
        return [_row(r[:-2]) for r in rows], full

    def fetch_ids(
        self, cur, shards: Sequence[int], limit: int, skip_topics: Sequence[str] = ()
    ) -> tuple[list[int], set[int]]:
        """Like ``fetch``, ids only; and the shards that had rows."""
        rows, _full = self._fetch(cur, "o.id", shards, limit, 2**62, skip_topics)
        return [r[0] for r in rows], {r[1] for r in rows}

    def suspects(
        self, cur, shards: Sequence[int], limit: int, skip_topics: Sequence[str] = ()
    ) -> list[int]:
        """The ids that the dead owner of these recovering shards may have had in hand:
        what ``fetch_ids`` gives, of the rows that existed at its last renewal."""
        rows, _full = self._fetch(cur, "o.id", shards, limit, 2**62, skip_topics, region=True)
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
        cur.execute(
            self._q(
                "UPDATE {claims} c SET token = NULL,"
                " lease_until = now() + %(pause)s * interval '1s',"
                # the newest row that is held back by its key: a row committed since the
                # fetch that is not held is above it, or found by ``since`` (ready_shards)
                " idle_above = CASE WHEN c.shard = ANY(%(held)s) THEN (SELECT max(o.id)"
                "   FROM {table} o WHERE o.shard = c.shard AND o.state = 'pending' {scope_o}"
                "   AND (o.topic = ANY(%(skip)s::text[]) OR EXISTS (SELECT 1 FROM {table} h"
                "    WHERE h.shard = o.shard AND h.state IN ('retrying', 'dead') {scope_h}"
                "    AND h.topic = o.topic AND h.key = o.key))) END,"
                " idle_until = CASE WHEN c.shard = ANY(%(held)s)"
                "   THEN now() + %(recheck)s * interval '1s' END"
                " WHERE queue = %(queue)s AND shard = ANY(%(shards)s) AND token = %(token)s"
            ),
            self._params(pause=pause, held=list(held), recheck=recheck,
                         shards=list(shards), token=token, skip=list(skip_topics)),
        )  # fmt: skip
        cur.execute("SELECT pg_notify(%s, 'released')", (self.channel,))

    def wake_shards(self, cur, shards: Iterable[int]) -> None:
        """Let the watcher claim these shards again (a held key was released).

        A wake-up is a row of its own, not a change to the claim: a task that
        runs on the shard now cannot overwrite it with its older view when it
        releases the shard as "all held". The next claim of the shard consumes it.
        """
        cur.execute(
            self._q(
                "INSERT INTO {wakes} (queue, shard) SELECT %s, s FROM unnest(%s::int[]) s"
                " ON CONFLICT DO NOTHING"
            ),
            (self.name, sorted(set(shards))),
        )
        cur.execute("SELECT pg_notify(%s, 'unblocked')", (self.channel,))

    # -- completing, retrying, burying ---------------------------------------
    def complete(self, cur, ids: Sequence[int]) -> None:
        if not ids:
            return
        if self.done == "delete":
            cur.execute(self._q("DELETE FROM {table} WHERE id = ANY(%s)"), (list(ids),))
        else:
            cur.execute(
                self._q(
                    "UPDATE {table} SET state = 'done', done_at = now(), claim_token = NULL"
                    " WHERE id = ANY(%s)"
                ),
                (list(ids),),
            )

    def hold(
        self, cur, failures: dict[int, str], token: Any, lease: float, count: bool = True
    ) -> None:
        """A failed attempt of these rows: they become (or stay) retrying heads owned by
        ``token``, with a lease that covers the next countdown. Rows that another token
        took over meanwhile are left alone. ``count``: the attempt is not counted yet
        (a retry's attempt is counted when it starts, by ``start_held``)."""
        if not failures:
            return
        cur.execute(
            self._q(
                "UPDATE {table} o SET state = 'retrying', attempts = o.attempts + %(count)s,"
                " last_error = f.error, failed_at = now(), claim_token = %(token)s,"
                " lease_until = now() + %(lease)s * interval '1s'"
                " FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS f(id, error)"
                " WHERE o.id = f.id AND (o.state = 'pending' OR o.claim_token = %(token)s)"
            ),
            {"token": token, "lease": lease, "ids": list(failures),
             "errors": list(failures.values()), "count": int(count)},
        )  # fmt: skip

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
        cur.execute(
            self._q(
                "UPDATE {table} SET attempts = attempts + 1,"
                " lease_until = now() + %s * interval '1s',"
                " last_error = 'attempt ' || (attempts + 1) || ' did not finish (its process"
                " died or exceeded its time limit, or its COMMIT failed)'"
                " WHERE id = ANY(%s) AND state = 'retrying' AND claim_token = %s"
                " RETURNING id, attempts"
            ),
            (lease, list(ids), token),
        )
        return sorted(cur.fetchall())

    def park(self, cur, shards: Sequence[int] | None = None) -> int:
        """Pending rows of held keys become 'waiting', out of the pending index: a
        fetch no longer walks past them. Heads being retried right now are skipped
        (SKIP LOCKED); those locked here make their release wait for this commit,
        so the release always sees, and frees, what was parked."""
        cur.execute(
            self._q(
                "WITH heads AS (SELECT h.shard, h.topic, h.key FROM {table} h"
                "  WHERE h.state IN ('retrying', 'dead') {scope_h} AND h.key IS NOT NULL"
                "  AND (%(all)s OR h.shard = ANY(%(shards)s)) FOR SHARE SKIP LOCKED)"
                " UPDATE {table} o SET state = 'waiting' FROM heads"
                " WHERE o.shard = heads.shard AND o.state = 'pending' {scope_o}"
                "  AND o.topic = heads.topic AND o.key = heads.key"
            ),
            self._params(all=shards is None, shards=list(shards or ())),
        )
        return cur.rowcount

    def unpark(self, cur, keys: Iterable[tuple[int, str, bytes | None]]) -> None:
        """These (shard, topic, key) are free again (their head was delivered, retried
        or purged): their waiting rows become pending, in their original order."""
        found = sorted({k for k in keys if k[2] is not None})
        if not found:
            return
        shards, topics, keys_ = (list(c) for c in zip(*found, strict=True))
        cur.execute(
            self._q(
                "UPDATE {table} o SET state = 'pending'"
                " FROM unnest(%(shards)s::int[], %(topics)s::text[], %(keys)s::bytea[])"
                "  AS k(shard, topic, key)"
                " WHERE o.state = 'waiting' AND o.shard = k.shard AND o.topic = k.topic"
                "  AND o.key = k.key {scope_o}"
            ),
            self._params(shards=shards, topics=topics, keys=keys_),
        )

    def fetch_held(self, cur, ids: Sequence[int], token: uuid.UUID) -> list[tuple[Row, int]]:
        """Retrying rows still owned by ``token``, locked, with their attempts and shard."""
        cur.execute(
            self._q(
                f"SELECT {_OUTBOX_COLUMNS}, o.attempts, o.shard FROM {{table}} o"
                " WHERE o.id = ANY(%s) AND o.state = 'retrying' AND o.claim_token = %s"
                " ORDER BY o.id FOR UPDATE"
            ),
            (list(ids), token),
        )
        return [(_row(r[:7]), r[7], r[8]) for r in cur.fetchall()]

    def take_held(self, cur, ids: Sequence[int], token: Any) -> list[int]:
        """Ids of retrying rows still owned by ``token``, locked, in order."""
        cur.execute(
            self._q(
                "SELECT id FROM {table} WHERE id = ANY(%s) AND state = 'retrying'"
                " AND claim_token = %s ORDER BY id FOR UPDATE"
            ),
            (list(ids), token),
        )
        return [r[0] for r in cur.fetchall()]

    def extend_held(
        self, cur, ids: Sequence[int], token: uuid.UUID, lease: float, uncount: bool = False,
        why: str | None = None,
    ) -> None:  # fmt: skip
        """Keep these held rows of ``token`` longer; ``uncount``: their attempt (counted
        when it started) did not happen after all, the topic or producer was away."""
        cur.execute(
            self._q(
                "UPDATE {table} SET lease_until = now() + %s * interval '1s',"
                " attempts = greatest(0, attempts - %s), last_error = coalesce(%s, last_error)"
                " WHERE id = ANY(%s) AND claim_token = %s"
            ),
            (lease, int(uncount), why, list(ids), token),
        )

    def bury(
        self, cur, ids: Sequence[int], token: Any, error: str | None,
        max_retries: int | None = None,
    ) -> list[DeadMessage]:  # fmt: skip
        """Retrying rows of ``token`` become dead (idempotent); returns those that did,
        for ``fire_dead`` after the commit. With ``max_retries``, only rows
        that failed more often than that."""
        cur.execute(
            self._q(
                "UPDATE {table} SET state = 'dead', dead_at = now(),"
                " last_error = coalesce(last_error, %s), claim_token = NULL"
                " WHERE id = ANY(%s) AND state = 'retrying' AND claim_token = %s"
                f" AND attempts > %s RETURNING {DEAD_COLUMNS}"
            ),
            (error, list(ids), token, -1 if max_retries is None else max_retries),
        )
        return dead_messages(self.scope or self.name, cur.fetchall())
