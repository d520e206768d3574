-- Numbers the requests for formats made on request, per media: the make_formats job id
-- carries the number (TranscodeQueue.enqueue_formats). arq keeps a finished job's id for an
-- hour and ignores a new job under it; requested_formats shrinks when a job gives up, so its
-- size could name a request a second time, this count never does. Not reset by a reprocess.
ALTER TABLE media ADD COLUMN format_requests bigint NOT NULL DEFAULT 0;
