-- Formats made on request (issue 18): a variant's format that the upload's job does not make
-- (imaging/spec.py, Alternate.eager) is made the first time a client asks for it. Each entry
-- is "<variant name>:<content type>", added once by the request that asks first (that request
-- queues the job that makes it) and kept when the format comes out no smaller than the variant's
-- primary, so that it is not asked for again. Cleared by a reprocess, whose run makes new variants.
ALTER TABLE media
    ADD COLUMN requested_formats text[] NOT NULL DEFAULT '{}'
        CONSTRAINT media_requested_formats_bounded CHECK (cardinality(requested_formats) <= 16);
