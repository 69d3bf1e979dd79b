-- The inbox side (outbox_bridge/inbox/).

-- name: insert_messages
INSERT INTO {inbox} (message_id, topic, "partition", "offset", key, value, headers, "timestamp")
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::int[], %s::bigint[], %s::bytea[], %s::bytea[],
                     %s::jsonb[], %s::timestamptz[])
ON CONFLICT (topic, message_id) DO NOTHING
RETURNING topic, message_id

-- name: insert_deliveries
-- One delivery per handler of the topic registered in the database now: the
-- handlers are a fact in PostgreSQL, not of the worker that consumed the message.
INSERT INTO {deliveries} (message_id, handler, topic, key, shard, state, last_error, dead_at)
SELECT x.m, h.name, x.t, x.k, x.s, x.st, x.e, CASE WHEN x.st = 'dead' THEN now() END
FROM unnest(%s::uuid[], %s::text[], %s::bytea[], %s::int[], %s::text[], %s::text[])
     WITH ORDINALITY AS x(m, t, k, s, st, e, n)
JOIN {handlers} h ON h.topic = x.t
ORDER BY x.n, h.name  -- delivery ids in Kafka order: handlers run them in id order
ON CONFLICT (message_id, handler) DO NOTHING

-- name: insert_deliveries_returning_dead
{insert_deliveries} RETURNING handler, state, {dead_columns}

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
