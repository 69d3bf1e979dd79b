-- The inbox: one row per consumed Kafka message (unique by message id), and
-- one delivery per (message, handler), queued like the outbox's rows.

CREATE TABLE inbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      uuid        NOT NULL UNIQUE,
    topic           text        NOT NULL,
    "partition"     integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    key             bytea,
    value           bytea,
    headers         jsonb       NOT NULL DEFAULT '[]',
    "timestamp"     timestamptz,
    received_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      uuid        NOT NULL REFERENCES inbox (message_id) ON DELETE CASCADE,
    handler         text        NOT NULL,
    topic           text        NOT NULL,
    key             bytea,
    shard           smallint    NOT NULL,
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'retrying', 'dead', 'done')),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    failed_at       timestamptz,
    claim_token     uuid,
    lease_until     timestamptz,
    dead_at         timestamptz,
    done_at         timestamptz,
    UNIQUE (message_id, handler)
) WITH (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

CREATE INDEX deliveries_pending ON deliveries (handler, shard, id) WHERE state = 'pending';
CREATE INDEX deliveries_held ON deliveries (handler, shard, topic, key)
    WHERE state IN ('retrying', 'dead');
