-- What a shard's dead owner may have had in hand: the rows that existed at its last
-- renewal (a little after, for the fetch that followed in the same transaction).
-- Only those run one per transaction after a takeover; a backlog that arrived after
-- the owner died is fetched in batches as usual. (No default: no table rewrite.)
ALTER TABLE claims ADD COLUMN recover_before timestamptz;
