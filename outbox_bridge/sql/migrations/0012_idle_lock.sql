-- An idle dispatcher holds a session advisory lock, the outbox's idle lock, instead of
-- raising a flag in the wakeup table (issue 20): publish() and the opt-in trigger try
-- it shared and NOTIFY when refused. A second relation read by every writer cost them
-- a third of their throughput; the lock costs a lock-table entry, and is gone with the
-- dispatcher's session. The wakeup table is no longer read or written.
CREATE OR REPLACE FUNCTION outbox_wakeup() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    name text := TG_TABLE_SCHEMA || '.outbox';
BEGIN
    IF octet_length(name) > 63 THEN
        name := 'ob_' || md5(name);
    END IF;
    IF NOT pg_try_advisory_xact_lock_shared(hashtext(name || ' idle')) THEN
        PERFORM pg_notify(name, '');
    END IF;
    RETURN NULL;
END $$;
