-- The durable queue (outbox_bridge/queue.py). {table} is the queue's table,
-- {scope_X} "AND X.handler = %(scope)s" for an inbox handler's queue, else nothing.

-- name: nothing

-- name: scope_o
AND o.handler = %(scope)s

-- name: scope_h
AND h.handler = %(scope)s

-- name: scope_t
AND t.handler = %(scope)s

-- name: size
coalesce(octet_length(l.{size_column}), 0)

-- name: zero
0

-- name: id_column
o.id

-- name: fetch
-- The oldest pending rows of each claimed shard whose key has no held
-- (retrying/dead) head; each shard contributes at most %(limit)s rows and,
-- past its first row, at most %(bytes)s bytes of values. ``upto``: the bytes up
-- to and including the row (octet_length reads no TOASTed value).
{plan}
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

-- name: in_memory
-- For this transaction: random heap reads cost little. With the default (4, for
-- spinning disks) and a table of pending rows, PostgreSQL reads a shard's rows by
-- walking the primary key of every shard and filtering: 16 rows visited per row
-- returned (issue 22: 13 ms against 5 ms per fetch of 2,000 rows).
SET LOCAL random_page_cost = 1.1;

-- name: region
-- The rows a dead owner may have had in hand: a prefix in id order of its shard, up to
-- the newest pending row that existed at its last renewal (NULL: a redelivered task's,
-- unknown: all). A prefix by id, not a filter by time, so that a key's rows never
-- split around it (ids and commit times of concurrent transactions disagree).
AND o.id <= coalesce((
    SELECT CASE WHEN r.recover_before IS NULL THEN 9223372036854775807
        ELSE coalesce((SELECT max(t.id) FROM {table} t
                       WHERE t.shard = s.shard AND t.state = 'pending' {scope_t}
                         AND t.created_at <= r.recover_before), 0) END
    FROM {claims} r WHERE r.queue = %(queue)s AND r.shard = s.shard), 9223372036854775807)

-- name: recover_before
-- when the dead owner last renewed its lease (the same lease assumed), plus the moments
-- its fetch may have come after that in the same transaction
c.lease_until - %(lease)s * interval '1s' + interval '2s'

-- name: ready_shards
-- Shards with pending rows (a loose index scan, one probe per shard), less
-- those whose pending rows are all held back by their keys.
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

-- name: claim
-- Free shards are claimed in up to %(groups)s groups, one token per group, at most
-- %(most)s shards in all (the rest stay free: lingering tasks may take them on).
WITH free AS (
    SELECT queue, shard FROM {claims}
    WHERE queue = %(queue)s AND shard = ANY(%(shards)s) AND lease_until < now()
    ORDER BY shard
    FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT queue, shard, row_number() OVER (ORDER BY shard) AS n FROM free
), claimed AS (
    UPDATE {claims} c SET token = (%(tokens)s::uuid[])[(n.n - 1) %% %(groups)s + 1],
        lease_until = now() + %(lease)s * interval '1s', idle_above = NULL, idle_until = NULL,
        -- a token left behind: its task never gave the shard back (died mid-batch)
        recovering = c.recovering OR c.token IS NOT NULL,
        recover_before = CASE WHEN c.token IS NULL THEN c.recover_before
            ELSE greatest(c.recover_before, {recover_before}) END
    FROM numbered n
    WHERE c.queue = n.queue AND c.shard = n.shard AND n.n <= %(most)s
    RETURNING c.shard, c.token
), woken AS (
    -- the new owner fetches after this commit, so it sees what the wake-up announced
    DELETE FROM {wakes} w USING claimed WHERE w.queue = %(queue)s AND w.shard = claimed.shard
)
SELECT shard, token FROM claimed

