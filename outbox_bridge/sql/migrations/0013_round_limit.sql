-- The most rows a shard's owner fetches in a round before its next renewal commits
-- (issue 20). After the owner dies, only that many of its shard's rows run one per
-- transaction, not a whole batch_size: a handler's rounds fetch what runs in their
-- one-second budget. NULL: batch_size. (No default: no table rewrite.)
ALTER TABLE claims ADD COLUMN round_limit integer;
