-- Accounts, the append-only ledger, uploads, purchases and the media rows finalize creates.

CREATE TABLE accounts (
    user_id        text PRIMARY KEY CHECK (length(user_id) BETWEEN 1 AND 128),
    quota_bytes    bigint NOT NULL CHECK (quota_bytes >= 0),
    used_bytes     bigint NOT NULL DEFAULT 0,
    reserved_bytes bigint NOT NULL DEFAULT 0,
    frozen         boolean NOT NULL DEFAULT false,
    frozen_reason  text,
    frozen_at      timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_reserved_nonnegative CHECK (reserved_bytes >= 0),
    CONSTRAINT accounts_used_nonnegative CHECK (used_bytes >= 0),
    CONSTRAINT accounts_within_quota CHECK (used_bytes + reserved_bytes <= quota_bytes),
    CONSTRAINT accounts_freeze_consistent CHECK (frozen = (frozen_at IS NOT NULL))
);

-- Every change of an account's quota, used or reserved bytes, as signed deltas:
-- each account's figures equal the sums of its entries (see domain.ledger.audit).
CREATE TABLE ledger_entries (
    entry_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id        text NOT NULL REFERENCES accounts (user_id),
    kind           text NOT NULL CHECK (kind IN ('grant', 'purchase', 'reserve', 'commit', 'release', 'free')),
    quota_delta    bigint NOT NULL DEFAULT 0,
    used_delta     bigint NOT NULL DEFAULT 0,
    reserved_delta bigint NOT NULL DEFAULT 0,
    upload_id      uuid,
    purchase_id    uuid,
    media_id       uuid,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_user ON ledger_entries (user_id);

CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only (% refused)', TG_OP;
END;
$$;
CREATE TRIGGER ledger_entries_no_update_delete BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only();

CREATE TABLE uploads (
    upload_id       uuid PRIMARY KEY,
    user_id         text NOT NULL REFERENCES accounts (user_id),
    filename        text NOT NULL,
    content_type    text NOT NULL,
    size_bytes      bigint NOT NULL CHECK (size_bytes > 0),
    sha256          text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    idempotency_key text,
    retention       text NOT NULL CHECK (retention IN ('permanent', 'ephemeral')),
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'finalized', 'failed', 'expired')),
    object_key      text NOT NULL UNIQUE,
    media_id        uuid,
    failure_reason  text,
    failure_detail  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    CONSTRAINT uploads_media_iff_finalized CHECK ((state = 'finalized') = (media_id IS NOT NULL))
);
CREATE UNIQUE INDEX uploads_idempotency_key ON uploads (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX uploads_pending_by_expiry ON uploads (expires_at) WHERE state = 'pending';
CREATE INDEX uploads_pending_by_user ON uploads (user_id) WHERE state = 'pending';

CREATE TABLE purchases (
    purchase_id       uuid PRIMARY KEY,
    user_id           text NOT NULL REFERENCES accounts (user_id),
    provider          text NOT NULL CHECK (provider IN ('stripe', 'solana', 'manual')),
    payment_reference text NOT NULL CHECK (length(payment_reference) BETWEEN 1 AND 256),
    credit_bytes      bigint NOT NULL CHECK (credit_bytes > 0),
    amount_minor      bigint NOT NULL CHECK (amount_minor >= 0),
    currency          text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT purchases_once_per_payment UNIQUE (provider, payment_reference)
);
CREATE INDEX purchases_by_user_newest ON purchases (user_id, created_at DESC, purchase_id DESC);

CREATE TABLE media (
    media_id          uuid PRIMARY KEY,
    owner_id          text NOT NULL REFERENCES accounts (user_id),
    upload_id         uuid NOT NULL UNIQUE REFERENCES uploads (upload_id),
    kind              text NOT NULL CHECK (kind IN ('image', 'video')),
    content_type      text NOT NULL,
    size_bytes        bigint NOT NULL CHECK (size_bytes > 0),
    sha256            text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    object_key        text NOT NULL,
    retention         text NOT NULL CHECK (retention IN ('permanent', 'ephemeral')),
    processing_status text NOT NULL DEFAULT 'pending'
                      CHECK (processing_status IN ('pending', 'processing', 'complete', 'failed')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz,
    saved_at          timestamptz,
    deleted_at        timestamptz,
    CONSTRAINT media_ephemeral_expires CHECK ((retention = 'ephemeral') = (expires_at IS NOT NULL))
);
CREATE INDEX media_feed ON media (owner_id, created_at DESC, media_id DESC) WHERE deleted_at IS NULL;
