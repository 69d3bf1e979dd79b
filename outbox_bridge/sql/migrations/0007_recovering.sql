-- A shard whose last owner never gave it back (its process died, or was ended
-- by a time limit, in the middle of a batch) is handled one row per
-- transaction for a while, each attempt counted before it runs: a message that
-- kills its process becomes dead after its retries instead of looping forever.
-- (A constant default: no table rewrite; claims is a small table.)
ALTER TABLE claims ADD COLUMN recovering boolean NOT NULL DEFAULT false;
