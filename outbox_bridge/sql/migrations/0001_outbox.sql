-- The outbox, the claims that give one task a shard at a time, and the
-- wake-up flag. Runs with search_path set to the outbox-bridge schema.

CREATE TABLE outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      uuid        NOT NULL UNIQUE,
    topic           text        NOT NULL,
    key             bytea,
    value           bytea,
    headers         jsonb       NOT NULL DEFAULT '[]',
    shard           smallint    NOT NULL,
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'retrying', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    failed_at       timestamptz,
    -- a retrying row is owned by one retry task through this token until the lease ends
    claim_token     uuid,
    lease_until     timestamptz,
    dead_at         timestamptz
) WITH (
    -- a hot queue: rows are inserted and deleted all the time
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- the claim query: oldest pending rows of one shard
CREATE INDEX outbox_pending ON outbox (shard, id) WHERE state = 'pending';
-- the few rows that hold their key back (retrying or dead heads)
CREATE INDEX outbox_held ON outbox (shard, topic, key) WHERE state IN ('retrying', 'dead');

-- One row per (queue, shard): who owns the shard, until when.
CREATE TABLE claims (
    queue        text        NOT NULL,
    shard        integer     NOT NULL,
    token        uuid,
    lease_until  timestamptz NOT NULL DEFAULT '-infinity',
    -- consecutive rounds that could not reach Kafka (the circuit breaker)
    pauses       integer     NOT NULL DEFAULT 0,
    -- every pending row up to this id is held back by its key: skip the shard
    -- until a newer row arrives or a held key is released
    idle_above   bigint,
    PRIMARY KEY (queue, shard)
);

-- NOTIFY takes a global lock at commit, so commits only send it when it is
-- needed: while a watcher is alive (seen_at, its heartbeat) and idle. While
-- it is dispatching work, it finds new rows without being told.
CREATE TABLE wakeup (
    queue    text        PRIMARY KEY,
    idle     boolean     NOT NULL DEFAULT true,
    seen_at  timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO wakeup (queue, idle) VALUES ('outbox', true);

CREATE FUNCTION outbox_wakeup() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM wakeup WHERE queue = 'outbox' AND idle
               AND seen_at > now() - interval '10 seconds') THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_wakeup AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_wakeup();
