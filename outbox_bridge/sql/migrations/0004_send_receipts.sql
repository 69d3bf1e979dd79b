-- send() writes a receipt in its own transaction. After a commit whose answer
-- was lost, the receipt says whether it committed: txid_status() alone cannot,
-- since a crash that lost the commit lets PostgreSQL hand the same transaction
-- id to a later transaction (found by the soak). Receipts older than a day are
-- deleted by the watcher.
CREATE TABLE send_receipts (
    message_id  uuid        PRIMARY KEY,
    sent_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX send_receipts_sent_at ON send_receipts (sent_at);
