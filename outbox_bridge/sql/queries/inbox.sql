-- The inbox side (outbox_bridge/inbox/).

-- name: batch_table
-- A polled batch on its way in (inbox.store_batch), this session's, emptied at commit;
-- made in every transaction, so that a pooler that changes sessions still finds it.
-- ``dkey``: the deliveries' key (none for a key too long to order by); ``n``: Kafka order.
CREATE TEMP TABLE IF NOT EXISTS outbox_bridge_inbox_batch (
    n int, message_id uuid, topic text, "partition" int, "offset" bigint, key bytea,
    value bytea, headers jsonb, "timestamp" timestamptz, dkey bytea, shard int,
    state text, problem text
) ON COMMIT DELETE ROWS

-- name: copy_batch
COPY pg_temp.outbox_bridge_inbox_batch FROM STDIN (FORMAT binary)

-- name: store_batch
-- The batch into the inbox (what it has already is ignored) and, for what was new, one
-- delivery per handler of the topic registered in the database now: the handlers are
-- a fact in PostgreSQL, not of the worker that consumed the message. Delivery ids in
-- Kafka order: handlers run them in id order. Returns the deliveries dead from the
-- start (handler, then the dead columns; none: one row of NULLs) and, on every row,
-- how many messages were new and how many deliveries were made.
WITH new AS (
    INSERT INTO {inbox} (message_id, topic, "partition", "offset", key, value, headers,
                         "timestamp")
    SELECT message_id, topic, "partition", "offset", key, value, headers, "timestamp"
    FROM pg_temp.outbox_bridge_inbox_batch ORDER BY n
    ON CONFLICT (topic, message_id) DO NOTHING
    RETURNING topic, message_id
), made AS (
    INSERT INTO {deliveries} (message_id, handler, topic, key, shard, state, last_error,
                              dead_at)
    SELECT b.message_id, h.name, b.topic, b.dkey, b.shard, b.state, b.problem,
           CASE WHEN b.state = 'dead' THEN now() END
    FROM new
    JOIN pg_temp.outbox_bridge_inbox_batch b ON b.topic = new.topic
                                             AND b.message_id = new.message_id
    JOIN {handlers} h ON h.topic = b.topic
    ORDER BY b.n, h.name
    ON CONFLICT (message_id, handler) DO NOTHING
    RETURNING handler, state, {dead_columns}
)
SELECT d.handler, d.id, d.message_id, d.topic, d.key, d.attempts, d.last_error,
       (SELECT count(*) FROM new), (SELECT count(*) FROM made)
FROM (SELECT 1) one LEFT JOIN made d ON d.state = 'dead'

-- name: register_handlers
INSERT INTO {handlers} (name, topic, max_retries, queue)
SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[])
ON CONFLICT (name) DO UPDATE SET topic = excluded.topic, max_retries = excluded.max_retries,
    queue = excluded.queue, seen_at = now()

-- name: served_handlers
-- the registered handlers that a connected worker serves now: its fleet connection
-- holds a shared advisory lock (schema, handler) for each (outbox_bridge/worker/election.py)
SELECT name, max_retries, queue FROM {handlers} h
WHERE EXISTS (SELECT 1 FROM pg_locks l
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid = hashtext(%(schema)s)::oid AND l.objid = hashtext(h.name)::oid)
ORDER BY name

-- name: identity
SELECT current_database(), id FROM {schema}.identity

-- name: handler_topics
SELECT DISTINCT topic FROM {handlers}

-- name: load
SELECT d.id, d.shard, d.attempts, i.message_id, i.topic, i.key, i.value, i.headers,
       i."partition", i."offset", i."timestamp"
FROM {deliveries} d JOIN {inbox} i ON i.topic = d.topic AND i.message_id = d.message_id
WHERE d.id = ANY(%(ids)s) AND (d.state = 'pending' OR NOT %(fresh)s)
ORDER BY d.id


-- name: before_handler
SAVEPOINT outbox_bridge_delivery; SET CONSTRAINTS ALL DEFERRED

-- name: after_handler
SET CONSTRAINTS ALL IMMEDIATE; RELEASE SAVEPOINT outbox_bridge_delivery
