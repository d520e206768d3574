-- usage_events partitioned by day (UTC) of received_at, the time retention prunes by: a
-- day past retention goes as one DROP TABLE instead of millions of row deletions. An
-- event's partition is the day the server stored it, whatever occurred_at says, so a
-- client's clock can never send an event outside the partitions made ahead.
--
-- The existing rows are copied into their days' partitions within this migration's
-- transaction, which holds usage_events for as long as the copy takes.

ALTER TABLE usage_events RENAME TO usage_events_unpartitioned;
ALTER INDEX usage_events_pkey RENAME TO usage_events_unpartitioned_pkey;
ALTER INDEX usage_events_user_timeline RENAME TO usage_events_unpartitioned_user_timeline;
ALTER INDEX usage_events_item RENAME TO usage_events_unpartitioned_item;
ALTER INDEX usage_events_received RENAME TO usage_events_unpartitioned_received;
ALTER SEQUENCE usage_events_event_id_seq RENAME TO usage_events_unpartitioned_event_id_seq;

-- A partitioned table's primary key must hold the partition key. No DEFAULT partition: a
-- row with no day to go to fails (and the insert makes the day, see domain/events.py)
-- rather than landing where no partition drop would ever reach it.
CREATE TABLE usage_events (
    event_id    bigint GENERATED ALWAYS AS IDENTITY,
    user_id     text NOT NULL,
    media_id    uuid NOT NULL,
    event_type  text NOT NULL CHECK (event_type IN
                ('impression', 'dwell_start', 'dwell_end', 'click', 'open', 'share', 'like', 'save', 'hide', 'report')),
    surface     text NOT NULL DEFAULT '' CHECK (length(surface) <= 64),
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    meta        jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (event_id, received_at)
) PARTITION BY RANGE (received_at);
CREATE INDEX usage_events_user_timeline ON usage_events (user_id, occurred_at DESC);
CREATE INDEX usage_events_item ON usage_events (media_id, event_type);

-- Makes the partitions of the UTC days first_day..last_day that do not exist yet; returns
-- how many it made. Every caller (the migration, the prune_telemetry job on every worker,
-- an insert that found no partition) may run it at once: the SHARE UPDATE EXCLUSIVE lock,
-- which conflicts with itself but not with inserts, makes them take turns, so each sees
-- the others' partitions and none fails on a duplicate. The lock ends with the transaction.
-- Each partition is made apart and attached (SHARE UPDATE EXCLUSIVE) rather than made with
-- CREATE TABLE ... PARTITION OF, which would take ACCESS EXCLUSIVE and stop the inserts.
CREATE FUNCTION usage_events_add_partitions(first_day date, last_day date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day date;
    partition_name text;
    added integer := 0;
BEGIN
    LOCK TABLE usage_events IN SHARE UPDATE EXCLUSIVE MODE;
    FOR day IN SELECT d::date FROM generate_series(first_day, last_day, interval '1 day') AS d LOOP
        partition_name := 'usage_events_p' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(quote_ident(partition_name)) IS NOT NULL;
        EXECUTE format('CREATE TABLE %I (LIKE usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', partition_name);
        EXECUTE format('ALTER TABLE usage_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', partition_name,
                       day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
        added := added + 1;
    END LOOP;
    RETURN added;
END
$$;

-- Drops the partitions whose every row was received before cutoff, oldest first, and
-- returns them with their upper bound and planner's row estimate. A partition that holds
-- the cutoff stays whole until its day is entirely past: no event younger than the
-- retention is ever dropped. Dropping a partition takes ACCESS EXCLUSIVE on usage_events
-- for the moment of the catalog change; the caller bounds the wait with lock_timeout.
CREATE FUNCTION usage_events_drop_partitions(cutoff timestamptz)
RETURNS TABLE (partition_name text, received_before timestamptz, estimated_rows bigint)
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE usage_events IN SHARE UPDATE EXCLUSIVE MODE;
    FOR partition_name, received_before, estimated_rows IN
        SELECT c.relname::text, bound.upper, greatest(c.reltuples, 0)::bigint
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid,
        LATERAL (SELECT (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper) bound
        WHERE i.inhparent = 'usage_events'::regclass AND bound.upper <= cutoff
        ORDER BY bound.upper
    LOOP
        EXECUTE format('DROP TABLE %I', partition_name);
        RETURN NEXT;
    END LOOP;
END
$$;

-- The days of the existing rows, today, and the week ahead.
SELECT usage_events_add_partitions(day, day)
FROM (SELECT DISTINCT (received_at AT TIME ZONE 'UTC')::date AS day FROM usage_events_unpartitioned) AS days;
SELECT usage_events_add_partitions((now() AT TIME ZONE 'UTC')::date, (now() AT TIME ZONE 'UTC')::date + 7);

INSERT INTO usage_events (event_id, user_id, media_id, event_type, surface, occurred_at, received_at, meta)
OVERRIDING SYSTEM VALUE
SELECT event_id, user_id, media_id, event_type, surface, occurred_at, received_at, meta FROM usage_events_unpartitioned;
SELECT setval(pg_get_serial_sequence('usage_events', 'event_id'), max(event_id)) FROM usage_events_unpartitioned HAVING count(*) > 0;

DROP TABLE usage_events_unpartitioned;
