-- The Upload-Metadata header of a tus creation, as the client sent it: HEAD echoes it (tus
-- creation: the server MUST answer it on HEAD when the upload was created with it). NULL for an
-- upload begun through BeginUpload, or created without the header.
--
-- A nullable column without a default is a catalog change: no rewrite, no scan. The ALTER needs
-- ACCESS EXCLUSIVE on upload_progress, where a writer of a release before 0015 holds ROW SHARE
-- for as long as it writes a chunk (0015 says why and how long that can be); so it is tried as
-- 0015 is, 100 ms at a time every half second, and past that fails as lock_not_available, which
-- the runner (db/migrate.py) retries with its own backoff.
DO $$
BEGIN
    FOR attempt IN 1..12 LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '100ms', true);
            ALTER TABLE upload_progress ADD COLUMN tus_metadata text;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.5);
        END;
    END LOOP;
    RAISE EXCEPTION 'upload_progress stayed locked by chunks being written: run the migration again'
        USING ERRCODE = 'lock_not_available';
END
$$;
