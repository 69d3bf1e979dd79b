-- The gauges read at scrape time (outbox_bridge/contrib/metrics.py); the counts are
-- the queue's own (queue.counts, queue.oldest_pending, queue.blocked_count).

-- name: topic_pauses
SELECT topic, until > now(), pauses FROM {topic_pauses}
