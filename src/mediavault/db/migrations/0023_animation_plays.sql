-- How many times an animated image plays through, as browsers play its source and its animated
-- WebP says (0: for ever); the gifv MP4 holds no such count, so a client playing it needs this.
-- NULL for a still, and for an animation made before: their WebPs play for ever, as 0 says.
ALTER TABLE media
    ADD COLUMN animation_plays integer CHECK (animation_plays BETWEEN 0 AND 65535),
    ADD CONSTRAINT media_plays_are_an_animations CHECK (animation_plays IS NULL OR animated);
