-- The outbox side (outbox_bridge/outbox/). Statements that every driver runs
-- (publish, send) use positional %s and CAST, not "::", which SQLAlchemy's
-- text() would take for a bind name.

-- name: insert
-- Values go as text, bytes and int, which every driver passes as they are;
-- headers through text, so a jsonb codec of the caller's does not apply.
INSERT INTO {outbox} (message_id, topic, key, value, headers, shard)
VALUES (CAST(%s AS uuid), %s, %s, %s, CAST(CAST(%s AS text) AS jsonb), %s)

-- name: insert_notify
-- The same for the setting wake = "notify". An idle dispatcher holds the outbox's idle
-- lock (idle_lock); the statement tries the lock shared: granted (no dispatcher idle),
-- nothing is sent and the lock is held to the commit; refused, it NOTIFYs. No trigger,
-- no second round trip, no other relation read. While busy nothing is sent: a
-- transaction that NOTIFYs commits behind one lock of the whole cluster.
INSERT INTO {outbox} (message_id, topic, key, value, headers, shard)
VALUES (CAST(%s AS uuid), %s, %s, %s, CAST(CAST(%s AS text) AS jsonb),
        CAST(%s AS smallint)
        + CASE WHEN pg_try_advisory_xact_lock_shared(hashtext({outbox_channel} || ' idle'))
               THEN 0 ELSE length(CAST(pg_notify({outbox_channel}, '') AS text)) END)

-- name: insert_scheduled
-- A delayed message (publish(..., delay=)) waits in its own table until it is due; its
-- id comes from the outbox's sequence, so a dispatcher that reads the sequence sees it.
INSERT INTO {scheduled} (message_id, topic, key, value, headers, shard, deliver_at)
VALUES (CAST(%s AS uuid), %s, %s, %s, CAST(CAST(%s AS text) AS jsonb), %s,
        CAST(CAST(%s AS text) AS timestamptz))

-- name: insert_scheduled_notify
-- the same for wake = "notify" (see insert_notify): an idle dispatcher learns of it
INSERT INTO {scheduled} (message_id, topic, key, value, headers, shard, deliver_at)
VALUES (CAST(%s AS uuid), %s, %s, %s, CAST(CAST(%s AS text) AS jsonb),
        CAST(%s AS smallint)
        + CASE WHEN pg_try_advisory_xact_lock_shared(hashtext({outbox_channel} || ' idle'))
               THEN 0 ELSE length(CAST(pg_notify({outbox_channel}, '') AS text)) END,
        CAST(CAST(%s AS text) AS timestamptz))

-- name: next_due
-- seconds until the next delayed message is due (<= 0: due now; NULL: none waits)
SELECT extract(epoch FROM min(deliver_at) - clock_timestamp())::float8 FROM {scheduled}

-- name: move_due
-- Due delayed messages join the outbox, oldest due first: new outbox ids, so each
-- takes its place in its key's order now, behind what its key has already queued.
WITH due AS (
    SELECT id FROM {scheduled} WHERE deliver_at <= clock_timestamp()
    ORDER BY deliver_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), moved AS (
    DELETE FROM {scheduled} s USING due WHERE s.id = due.id
    RETURNING s.id, s.message_id, s.topic, s.key, s.value, s.headers, s.shard, s.deliver_at
)
INSERT INTO {outbox} (message_id, topic, key, value, headers, shard)
SELECT message_id, topic, key, value, headers, shard FROM moved ORDER BY deliver_at, id

-- name: insert_receipt
INSERT INTO {send_receipts} (message_id) VALUES (%s)

-- name: receipt
SELECT 1 FROM {send_receipts} WHERE message_id = %s

-- name: topic_pauses
SELECT topic, extract(epoch FROM until - now()) FROM {topic_pauses}

-- name: pause_topics
-- each topic's pause doubles up to %(max)s, the exponent and the count capped
INSERT INTO {topic_pauses} AS p (topic, until, pauses, last_error)
SELECT t, now() + %(base)s * interval '1s', 1, e
FROM unnest(%(topics)s::text[], %(errors)s::text[]) AS x(t, e)
ON CONFLICT (topic) DO UPDATE SET pauses = least(p.pauses, %(cap)s) + 1,
  until = now() + least(%(max)s::float8,
    %(base)s::float8 * 2 ^ least(p.pauses, %(doublings)s)) * interval '1s',
  last_error = excluded.last_error
RETURNING topic, extract(epoch FROM until - now())

-- name: resume_topics
DELETE FROM {topic_pauses} WHERE topic = ANY(%(topics)s)

-- The outbox's own queue statements (outbox_bridge/outbox/__init__.py)

-- name: row_columns
-- message id as text and empty headers as NULL: less to parse per row on the hot path
o.id, o.message_id::text, o.topic, o.key, o.value, nullif(o.headers, '[]'::jsonb),
extract(epoch FROM o.created_at)::float8

-- name: fetch_held
SELECT {row_columns}, o.attempts, o.shard FROM {table} o
WHERE o.id = ANY(%(ids)s) AND o.state = 'retrying' AND o.claim_token = %(token)s
ORDER BY o.id FOR UPDATE

-- name: idle_lock
-- the dispatcher goes idle: it can take the lock only once every transaction that
-- published without a NOTIFY (holding it shared) has ended, and their rows are visible
SELECT pg_try_advisory_lock(hashtext({outbox_channel} || ' idle'))

-- name: idle_unlock
SELECT pg_advisory_unlock(hashtext({outbox_channel} || ' idle'))
