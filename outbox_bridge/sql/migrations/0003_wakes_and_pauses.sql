-- Faults stay local: wake-ups that a running task cannot overwrite, the
-- handlers known to the database, and a circuit breaker per Kafka topic.

-- A held key was released on this shard: claim it again, whatever its claim
-- row says. The next claim of the shard consumes the row.
CREATE TABLE wakes (
    queue  text    NOT NULL,
    shard  integer NOT NULL,
    PRIMARY KEY (queue, shard)
);

-- A shard released as "all held" by paused topics is looked at again then.
ALTER TABLE claims ADD COLUMN idle_until timestamptz;
-- The circuit breaker is per topic now (topic_pauses), not per shard group.
ALTER TABLE claims DROP COLUMN pauses;

-- A topic that cannot take messages now (unknown, no leader, not authorized,
-- timing out): the relay skips its rows until the pause ends. Other topics go on.
CREATE TABLE topic_pauses (
    topic       text        PRIMARY KEY,
    until       timestamptz NOT NULL,
    pauses      integer     NOT NULL DEFAULT 1,
    last_error  text
);

-- NOTIFY channel names are cut at 63 bytes: a long schema name gets a hashed
-- channel (the same as outbox_bridge.db.channel), so two schemas never share one.
CREATE OR REPLACE FUNCTION outbox_wakeup() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    name text := TG_TABLE_SCHEMA || '.outbox';
BEGIN
    IF EXISTS (SELECT 1 FROM wakeup WHERE queue = 'outbox' AND idle
               AND seen_at > now() - interval '10 seconds') THEN
        IF octet_length(name) > 63 THEN
            name := 'ob_' || md5(name);
        END IF;
        PERFORM pg_notify(name, '');
    END IF;
    RETURN NULL;
END $$;

-- The handlers known to this database, registered by each worker at start.
-- Deliveries are made from this table when a message is stored, whichever
-- worker consumed it: a message gets one delivery per handler of its topic
-- registered at that moment.
CREATE TABLE handlers (
    name           text        PRIMARY KEY,
    topic          text        NOT NULL,
    max_retries    integer,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    seen_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX handlers_topic ON handlers (topic);

-- Who this inbox is: the default Kafka consumer group is derived from it, so
-- two applications (two databases) never share a group by accident.
CREATE TABLE identity (
    one  boolean PRIMARY KEY DEFAULT true CHECK (one),
    id   uuid    NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO identity DEFAULT VALUES;

-- Rows behind a held key (a retrying or dead head) are parked as 'waiting',
-- out of the pending index, so a fetch does not walk them again and again.
-- They become pending again when their key is released.
ALTER TABLE outbox DROP CONSTRAINT outbox_state_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_state_check
    CHECK (state IN ('pending', 'retrying', 'dead', 'waiting'));
CREATE INDEX outbox_waiting ON outbox (shard, topic, key, id) WHERE state = 'waiting';
ALTER TABLE deliveries DROP CONSTRAINT deliveries_state_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_state_check
    CHECK (state IN ('pending', 'retrying', 'dead', 'done', 'waiting'));
CREATE INDEX deliveries_waiting ON deliveries (handler, shard, topic, key, id)
    WHERE state = 'waiting';
