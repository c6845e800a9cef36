-- Conveyor's transactional outbox (docs/outbox.md). `celery -A tasks outbox migrate` runs this
-- file; every statement is idempotent, so it may run again after an upgrade. PostgreSQL 14+.

-- One row per task enqueued with tasks.outbox. A row is waiting while published_at is NULL;
-- the relay sets published_at once the broker confirmed the message, and deletes published
-- rows after the retention period.
CREATE TABLE IF NOT EXISTS conveyor_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id text NOT NULL,
    task_name text NOT NULL,
    queue text NOT NULL,
    -- JSON as Celery's json serializer wrote it (json, not jsonb: kept verbatim).
    args json NOT NULL,
    kwargs json NOT NULL,
    -- When a delayed task is due (countdown/eta at enqueue); NULL for "now".
    eta timestamptz,
    -- clock_timestamp(), not now(): now() is the transaction's start, and a long request
    -- would make its rows look older than they are.
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz
);

-- The relay's work: waiting rows of one queue in id order. Partial, so it stays as small as
-- the backlog however long published rows are kept.
CREATE INDEX IF NOT EXISTS conveyor_outbox_waiting
    ON conveyor_outbox (queue, id) WHERE published_at IS NULL;

-- Retention cleanup of published rows.
CREATE INDEX IF NOT EXISTS conveyor_outbox_published
    ON conveyor_outbox (published_at) WHERE published_at IS NOT NULL;

-- Monotonic counters for the exporter ('published:<queue>', 'failures:<queue>'): the exporter
-- is another process, and published rows are deleted after the retention period.
CREATE TABLE IF NOT EXISTS conveyor_outbox_counters (
    name text PRIMARY KEY,
    value bigint NOT NULL DEFAULT 0
);

-- Wakes the relays (LISTEN conveyor_outbox) when a transaction that inserted rows commits;
-- a rolled-back transaction sends nothing. Once per statement: a multi-row insert wakes once.
CREATE OR REPLACE FUNCTION conveyor_outbox_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('conveyor_outbox', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER conveyor_outbox_notify
    AFTER INSERT ON conveyor_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor_outbox_notify();
