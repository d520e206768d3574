-- usage_events_add_partitions skipped every day whose partition's name was taken, whatever that
-- table was, so two kinds of partition left their day without one, and every insert of that day
-- failed, the insert that makes the missing partitions included:
-- - A partition detached and left in place (ALTER TABLE usage_events DETACH PARTITION, by hand):
--   a table of the name that is no partition of usage_events is now attached for its day.
--   PostgreSQL refuses it, with an error naming it, when its columns are not usage_events' or a row
--   of it lies outside the day; nothing is attached or made then. Attaching scans the table for such
--   rows (an ACCESS EXCLUSIVE lock on it, not on usage_events).
-- - A partition left half-detached by an interrupted ALTER TABLE usage_events DETACH PARTITION ...
--   CONCURRENTLY (pg_inherits.inhdetachpending: the first of its two transactions committed), which
--   takes no insert since inserts no longer route to it: the function first finishes such a detach
--   (DETACH PARTITION ... FINALIZE, which waits for the transactions older than it, as the
--   interrupted detach would have), so that the table is detached and left in place, and attached
--   again as above when its day is one it makes. At most one partition of a table can be pending detach.
-- The first fix was once a migration of its own, 0022_usage_events_attach_detached, never released:
-- a database that ran it keeps its name in schema_migrations, and this one replaces its function.
CREATE OR REPLACE FUNCTION usage_events_add_partitions(first_day date, last_day date) RETURNS integer
LANGUAGE plpgsql
SET timezone = 'UTC'
SET datestyle = 'ISO, YMD'
AS $$
DECLARE
    day date;
    partition_name text;
    pending regclass;
    added integer := 0;
BEGIN
    LOCK TABLE usage_events IN SHARE UPDATE EXCLUSIVE MODE;
    FOR pending IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'usage_events'::regclass AND inhdetachpending LOOP
        EXECUTE format('ALTER TABLE usage_events DETACH PARTITION %s FINALIZE', pending);
    END LOOP;
    FOR day IN SELECT d::date FROM generate_series(first_day, last_day, interval '1 day') AS d LOOP
        partition_name := 'usage_events_p' || to_char(day, 'YYYYMMDD');
        IF to_regclass(quote_ident(partition_name)) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', partition_name);
        ELSIF EXISTS (SELECT FROM pg_inherits WHERE inhrelid = to_regclass(quote_ident(partition_name))
                                              AND inhparent = 'usage_events'::regclass) THEN
            CONTINUE;
        END IF;
        EXECUTE format('ALTER TABLE usage_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', partition_name,
                       day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
        added := added + 1;
    END LOOP;
    RETURN added;
END
$$;
