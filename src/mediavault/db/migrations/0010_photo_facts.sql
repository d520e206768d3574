-- Photo metadata kept as data (issue 18): when and with what a photo was taken, from its
-- EXIF, which the variants never carry (GPS is never stored); and whether it moves.
ALTER TABLE media
    -- The camera's wall clock (EXIF DateTimeOriginal), in whatever zone the camera was set to.
    ADD COLUMN taken_at                    timestamp,
    -- The offset from UTC the camera recorded beside it (OffsetTimeOriginal); NULL when none.
    ADD COLUMN taken_at_utc_offset_minutes smallint CHECK (taken_at_utc_offset_minutes BETWEEN -840 AND 840),
    -- "Make Model"; NULL when the photo names no camera.
    ADD COLUMN camera                      text CHECK (length(camera) BETWEEN 1 AND 100),
    ADD CONSTRAINT media_offset_needs_taken_at CHECK (taken_at_utc_offset_minutes IS NULL OR taken_at IS NOT NULL),
    -- An animated GIF, WebP or PNG within the animation limits (its first frame makes the stills).
    ADD COLUMN animated                    boolean NOT NULL DEFAULT false,
    -- One loop of the animation; NULL when not animated.
    ADD COLUMN animation_duration_ms       integer CHECK (animation_duration_ms > 0),
    ADD CONSTRAINT media_animated_has_duration CHECK (animated = (animation_duration_ms IS NOT NULL));
