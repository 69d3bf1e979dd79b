-- The worker's loops (outbox_bridge/worker/).

-- name: running
-- transactions that have a transaction id now, other than the dispatcher's (it has none)
SELECT pid, backend_xid::text FROM pg_stat_activity WHERE backend_xid IS NOT NULL

-- name: still_running
SELECT pid, backend_xid::text FROM pg_stat_activity
WHERE pid = ANY(%(pids)s) AND backend_xid IS NOT NULL

-- name: sequence_of_outbox
SELECT n.nspname, c.relname FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = pg_get_serial_sequence(%(table)s, 'id')::regclass

-- name: sequence_value
-- the first id taken leaves last_value as it was and sets is_called
SELECT last_value + is_called::int FROM {sequence}

-- name: active_tasks
-- tasks at work per queue: tokens whose claims were renewed lately
SELECT queue, count(DISTINCT token) FROM {claims} WHERE token IS NOT NULL
  AND lease_until > now() + %(fresh)s * interval '1s' GROUP BY queue

-- name: prune_lock
-- one pruner at a time per schema (every worker runs one); the others skip the round
SELECT pg_try_advisory_lock(hashtext(%(name)s))

-- name: prune_lock_wait
-- the command waits for the worker's round
SELECT pg_advisory_lock(hashtext(%(name)s))

-- name: prune_unlock
SELECT pg_advisory_unlock(hashtext(%(name)s))

-- name: prune_batch
WITH batch AS (
    SELECT i.id, i.topic, i.message_id, i.received_at < now() - %(window)s * interval '1s' AS old
    FROM {inbox} i WHERE i.id > %(after)s ORDER BY i.id LIMIT %(limit)s
), doomed AS (
    SELECT n.id, n.topic, n.message_id FROM batch n
    WHERE n.old AND NOT EXISTS (SELECT 1 FROM {deliveries} d WHERE d.message_id = n.message_id
                                AND d.topic = n.topic AND d.state <> 'done')
), deliveries_gone AS (
    DELETE FROM {deliveries} d USING doomed x
    WHERE d.message_id = x.message_id AND d.topic = x.topic
), gone AS (
    DELETE FROM {inbox} i USING doomed x WHERE i.id = x.id RETURNING i.id
)
SELECT (SELECT max(id) FROM batch), (SELECT count(*) FROM gone),
       coalesce((SELECT bool_and(old) FROM batch), false)

-- name: forget_receipts
-- receipts of send(): a retry comes within seconds
DELETE FROM {send_receipts} WHERE sent_at < now() - interval '1 day'

-- name: forget_pauses
-- pause rows of topics that no relay has tried for a day (gone, or no rows left)
DELETE FROM {topic_pauses} WHERE until < now() - interval '1 day'

-- name: fleet
-- the fleet connections of this database's workers (outbox_bridge/worker/election.py)
SELECT application_name FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE %(prefix)s

-- name: dispatcher
-- the fleet connection that holds the dispatcher's lock (its one lock of one bigint key,
-- objsubid 1; the handlers' shared locks have two keys, objsubid 2)
SELECT application_name, host(client_addr) FROM pg_stat_activity a
WHERE datname = current_database() AND application_name LIKE %(prefix)s
  AND EXISTS (SELECT 1 FROM pg_locks l
              WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.objsubid = 1
                AND l.granted)

-- name: serve_handlers
-- a worker's fleet connection says which handlers its pool serves: a shared advisory
-- lock (schema, handler) each, gone with the session (inbox.served_handlers reads them)
SELECT count(pg_advisory_lock_shared(hashtext(%(schema)s), hashtext(name)))
FROM unnest(%(names)s::text[]) AS name

-- name: fleet_session
-- a wait for the dispatcher's lock ends now and then (lock_timeout: the worker hears
-- that its session is alive, and asks again); a session idle for long ends
-- (idle_session_timeout, PostgreSQL 14 on): a holder that can no longer be heard,
-- behind a flow gone silent that the server still sees open, frees the lock
SELECT set_config('lock_timeout', %(lock_ms)s, false),
       CASE WHEN current_setting('server_version_num')::int >= 140000
            THEN set_config('idle_session_timeout', %(idle_ms)s, false) END

-- name: fleet_ping
-- the holder's and the members' sign of life on the fleet session
SELECT 1

-- name: dispatcher_lock
-- waits in PostgreSQL until this session holds the dispatcher's lock
SELECT pg_advisory_lock(hashtext(%(name)s))

-- name: dispatcher_session
-- The dispatcher's commits are claims and flags: one lost in a crash of PostgreSQL
-- leaves a shard free again (its task's renewal then finds it stale and changes
-- nothing) or a flag rewritten at the next look. Not waiting for the WAL flush
-- takes a disk flush off the path of every first row after a quiet spell.
SET synchronous_commit = off
