-- Videos (issue 17): H.264 renditions stored as variants, the source's stream facts,
-- and the progress of a running transcode.

-- One list of variant names for every kind of media: images' thumbnail/preview/display,
-- videos' poster and renditions (360p/720p/1080p), animations' animation/gifv.
ALTER TABLE media_variants DROP CONSTRAINT media_variants_name_check;
ALTER TABLE media_variants ADD CONSTRAINT media_variants_name_check
    CHECK (name IN ('thumbnail', 'preview', 'display', 'poster', '360p', '720p', '1080p', 'animation', 'gifv'));
-- Bits per second of a rendition's whole file (video and audio); NULL for pictures.
ALTER TABLE media_variants ADD COLUMN bitrate bigint CHECK (bitrate > 0);

-- What the source video is, as probed from its container before decoding; NULL for images.
ALTER TABLE media
    ADD COLUMN duration_seconds    double precision CHECK (duration_seconds >= 0),
    ADD COLUMN frame_rate          double precision CHECK (frame_rate > 0),
    ADD COLUMN has_audio           boolean,
    ADD COLUMN source_codec        text,
    -- 0-100 while a video transcode runs; NULL when nothing runs.
    ADD COLUMN processing_progress smallint CHECK (processing_progress BETWEEN 0 AND 100);
