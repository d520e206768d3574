-- Media processing state, variants, usage telemetry and its per-item counters.

ALTER TABLE media
    ADD COLUMN width                 integer CHECK (width > 0),
    ADD COLUMN height                integer CHECK (height > 0),
    ADD COLUMN attempts              integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    ADD COLUMN processing_error      text,
    ADD COLUMN next_attempt_at       timestamptz,
    ADD COLUMN processing_started_at timestamptz,
    ADD COLUMN processed_at          timestamptz,
    -- Bumped by every reprocess: it names the job and the variant keys of one run.
    ADD COLUMN variants_version      integer NOT NULL DEFAULT 0,
    ADD COLUMN updated_at            timestamptz NOT NULL DEFAULT now();

CREATE INDEX media_unfinished ON media (processing_status, updated_at)
    WHERE processing_status IN ('pending', 'processing') AND deleted_at IS NULL;

CREATE TABLE media_variants (
    media_id     uuid NOT NULL REFERENCES media (media_id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (name IN ('thumbnail', 'preview', 'display', 'poster')),
    version      integer NOT NULL,
    object_key   text NOT NULL UNIQUE,
    content_type text NOT NULL,
    width        integer NOT NULL CHECK (width > 0),
    height       integer NOT NULL CHECK (height > 0),
    size_bytes   bigint NOT NULL CHECK (size_bytes > 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (media_id, name)
);

CREATE TABLE usage_events (
    event_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     text NOT NULL,
    media_id    uuid NOT NULL,
    event_type  text NOT NULL CHECK (event_type IN
                ('impression', 'dwell_start', 'dwell_end', 'click', 'open', 'share', 'like', 'save', 'hide', 'report')),
    surface     text NOT NULL DEFAULT '' CHECK (length(surface) <= 64),
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    meta        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX usage_events_user_timeline ON usage_events (user_id, occurred_at DESC);
CREATE INDEX usage_events_item ON usage_events (media_id, event_type);
CREATE INDEX usage_events_received ON usage_events (received_at);

-- Counts kept in step with usage_events in the same statement, so that reading a
-- feed page never has to aggregate the event log.
CREATE TABLE media_counters (
    media_id    uuid PRIMARY KEY REFERENCES media (media_id) ON DELETE CASCADE,
    view_count  bigint NOT NULL DEFAULT 0,
    like_count  bigint NOT NULL DEFAULT 0,
    share_count bigint NOT NULL DEFAULT 0
);
