-- A variant exists in several formats (AVIF, WebP, JPEG: imaging/formats.py), one row each:
-- its content type joins the key. Every row written before this has one format per name,
-- so the wider key holds them as they are.
ALTER TABLE media_variants DROP CONSTRAINT media_variants_pkey;
ALTER TABLE media_variants ADD PRIMARY KEY (media_id, name, content_type);

-- The ThumbHash placeholder (imaging/thumbhash.py) of an image or a video's poster, set
-- with the run's variants; at most 25 bytes as the format lays them out.
ALTER TABLE media ADD COLUMN thumbhash bytea CHECK (octet_length(thumbhash) BETWEEN 5 AND 25);
