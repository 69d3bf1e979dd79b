-- Commits no longer NOTIFY by default: the statement trigger cost writers
-- 12-18% of their throughput even when it sent nothing. The watcher now finds
-- new rows by reading the outbox id sequence every few milliseconds (one cheap
-- query, no cost to writers). The function stays: a deployment that wants the
-- writer-side NOTIFY (for a slower sequence poll) creates the trigger again:
--   CREATE TRIGGER outbox_wakeup AFTER INSERT ON outbox
--       FOR EACH STATEMENT EXECUTE FUNCTION outbox_wakeup();
DROP TRIGGER IF EXISTS outbox_wakeup ON outbox;
