-- The commands (outbox_bridge/ops.py): status, dead, handlers.

-- name: handler_topics
SELECT DISTINCT topic FROM {handlers}

-- name: handler_names
SELECT name FROM {handlers} ORDER BY name

-- name: dead_match
-- the dead rows a command names: by state ('dead', 'expired'), topic, key, ids (row or
-- message ids), handler; an absent filter (NULL, or no ids) matches every row
state = ANY(%(states)s::text[])
AND (%(topic)s::text IS NULL OR topic = %(topic)s)
AND (%(key)s::bytea IS NULL OR key = %(key)s)
AND (cardinality(%(ids)s::text[]) = 0 OR id::text = ANY(%(ids)s) OR message_id::text = ANY(%(ids)s))

-- name: dead_outbox
SELECT 'outbox' AS queue, id, message_id, topic, key, state, attempts, last_error, created_at,
  failed_at, dead_at
FROM {outbox} WHERE {dead_match} ORDER BY id LIMIT %(limit)s

-- name: dead_deliveries
SELECT handler AS queue, id, message_id, topic, key, state, attempts, last_error, created_at,
  failed_at, dead_at
FROM {deliveries} WHERE {dead_match} AND (%(handler)s::text IS NULL OR handler = %(handler)s)
ORDER BY id LIMIT %(limit)s

-- name: retry_outbox
-- dead rows become pending again, keeping their ids, so per-key order holds
UPDATE {outbox} SET state = 'pending', attempts = 0, claim_token = NULL, lease_until = NULL,
  dead_at = NULL
WHERE {dead_match}
RETURNING 'outbox', shard, topic, key

-- name: retry_deliveries
UPDATE {deliveries} SET state = 'pending', attempts = 0, claim_token = NULL, lease_until = NULL,
  dead_at = NULL
WHERE {dead_match} AND (%(handler)s::text IS NULL OR handler = %(handler)s)
RETURNING 'inbox:' || handler, shard, topic, key

-- name: purge_outbox
DELETE FROM {outbox} WHERE {dead_match} RETURNING 'outbox', shard, topic, key

-- name: purge_deliveries
DELETE FROM {deliveries}
WHERE {dead_match} AND (%(handler)s::text IS NULL OR handler = %(handler)s)
RETURNING 'inbox:' || handler, shard, topic, key

-- name: scheduled
-- delayed messages waiting (bounded by %(cap)s) and seconds until the next is due
SELECT (SELECT count(*) FROM (SELECT 1 FROM {scheduled} LIMIT %(cap)s) x),
  (SELECT extract(epoch FROM min(deliver_at) - now())::float8 FROM {scheduled})

-- name: handlers
SELECT h.name, h.topic, h.max_retries, h.registered_at, h.seen_at,
  (SELECT count(*) FROM {deliveries} d WHERE d.handler = h.name
   AND d.state <> 'done') AS open_deliveries
FROM {handlers} h ORDER BY h.topic, h.name

-- name: forget_deliveries
DELETE FROM {deliveries} WHERE handler = %(name)s AND state <> 'done'

-- name: forget_handler
DELETE FROM {handlers} WHERE name = %(name)s
