-- The time of a video's poster frame in its smallest rendition, where the formats made on request
-- (WebP) take that same frame rather than search again from the rendition's start, which for a
-- picture that starts after its sound is not where the video job searched. NULL for images, and for
-- videos processed before: their formats search from the start, as before.
ALTER TABLE media ADD COLUMN poster_seconds double precision;
