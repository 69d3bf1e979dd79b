-- A fleet of workers, one dispatcher per database (issue 20).

-- How many shards one task of a queue keeps at most: the elected dispatcher writes it
-- from the queue's share of the fleet's pool processes, and a lingering task gives
-- back what is over it (at its next round), so that a share that grows is used.
CREATE TABLE shares (
    queue     text    PRIMARY KEY,
    per_task  integer NOT NULL CHECK (per_task >= 1)
);

-- publish() NOTIFYs from its own INSERT now, while the dispatcher is idle and its beat
-- is fresh (30 s); the opt-in trigger, for writes that bypass publish(), does the same.
CREATE OR REPLACE FUNCTION outbox_wakeup() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    name text := TG_TABLE_SCHEMA || '.outbox';
BEGIN
    IF EXISTS (SELECT 1 FROM wakeup WHERE queue = 'outbox' AND idle
               AND seen_at > now() - interval '30 seconds') THEN
        IF octet_length(name) > 63 THEN
            name := 'ob_' || md5(name);
        END IF;
        PERFORM pg_notify(name, '');
    END IF;
    RETURN NULL;
END $$;
