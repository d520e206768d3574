-- usage_events_add_partitions skipped every day whose partition's name was taken, attached or not:
-- a partition detached and left in place (ALTER TABLE usage_events DETACH PARTITION, by hand)
-- kept its day without a partition, and every insert of that day failed, the insert that makes the
-- missing partitions included. A table of the name that is no partition of usage_events is now
-- attached for its day. PostgreSQL refuses it, with an error naming it, when its columns are not
-- usage_events' or a row of it lies outside the day; nothing is attached or made then. Attaching
-- scans the table for such rows (an ACCESS EXCLUSIVE lock on it, not on usage_events).
CREATE OR REPLACE FUNCTION usage_events_add_partitions(first_day date, last_day date) RETURNS integer
LANGUAGE plpgsql
SET timezone = 'UTC'
SET datestyle = 'ISO, YMD'
AS $$
DECLARE
    day date;
    partition_name text;
    added integer := 0;
BEGIN
    LOCK TABLE usage_events IN SHARE UPDATE EXCLUSIVE MODE;
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
