-- What the cleanup jobs need: when a deleted item's blobs may go, who is purging them, and when they went.

ALTER TABLE media
    ADD COLUMN purge_after         timestamptz,
    ADD COLUMN purge_claimed_until timestamptz,
    ADD COLUMN purged_at           timestamptz,
    ADD CONSTRAINT media_purge_only_deleted CHECK (purge_after IS NULL OR deleted_at IS NOT NULL);

CREATE INDEX media_ephemeral_due ON media (expires_at)
    WHERE retention = 'ephemeral' AND deleted_at IS NULL;
CREATE INDEX media_purge_due ON media (purge_after)
    WHERE deleted_at IS NOT NULL AND purged_at IS NULL;
CREATE INDEX media_stuck ON media (updated_at)
    WHERE processing_status IN ('pending', 'processing') AND deleted_at IS NULL;
CREATE INDEX uploads_pending_oldest ON uploads (user_id, created_at) WHERE state = 'pending';
