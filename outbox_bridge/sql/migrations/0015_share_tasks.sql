-- A queue's share of the fleet's pool processes, in tasks (issue 22). A lingering
-- task whose queue has more tasks at work than that is "crowded": it gives its shards
-- back after linger_max_seconds even while a backlog lasts, so that the task of
-- another queue, waiting for a pool process behind it, gets one. 0: more busy queues
-- than pool processes; their tasks take turns.
ALTER TABLE shares ADD COLUMN IF NOT EXISTS tasks integer CHECK (tasks >= 0);
