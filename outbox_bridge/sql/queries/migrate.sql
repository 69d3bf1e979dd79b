-- The migrations' own bookkeeping (outbox_bridge/migrate.py), run as plain text
-- (Django's cursor runs them too). The DDL itself is in sql/migrations/.

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {schema}

-- name: create_migrations
CREATE TABLE IF NOT EXISTS {migrations} (version integer PRIMARY KEY,
  name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())

-- name: applied
SELECT version FROM {migrations}

-- name: record
INSERT INTO {migrations} (version, name) VALUES (%s, %s)

-- name: drop_notify_trigger
DROP TRIGGER IF EXISTS outbox_wakeup ON {outbox}

-- name: create_notify_trigger
CREATE TRIGGER outbox_wakeup AFTER INSERT ON {outbox}
FOR EACH STATEMENT EXECUTE FUNCTION {schema}.outbox_wakeup()
