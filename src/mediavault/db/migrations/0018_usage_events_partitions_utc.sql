-- usage_events_add_partitions and usage_events_drop_partitions (0011) put partition bounds
-- through text: each day's bounds written with %L and read back by ATTACH, an upper bound read
-- back out of pg_get_expr. That text follows the session's DateStyle and TimeZone: under any
-- DateStyle but ISO a timestamp prints with its zone's abbreviation, which PostgreSQL may read
-- as another zone's (China's CST as US Central, India's IST as Israel's). migrate() used to run
-- with the database's defaults, so in a database set to Asia/Shanghai and 'SQL, DMY' 0011 made
-- each day's partition 14 hours off UTC midnight: inserts found no partition until 14:00 UTC of
-- the first day, and the first day the app made itself overlapped the migration's last. Each
-- function now runs with its own settings, whoever calls it.
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
        CONTINUE WHEN to_regclass(quote_ident(partition_name)) IS NOT NULL;
        EXECUTE format('CREATE TABLE %I (LIKE usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', partition_name);
        EXECUTE format('ALTER TABLE usage_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', partition_name,
                       day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
        added := added + 1;
    END LOOP;
    RETURN added;
END
$$;

CREATE OR REPLACE FUNCTION usage_events_drop_partitions(cutoff timestamptz)
RETURNS TABLE (partition_name text, received_before timestamptz, estimated_rows bigint)
LANGUAGE plpgsql
SET timezone = 'UTC'
SET datestyle = 'ISO, YMD'
AS $$
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

-- Partitions that 0011 made off their UTC day are made again: all of them detached first (a
-- day made while its neighbour still stands off would overlap it), then the UTC days they
-- spanned made, their rows moved there, and today and the week ahead made, which the app could
-- not make past them. Elsewhere this finds no such partition and takes no lock. DETACH takes
-- ACCESS EXCLUSIVE on usage_events, so inserts wait for the move as they waited for 0011's
-- copy; nothing holds usage_events long (inserts are single statements), so the runner's
-- lock_timeout and retries are enough.
DO $$
DECLARE
    names text[];
    lowers timestamptz[];
    uppers timestamptz[];
    n integer;
BEGIN
    PERFORM set_config('timezone', 'UTC', true);
    PERFORM set_config('datestyle', 'ISO, YMD', true);
    SELECT array_agg(c.relname::text), array_agg(bound.lower), array_agg(bound.upper) INTO names, lowers, uppers
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid,
    LATERAL (SELECT m[1]::timestamptz AS lower, m[2]::timestamptz AS upper
             FROM regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\) TO \(''([^'']+)''\)') AS m) bound
    WHERE i.inhparent = 'usage_events'::regclass AND bound.upper IS NOT NULL
      AND (c.relname::text, bound.lower, bound.upper) <>
          ('usage_events_p' || to_char(bound.lower, 'YYYYMMDD'), date_trunc('day', bound.lower), date_trunc('day', bound.lower) + interval '1 day');
    IF names IS NULL THEN
        RETURN;
    END IF;
    FOR n IN 1..cardinality(names) LOOP
        EXECUTE format('ALTER TABLE usage_events DETACH PARTITION %I', names[n]);
        EXECUTE format('ALTER TABLE %I RENAME TO %I', names[n], names[n] || '_off_utc');
    END LOOP;
    FOR n IN 1..cardinality(names) LOOP
        PERFORM usage_events_add_partitions((lowers[n] AT TIME ZONE 'UTC')::date, ((uppers[n] - interval '1 microsecond') AT TIME ZONE 'UTC')::date);
        EXECUTE format('INSERT INTO usage_events (event_id, user_id, media_id, event_type, surface, occurred_at, received_at, meta)'
                       ' OVERRIDING SYSTEM VALUE'
                       ' SELECT event_id, user_id, media_id, event_type, surface, occurred_at, received_at, meta FROM %I',
                       names[n] || '_off_utc');
        EXECUTE format('DROP TABLE %I', names[n] || '_off_utc');
    END LOOP;
    PERFORM usage_events_add_partitions((now() AT TIME ZONE 'UTC')::date, (now() AT TIME ZONE 'UTC')::date + 7);
END
$$;
