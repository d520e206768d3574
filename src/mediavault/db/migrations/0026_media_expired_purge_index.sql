-- mediavault: no-transaction
-- The expiry job retries the purges of the media it expired only (domain/cleanup.py,
-- _CLAIM_EXPIRED_PURGE): through media_purge_due alone it would read every deleted media due for
-- purge to find them, the whole backlog of purge_deleted_media at every run while that job is
-- disabled. The predicate is the query's own (media.expired_by at deleted_at), so that the planner
-- can use the index. Built concurrently, as media takes writes all along; a build cut short leaves
-- an INVALID index of this name, which the DROP takes away when the migration runs again.
DROP INDEX CONCURRENTLY IF EXISTS media_expired_purge_due;
CREATE INDEX CONCURRENTLY media_expired_purge_due ON media (purge_after)
    WHERE deleted_at IS NOT NULL AND purged_at IS NULL
      AND retention = 'ephemeral' AND saved_at IS NULL AND expires_at <= deleted_at;
