-- The stuck-media sweep re-enqueues a run under a job id arq has not seen: arq keeps a
-- finished job's id for an hour and ignores a new job under it. Each re-enqueue counts
-- here, and the count is part of the job id (jobs.transcode_job_id).

ALTER TABLE media ADD COLUMN requeues integer NOT NULL DEFAULT 0;