-- name: renew_adopt
-- A lingering task keeps its shards (renews their lease) and takes on free shards
-- that have become ready, as the dispatcher would claim them (same rules as
-- ready_shards), so a busy period needs no new task per shard. It keeps at most its
-- queue's share (shares.per_task) and gives the rest back, free at once: when the
-- queue's share of the fleet grows, the dispatcher sends more tasks for them.
WITH cap AS (
    SELECT coalesce((SELECT s.per_task FROM {shares} s WHERE s.queue = %(queue)s),
                    2147483647) AS n
), kept AS (
    SELECT c.shard FROM {claims} c
    WHERE c.queue = %(queue)s AND c.shard = ANY(%(shards)s) AND c.token = %(token)s
    ORDER BY c.shard LIMIT (SELECT n FROM cap)
), surplus AS (
    UPDATE {claims} c SET token = NULL, lease_until = '-infinity'
    WHERE c.queue = %(queue)s AND c.shard = ANY(%(shards)s) AND c.token = %(token)s
      AND c.shard NOT IN (SELECT shard FROM kept)
    RETURNING c.shard
), free AS (
    SELECT c.queue, c.shard FROM {claims} c
    WHERE c.queue = %(queue)s AND c.lease_until < now()
      AND EXISTS (SELECT 1 FROM {table} o WHERE o.shard = c.shard AND o.state = 'pending' {scope_o})
      AND (c.idle_above IS NULL OR c.idle_until < now()
           OR EXISTS (SELECT 1 FROM {wakes} w WHERE w.queue = %(queue)s AND w.shard = c.shard)
           OR EXISTS (SELECT 1 FROM {table} o WHERE o.shard = c.shard AND o.state = 'pending'
                      {scope_o} AND o.id > c.idle_above))
    ORDER BY c.shard
    LIMIT greatest(0, (SELECT n FROM cap) - (SELECT count(*) FROM kept))
    FOR UPDATE SKIP LOCKED
), mine AS (
    UPDATE {claims} c SET token = %(token)s, lease_until = now() + %(lease)s * interval '1s',
        idle_above = NULL, idle_until = NULL,
        round_limit = {round_limit},
        recovering = c.recovering OR coalesce(c.token <> %(token)s, false),
        recover_before = CASE WHEN coalesce(c.token <> %(token)s, false)
            THEN greatest(c.recover_before, {recover_before}) ELSE c.recover_before END
    WHERE c.queue = %(queue)s
      AND (c.shard IN (SELECT shard FROM kept) OR c.shard IN (SELECT shard FROM free))
    RETURNING c.shard, c.recovering, c.round_limit
), woken AS (
    DELETE FROM {wakes} w USING free WHERE w.queue = %(queue)s AND w.shard = free.shard
)
SELECT shard, recovering, (SELECT count(*) FROM surplus), round_limit, {crowded} FROM mine

-- name: renew
UPDATE {claims} c SET lease_until = now() + %(lease)s * interval '1s', round_limit = {round_limit}
WHERE queue = %(queue)s AND shard = ANY(%(shards)s) AND token = %(token)s
RETURNING shard, recovering, 0, round_limit, {crowded}

-- name: round_limit
-- what this round's renewal records (%(limit)s NULL: keep): not over a recovering
-- shard's, which bounds what its dead owner may have had in hand until it is recovered
CASE WHEN c.recovering OR coalesce(c.token <> %(token)s, false) THEN c.round_limit
     ELSE coalesce(%(limit)s::int, c.round_limit) END

-- name: crowded
-- more tasks of the queue at work (renewed in the last 2 s) than its share in tasks
(SELECT count(DISTINCT t.token) FROM {claims} t
 WHERE t.queue = %(queue)s AND t.token IS NOT NULL
   AND t.lease_until > now() + (%(lease)s - 2) * interval '1s')
> coalesce((SELECT s.tasks FROM {shares} s WHERE s.queue = %(queue)s), 2147483647)

-- name: set_share
-- the most shards one task of the queue keeps (renew_adopt), and its share of the
-- fleet's pool processes in tasks (crowded), as the dispatcher sees them
INSERT INTO {shares} AS s (queue, per_task, tasks)
VALUES (%(queue)s, %(per_task)s, %(tasks)s)
ON CONFLICT (queue) DO UPDATE SET per_task = excluded.per_task, tasks = excluded.tasks
WHERE s.per_task <> excluded.per_task OR s.tasks IS DISTINCT FROM excluded.tasks

-- name: add_claims
-- NOT EXISTS first: a task's open transaction has a new version of its claim
-- row, and ON CONFLICT alone would wait for that transaction
INSERT INTO {claims} (queue, shard) SELECT %(queue)s, s FROM unnest(%(shards)s::int[]) s
WHERE NOT EXISTS (SELECT 1 FROM {claims} c WHERE c.queue = %(queue)s AND c.shard = s)
ON CONFLICT DO NOTHING

