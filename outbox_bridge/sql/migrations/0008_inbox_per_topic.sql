-- outbox-bridge: no-transaction
-- The inbox deduplicates per (topic, message id): a copy of a message on another
-- topic (MirrorMaker, a retry topic, a forwarding stream processor) is a message
-- of its own there, for that topic's handlers. The index is built CONCURRENTLY,
-- so the consumer goes on writing meanwhile; a build cut short leaves an invalid
-- index, which the first statement drops when the migration runs again.
DROP INDEX CONCURRENTLY IF EXISTS inbox_topic_message_id;
CREATE UNIQUE INDEX CONCURRENTLY inbox_topic_message_id ON inbox (topic, message_id);
-- a short ACCESS EXCLUSIVE lock, taken with the migration's lock_timeout
ALTER TABLE inbox DROP CONSTRAINT IF EXISTS inbox_message_id_key;
