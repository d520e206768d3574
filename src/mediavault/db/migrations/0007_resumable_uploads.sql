-- Resumable uploads (tus 1.0.0, UploadContent streams that continue one, and S3 multipart parts
-- sent straight to S3): the protocol an upload was begun with, and the progress any replica can
-- resume from.

ALTER TABLE uploads ADD COLUMN protocol text NOT NULL DEFAULT 'single'
    CONSTRAINT uploads_protocol_known CHECK (protocol IN ('single', 'tus', 's3_multipart'));

-- One row per resumable upload: the row a writer locks (FOR NO KEY UPDATE NOWAIT) for as long
-- as it appends a chunk, so that of two writers on any two replicas exactly one proceeds.
-- multipart_id is the S3 multipart upload its parts go to (NULL on the fs backend).
CREATE TABLE upload_progress (
    upload_id    uuid PRIMARY KEY REFERENCES uploads (upload_id),
    multipart_id text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The last durable point of a resumable upload, written by the lock holder on a connection of
-- its own (so it commits while the lock is held): received_bytes are stored for good (fs:
-- fsynced; S3: completed parts plus a tail object of tail_bytes), sha256_state is the hash
-- over exactly those bytes, head their first bytes (for the magic-byte check at finalize),
-- parts the ETags of the completed S3 parts in order.
CREATE TABLE upload_checkpoints (
    upload_id      uuid PRIMARY KEY REFERENCES upload_progress (upload_id),
    received_bytes bigint NOT NULL CHECK (received_bytes > 0),
    sha256_state   bytea NOT NULL,
    head           bytea NOT NULL,
    parts          text[] NOT NULL DEFAULT '{}',
    tail_bytes     bigint NOT NULL DEFAULT 0 CHECK (tail_bytes >= 0 AND tail_bytes <= received_bytes),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