-- name: expired_retries
UPDATE {table} SET claim_token = gen_random_uuid(), lease_until = now() + %(lease)s * interval '1s'
WHERE id IN (SELECT o.id FROM {table} o WHERE o.state = 'retrying' {scope_o}
             AND o.lease_until < now() ORDER BY o.id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id, claim_token, attempts

-- name: free_waiting
-- waiting rows whose key has no held head any more become pending (a repair)
UPDATE {table} o SET state = 'pending' WHERE o.state = 'waiting' {scope_o}
  AND NOT EXISTS (SELECT 1 FROM {table} h WHERE h.shard = o.shard
                  AND h.state IN ('retrying', 'dead') {scope_h}
                  AND h.topic = o.topic AND h.key = o.key)

-- name: look_again
-- every shard released as "all held" is looked at again
UPDATE {claims} SET idle_above = NULL WHERE (queue, shard) IN (
  SELECT queue, shard FROM {claims} WHERE queue = %(queue)s AND idle_above IS NOT NULL
  FOR UPDATE SKIP LOCKED)

-- name: recovered
-- (a redelivered task's suspect shards were not flagged: only their limit is ours now)
UPDATE {claims} SET recovering = false, recover_before = NULL,
    round_limit = coalesce(%(limit)s::int, round_limit)
WHERE queue = %(queue)s AND shard = ANY(%(shards)s) AND token = %(token)s
  AND (recovering OR round_limit IS DISTINCT FROM coalesce(%(limit)s::int, round_limit))

-- name: still_recovering
-- (a redelivered task's suspect shards were not flagged: their region is all, as then)
UPDATE {claims} SET recovering = true
WHERE queue = %(queue)s AND shard = ANY(%(shards)s) AND token = %(token)s

-- name: release
UPDATE {claims} c SET token = NULL,
  lease_until = now() + %(pause)s * interval '1s',
  -- the newest row that is held back by its key: a row committed since the
  -- fetch that is not held is above it, or found by ``since`` (ready_shards)
  idle_above = CASE WHEN c.shard = ANY(%(held)s) THEN (SELECT max(o.id)
    FROM {table} o WHERE o.shard = c.shard AND o.state = 'pending' {scope_o}
    AND (o.topic = ANY(%(skip)s::text[]) OR EXISTS (SELECT 1 FROM {table} h
     WHERE h.shard = o.shard AND h.state IN ('retrying', 'dead') {scope_h}
     AND h.topic = o.topic AND h.key = o.key))) END,
  idle_until = CASE WHEN c.shard = ANY(%(held)s) THEN now() + %(recheck)s * interval '1s' END
WHERE queue = %(queue)s AND shard = ANY(%(shards)s) AND token = %(token)s

-- name: notify
SELECT pg_notify(%(channel)s, %(why)s)

-- name: wake_shards
INSERT INTO {wakes} (queue, shard) SELECT %(queue)s, s FROM unnest(%(shards)s::int[]) s
ON CONFLICT DO NOTHING

-- name: delete
DELETE FROM {table} WHERE id = ANY(%(ids)s)

-- name: mark_done
UPDATE {table} SET state = 'done', done_at = now(), claim_token = NULL WHERE id = ANY(%(ids)s)

-- name: hold
UPDATE {table} o SET state = 'retrying', attempts = o.attempts + %(count)s,
  last_error = f.error, failed_at = now(), claim_token = %(token)s,
  lease_until = now() + %(lease)s * interval '1s'
FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS f(id, error)
WHERE o.id = f.id AND (o.state = 'pending' OR o.claim_token = %(token)s)

-- name: start_held
UPDATE {table} SET attempts = attempts + 1, lease_until = now() + %(lease)s * interval '1s',
  last_error = 'attempt ' || (attempts + 1) || ' did not finish (its process'
    ' died or exceeded its time limit, or its COMMIT failed)'
WHERE id = ANY(%(ids)s) AND state = 'retrying' AND claim_token = %(token)s
RETURNING id, attempts

-- name: park
WITH heads AS (SELECT h.shard, h.topic, h.key FROM {table} h
  WHERE h.state IN ('retrying', 'dead') {scope_h} AND h.key IS NOT NULL
  AND (%(all)s OR h.shard = ANY(%(shards)s)) FOR SHARE SKIP LOCKED)
UPDATE {table} o SET state = 'waiting' FROM heads
WHERE o.shard = heads.shard AND o.state = 'pending' {scope_o}
  AND o.topic = heads.topic AND o.key = heads.key

-- name: unpark
UPDATE {table} o SET state = 'pending'
FROM unnest(%(shards)s::int[], %(topics)s::text[], %(keys)s::bytea[]) AS k(shard, topic, key)
WHERE o.state = 'waiting' AND o.shard = k.shard AND o.topic = k.topic AND o.key = k.key {scope_o}

-- name: take_held
SELECT id FROM {table} WHERE id = ANY(%(ids)s) AND state = 'retrying'
  AND claim_token = %(token)s ORDER BY id FOR UPDATE

-- name: extend_held
UPDATE {table} SET lease_until = now() + %(lease)s * interval '1s',
  attempts = greatest(0, attempts - %(uncount)s), last_error = coalesce(%(why)s, last_error)
WHERE id = ANY(%(ids)s) AND claim_token = %(token)s

-- name: bury
UPDATE {table} SET state = 'dead', dead_at = now(),
  last_error = coalesce(last_error, %(error)s), claim_token = NULL
WHERE id = ANY(%(ids)s) AND state = 'retrying' AND claim_token = %(token)s
  AND attempts > %(max_retries)s
RETURNING {dead_columns}

-- name: expire
-- messages whose expiry passed before they were sent: dead, with the reason, in a state
-- of their own that holds no key (their key's later messages go on)
UPDATE {table} SET state = 'expired', dead_at = now(), claim_token = NULL,
  last_error = 'expired'
WHERE id = ANY(%(ids)s) AND state IN ('pending', 'retrying', 'waiting')
RETURNING {dead_columns}

-- name: dead_columns
-- the columns of a row that became dead, in DeadMessage's order after queue
id, message_id, topic, key, attempts, last_error

-- name: counts
-- rows per state, each count bounded by %(cap)s (NULL: exact); one literal state per
-- count, so that each uses that state's partial index
SELECT 'pending', count(*) FROM (SELECT 1 FROM {table} o WHERE o.state = 'pending' {scope_o}
                                 LIMIT %(cap)s) x
UNION ALL
SELECT 'waiting', count(*) FROM (SELECT 1 FROM {table} o WHERE o.state = 'waiting' {scope_o}
                                 LIMIT %(cap)s) x
UNION ALL
SELECT 'retrying', count(*) FROM (SELECT 1 FROM {table} o WHERE o.state = 'retrying' {scope_o}
                                  LIMIT %(cap)s) x
UNION ALL
SELECT 'dead', count(*) FROM (SELECT 1 FROM {table} o WHERE o.state = 'dead' {scope_o}
                              LIMIT %(cap)s) x
UNION ALL
SELECT 'expired', count(*) FROM (SELECT 1 FROM {table} o WHERE o.state = 'expired' {scope_o}
                                 LIMIT %(cap)s) x

-- name: done_count
SELECT count(*) FROM {table} o WHERE o.state = 'done' {scope_o}

-- name: oldest_pending
-- seconds since the oldest pending row was written: the head of each shard
SELECT extract(epoch FROM now() - min(x.created_at))
FROM generate_series(0, %(shards)s - 1) s(shard)
CROSS JOIN LATERAL (SELECT o.created_at FROM {table} o
                    WHERE o.shard = s.shard AND o.state = 'pending' {scope_o}
                    ORDER BY o.id LIMIT 1) x

-- name: blocked_count
-- keys held back by a retrying or dead head (bounded by %(cap)s)
SELECT count(*) FROM (SELECT 1 FROM {table} o WHERE o.state IN ('retrying', 'dead') {scope_o}
                      AND o.key IS NOT NULL LIMIT %(cap)s) x

-- name: blocked_keys
-- the first 100 held heads, with the rows waiting behind each
SELECT o.topic, o.key, o.state, o.attempts, o.last_error,
  (SELECT count(*) FROM {table} w WHERE w.shard = o.shard AND w.topic = o.topic
   AND w.key = o.key AND w.state IN ('pending', 'waiting') {scope_w})
FROM {table} o WHERE o.state IN ('retrying', 'dead') {scope_o} AND o.key IS NOT NULL
ORDER BY o.id LIMIT 100

-- name: scope_w
AND w.handler = %(scope)s

-- name: keys_of
SELECT id, topic, key FROM {table} WHERE id = ANY(%(ids)s)
