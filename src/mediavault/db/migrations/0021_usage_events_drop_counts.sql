-- usage_events_drop_partitions reported greatest(reltuples, 0) as each dropped partition's rows:
-- reltuples is -1 until a table is first analysed, and autovacuum analyses a partition only once
-- more than 50 rows changed in it, so a small partition, or any where autovacuum is off, was
-- reported empty whatever it held; 0 can also be an analysis made while the day was still ahead.
-- Such a partition's rows are now counted. The counts are made before the first drop: a drop
-- holds ACCESS EXCLUSIVE on usage_events to the end of the transaction, and a count under it
-- would hold every insert.
CREATE OR REPLACE FUNCTION usage_events_drop_partitions(cutoff timestamptz)
RETURNS TABLE (partition_name text, received_before timestamptz, estimated_rows bigint)
LANGUAGE plpgsql
SET timezone = 'UTC'
SET datestyle = 'ISO, YMD'
AS $$
DECLARE
    due record;
    names text[] := '{}';
    uppers timestamptz[] := '{}';
    estimates bigint[] := '{}';
    estimate bigint;
    n integer;
BEGIN
    LOCK TABLE usage_events IN SHARE UPDATE EXCLUSIVE MODE;
    FOR due IN
        SELECT c.relname::text AS name, bound.upper, c.reltuples
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid,
        LATERAL (SELECT (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper) bound
        WHERE i.inhparent = 'usage_events'::regclass AND bound.upper <= cutoff
        ORDER BY bound.upper
    LOOP
        IF due.reltuples > 0 THEN
            estimate := due.reltuples::bigint;
        ELSE
            EXECUTE format('SELECT count(*) FROM %I', due.name) INTO estimate;
        END IF;
        names := names || due.name;
        uppers := uppers || due.upper;
        estimates := estimates || estimate;
    END LOOP;
    FOR n IN 1..cardinality(names) LOOP
        EXECUTE format('DROP TABLE %I', names[n]);
        partition_name := names[n];
        received_before := uppers[n];
        estimated_rows := estimates[n];
        RETURN NEXT;
    END LOOP;
END
$$;
