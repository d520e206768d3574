-- RecordEvents' idempotency keys, one row per batch stored with a key: a call that the client
-- retries after an answer it could not trust (UNAVAILABLE from a draining server that had already
-- committed the insert, a connection lost before the answer) stores its events once. The row is
-- claimed in the statement that inserts the events, so the unique key decides between two calls
-- with one key, and keeps the counts the call was answered, which a repeat is answered too, and
-- the digest of the events as sent, which a repeat must match (else IDEMPOTENCY_CONFLICT).
-- prune_telemetry deletes the rows past their lifetime (domain/events.py).
CREATE TABLE usage_event_batches (
    user_id         text NOT NULL,
    idempotency_key text NOT NULL,
    accepted        integer NOT NULL,
    rejected        integer NOT NULL,
    batch_sha256    bytea NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);
CREATE INDEX usage_event_batches_recorded ON usage_event_batches (recorded_at);
