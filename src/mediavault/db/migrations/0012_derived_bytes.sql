-- Bytes of variants and renditions, kept as figures (issue 17), so that a reservation can
-- count them against the quota (settings.quota_counts_derived_bytes) without summing an
-- account's variants under its row lock. media.derived_bytes is the sum of the media's
-- variants, written with them; accounts.derived_bytes the sum over its media not deleted.
-- Derived bytes are not part of used_bytes nor of the ledger: they follow the uploads'
-- bytes, the ledger records what the user was granted and sent. The audit checks both
-- figures against media_variants.
ALTER TABLE media
    ADD COLUMN derived_bytes bigint NOT NULL DEFAULT 0 CONSTRAINT media_derived_nonnegative CHECK (derived_bytes >= 0);

ALTER TABLE accounts
    ADD COLUMN derived_bytes bigint NOT NULL DEFAULT 0 CONSTRAINT accounts_derived_nonnegative CHECK (derived_bytes >= 0);

UPDATE media m SET derived_bytes = v.total
FROM (SELECT media_id, sum(size_bytes)::bigint AS total FROM media_variants GROUP BY media_id) v
WHERE m.media_id = v.media_id;

UPDATE accounts a SET derived_bytes = m.total
FROM (SELECT owner_id, sum(derived_bytes)::bigint AS total FROM media WHERE deleted_at IS NULL GROUP BY owner_id) m
WHERE a.user_id = m.owner_id;
