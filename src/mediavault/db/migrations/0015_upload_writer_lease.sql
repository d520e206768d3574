-- The writer of a resumable upload holds a lease on its upload_progress row: writer is its
-- token and lease_until when the lease lapses; both NULL when no writer holds the upload.
-- Taking, renewing and giving back the lease, and each checkpoint, are one short statement
-- each (domain/uploads/resumable.py), so no writer holds a transaction, nor a connection,
-- while a client's bytes come in. It replaces the row lock (FOR NO KEY UPDATE NOWAIT) a
-- writer held in a transaction for its whole chunk.
--
-- Nullable columns without a default are a catalog change: no rewrite, no scan. The ALTER
-- still needs ACCESS EXCLUSIVE on upload_progress, and a server still running the previous
-- release holds ROW SHARE on it for as long as it writes a chunk. Queued behind such a
-- writer, the ALTER would hold up every statement on the table, that writer's own
-- checkpoints among them (their foreign key check), and never be granted. So each try waits
-- 100 ms, far less than the runner's lock_timeout, tried every half second for about six
-- seconds while old writers come and go; past them the migration fails as lock_not_available,
-- which the runner (db/migrate.py) retries with its own backoff before it gives up.
DO $$
BEGIN
    FOR attempt IN 1..12 LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '100ms', true);
            ALTER TABLE upload_progress ADD COLUMN writer uuid, ADD COLUMN lease_until timestamptz;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.5);
        END;
    END LOOP;
    RAISE EXCEPTION 'upload_progress stayed locked by chunks being written: run the migration again'
        USING ERRCODE = 'lock_not_available';
END
$$;
