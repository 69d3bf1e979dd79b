-- Delayed and expiring messages (issue 21).
--
-- A delayed message (publish(..., delay=, deliver_at=)) waits in its own table, out
-- of the outbox's way, and joins the outbox when it is due (the dispatcher's timer):
-- it stands outside its key's order until then. Its id comes from the outbox's
-- sequence, so a dispatcher that reads the sequence learns of it.
CREATE TABLE scheduled (
    id          bigint      PRIMARY KEY,
    message_id  uuid        NOT NULL UNIQUE,
    topic       text        NOT NULL,
    key         bytea,
    value       bytea,
    headers     jsonb       NOT NULL DEFAULT '[]',
    shard       smallint    NOT NULL,
    deliver_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
DO $$
BEGIN
    EXECUTE format('ALTER TABLE scheduled ALTER COLUMN id SET DEFAULT nextval(%L::regclass)',
                   pg_get_serial_sequence('outbox', 'id'));
END $$;
CREATE INDEX scheduled_due ON scheduled (deliver_at, id);

-- An expired message (its expires_at passed before it was sent or handled) is dead
-- with the reason, in a state of its own: it holds no key.
ALTER TABLE outbox DROP CONSTRAINT outbox_state_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_state_check
    CHECK (state IN ('pending', 'retrying', 'dead', 'waiting', 'expired'));
CREATE INDEX outbox_expired ON outbox (id) WHERE state = 'expired';
ALTER TABLE deliveries DROP CONSTRAINT deliveries_state_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_state_check
    CHECK (state IN ('pending', 'retrying', 'dead', 'done', 'waiting', 'expired'));
CREATE INDEX deliveries_expired ON deliveries (handler, id) WHERE state = 'expired';
