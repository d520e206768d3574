"""The row side of the cleanup jobs: one bounded batch per call, on a connection the caller
holds in a transaction.

Every batch picks its rows with FOR UPDATE SKIP LOCKED, so replicas running the same job
at once split the rows between them, and a row a user request holds (a finalize, a save)
is left for the next run instead of waited on. Batches that change accounts take a Lane:
the loops of one run each work on their own share of the accounts, so they never queue
behind each other's account locks. Blob deletions are not done here: the
caller does them after the batch's transaction has committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from mediavault.blobs import ListedObject, MultipartUpload
from mediavault.domain.media import PRESENT, expired_by

# The orphan sweep: objects under these prefixes that no row owns are moved under
# QUARANTINE first and deleted only if still unowned once they have been there for the
# grace period too (counted from the move, which sets modified_at), so an object whose
# row commits late (a slow upload) is put back rather than lost, however soon runs follow.
QUARANTINE = "quarantine/"
# partial/: the bytes of resumable uploads until finalize publishes them (records.partial_key_for).
SWEPT_PREFIXES = ("originals/", "partial/", "variants/")
# The orphan sweep also aborts the S3 multipart uploads under these prefixes that are no pending
# upload's, begun before the grace period: their parts are in no object listing. A resumable
# upload's is begun at its object key; BlobStore.write begins one for an object over a part (a
# streamed original, a video rendition), and its abort when the write fails is best effort.
MULTIPART_PREFIXES = ("originals/", "variants/")
FIRST_MEDIA_ID = uuid.UUID(int=0)

# SKIP LOCKED lets replicas split the due uploads, and leaves alone any row a
# finalize is committing right now: that finalize's guarded UPDATE then either
# wins or sees the upload already expired, never both.
_EXPIRE_DUE_UPLOADS = """
WITH due AS (
    SELECT upload_id FROM uploads
    WHERE state = 'pending' AND expires_at <= now() - make_interval(secs => $2)
      AND abs(mod(hashtext(user_id), $4)) = $3
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), expired AS (
    UPDATE uploads u SET state = 'expired', failure_reason = 'EXPIRED', updated_at = now()
    FROM due WHERE u.upload_id = due.upload_id
    RETURNING u.upload_id, u.user_id, u.size_bytes, u.object_key, u.protocol,
              (SELECT p.multipart_id FROM upload_progress p WHERE p.upload_id = u.upload_id) AS multipart_id
), per_user AS (
    SELECT user_id, sum(size_bytes)::bigint AS bytes FROM expired GROUP BY user_id
), locked AS (
    -- In user_id order, so that batches locking many accounts at once never deadlock.
    SELECT user_id FROM accounts WHERE user_id IN (SELECT user_id FROM per_user) ORDER BY user_id FOR UPDATE
), freed AS (
    UPDATE accounts a SET reserved_bytes = a.reserved_bytes - p.bytes, updated_at = now()
    FROM per_user p JOIN locked USING (user_id) WHERE a.user_id = p.user_id
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, reserved_delta, upload_id)
    SELECT user_id, 'release', -size_bytes, upload_id FROM expired
)
SELECT * FROM expired
"""

# Unclaimed is part of due, so that a dry run's count leaves out what a real run skips: the
# purges in flight and those waiting to retry their blob deletions.
_PURGE_DUE = """deleted_at IS NOT NULL AND purged_at IS NULL AND purge_after <= now()
      AND (purge_claimed_until IS NULL OR purge_claimed_until < now())"""

_COUNT_PURGE_DUE = f"SELECT count(*) FROM media WHERE {_PURGE_DUE}"

# A purge claim outlives any sane blob deletion; a replica that died mid-purge has its
# rows picked up again once the claim lapses.
PURGE_CLAIM_SECONDS = 600

# A connection of its own or one acquired from a pool, which asyncpg's types tell apart.
Connection = asyncpg.Connection | PoolConnectionProxy

# Expiring claims the purge in the same statement (as _CLAIM_PURGE would), so the run
# deletes the blobs straight after the commit instead of finding the rows again.
_EXPIRE_EPHEMERAL = f"""
WITH due AS (
    SELECT media_id FROM media m
    WHERE m.deleted_at IS NULL AND {expired_by("now() - make_interval(secs => $2)")}
      AND abs(mod(hashtext(owner_id), $4)) = $3
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), removed AS (
    UPDATE media m SET deleted_at = now(), purge_after = now(), updated_at = now(),
                       purge_claimed_until = now() + make_interval(secs => $5)
    FROM due WHERE m.media_id = due.media_id
    RETURNING m.media_id, m.owner_id, m.size_bytes, m.derived_bytes, m.object_key,
              ARRAY(SELECT v.object_key FROM media_variants v WHERE v.media_id = m.media_id) AS variant_keys
), per_owner AS (
    SELECT owner_id, sum(size_bytes)::bigint AS bytes, sum(derived_bytes)::bigint AS derived
    FROM removed GROUP BY owner_id
), locked AS (
    -- In user_id order, so that batches locking many accounts at once never deadlock. The figures
    -- are the locked rows', as media._DELETE's: a run that recorded variants between this
    -- statement's snapshot and the batch's lock of their media is in `removed`, not in the snapshot.
    SELECT user_id, used_bytes, derived_bytes FROM accounts WHERE user_id IN (SELECT owner_id FROM per_owner)
    ORDER BY user_id FOR UPDATE
), freed AS (
    UPDATE accounts a SET used_bytes = l.used_bytes - p.bytes, derived_bytes = l.derived_bytes - p.derived,
                          updated_at = now()
    FROM per_owner p JOIN locked l ON l.user_id = p.owner_id WHERE a.user_id = p.owner_id
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, used_delta, media_id)
    SELECT owner_id, 'free', -size_bytes, media_id FROM removed
)
SELECT * FROM removed
"""


def _claim_purge(which: str) -> str:
    return f"""
WITH due AS (
    SELECT media_id FROM media m
    WHERE {_PURGE_DUE}{which}
    ORDER BY purge_after
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE media m SET purge_claimed_until = now() + make_interval(secs => $2)
FROM due WHERE m.media_id = due.media_id
RETURNING m.media_id, m.owner_id, m.object_key,
          ARRAY(SELECT v.object_key FROM media_variants v WHERE v.media_id = m.media_id) AS variant_keys
"""


_CLAIM_PURGE = _claim_purge("")
# The expiry job retries only the purges of the media it expired (deleted past its expires_at),
# never those of media DeleteMedia deleted: theirs are purge_deleted_media's, on that job's
# schedule and settings, and none at all while it is disabled.
_CLAIM_EXPIRED_PURGE = _claim_purge(f" AND {expired_by('m.deleted_at')}")

# The claim listed the variants in its statement's snapshot: a format made on request that
# committed between that snapshot and the claim's row lock is not in it, and its blob was not
# deleted. Such media stays unpurged and unclaimed, for the next claim to list it whole;
# nothing adds a variant once the media is deleted, so the second claim lists every one.
_MARK_PURGED = """
WITH purged AS (
    UPDATE media m SET purged_at = now(), purge_claimed_until = NULL
    WHERE m.media_id = ANY($1::uuid[]) AND m.purged_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM media_variants v WHERE v.media_id = m.media_id AND v.object_key <> ALL($2::text[]))
    RETURNING m.media_id
), unclaimed AS (
    UPDATE media m SET purge_claimed_until = NULL
    WHERE m.media_id = ANY($1::uuid[]) AND m.purged_at IS NULL AND m.media_id NOT IN (SELECT media_id FROM purged)
    RETURNING m.media_id
), dropped AS (
    DELETE FROM media_variants v USING purged p WHERE v.media_id = p.media_id
)
SELECT media_id FROM unclaimed
"""

_POSTPONE_PURGE = """
UPDATE media SET purge_claimed_until = now() + make_interval(secs => $2)
WHERE media_id = ANY($1::uuid[]) AND purged_at IS NULL
"""

# Present media only (PRESENT), as the claim (media._CLAIM) would not take the run re-queued for
# expired media; the expiry job removes that media on its next run.
_STUCK = f"""
WITH stuck AS (
    SELECT m.media_id FROM media m
    WHERE m.processing_status IN ('pending', 'processing') AND {PRESENT}
      AND m.updated_at < now() - make_interval(secs => $2)
      AND (m.next_attempt_at IS NULL OR m.next_attempt_at < now())
    ORDER BY m.updated_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE media m SET
    processing_status = CASE WHEN m.attempts >= $3 THEN 'failed' ELSE 'pending' END,
    processing_error = CASE WHEN m.attempts >= $3 THEN 'processing did not finish' ELSE m.processing_error END,
    requeues = m.requeues + CASE WHEN m.attempts >= $3 THEN 0 ELSE 1 END,
    processing_progress = NULL,
    updated_at = now()
FROM stuck WHERE m.media_id = stuck.media_id
RETURNING m.media_id, m.owner_id, m.variants_version, m.attempts, m.requeues, m.processing_status
"""

_HEAVY_RESERVATIONS = """
SELECT a.user_id, a.quota_bytes, a.reserved_bytes, min(u.created_at) AS oldest_pending
FROM accounts a JOIN uploads u ON u.user_id = a.user_id AND u.state = 'pending'
WHERE a.reserved_bytes * 2 > a.quota_bytes
GROUP BY a.user_id, a.quota_bytes, a.reserved_bytes
HAVING min(u.created_at) < now() - make_interval(secs => $1)
ORDER BY a.user_id
LIMIT $2
"""

# Each key of SWEPT_PREFIXES is looked up only in the tables whose rows name keys under its
# prefix (each lookup an index probe: media's is media_object_key, migration 0016). An original
# is a pending upload's, then its media's until purged. A partial key names its upload:
# partial/<2 hex>/<upload id hex>, and on S3 "-<part>" tails.
_OWNED = """
SELECT k.key FROM unnest($1::text[]) AS k(key)
WHERE CASE split_part(k.key, '/', 1)
    WHEN 'originals' THEN
        EXISTS (SELECT 1 FROM uploads u WHERE u.object_key = k.key AND u.state = 'pending')
        OR EXISTS (SELECT 1 FROM media m WHERE m.object_key = k.key AND m.purged_at IS NULL)
    WHEN 'partial' THEN
        EXISTS (SELECT 1 FROM uploads u WHERE u.state = 'pending' AND u.upload_id =
                CASE WHEN k.key ~ '^partial/[0-9a-f]{2}/[0-9a-f]{32}(-[0-9]+)?$' THEN substr(k.key, 12, 32)::uuid END)
    WHEN 'variants' THEN
        EXISTS (SELECT 1 FROM media_variants v WHERE v.object_key = k.key)
    ELSE false
END
"""

# A multipart upload is owned while it is the one recorded for a pending upload (by object_key,
# unique, then upload_progress's primary key). Nothing records BlobStore.write's, nor a resumable
# upload's in the moment between its start and its commit: the grace period keeps those.
_OWNED_MULTIPART = """
SELECT m.multipart_id FROM unnest($1::text[], $2::text[]) AS m(key, multipart_id)
WHERE EXISTS (
    SELECT 1 FROM uploads u JOIN upload_progress p USING (upload_id)
    WHERE u.object_key = m.key AND u.state = 'pending' AND p.multipart_id = m.multipart_id
)
"""

# Media that has expired is left out (PRESENT), and so is media that expired or was deleted
# between the listing and the mark: the expiry job deletes its original with it, which is no
# original missing.
_LIVE_ORIGINALS = f"""
SELECT m.media_id, m.object_key FROM media m
WHERE {PRESENT} AND m.processing_status <> 'failed' AND m.media_id > $1
ORDER BY m.media_id
LIMIT $2
"""

_MARK_ORIGINAL_MISSING = f"""
UPDATE media m SET processing_status = 'failed', processing_error = 'original missing', processing_progress = NULL,
                   updated_at = now()
WHERE m.media_id = $1 AND {PRESENT}
RETURNING m.owner_id
"""


@dataclass(frozen=True)
class Lane:
    """Share `index` of `count`: the rows whose account hashes to it (PostgreSQL's hashtext)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"lane {self.index} of {self.count}")


ALL = Lane()


@dataclass
class Batch:
    """What one batch changed; `rows` feeds the after-commit step (blob deletions, enqueues)."""

    changed: int = 0
    freed_bytes: int = 0
    rows: list[asyncpg.Record] = field(default_factory=list)


async def reclaim_stale_uploads(conn: Connection, batch_size: int, age_seconds: int, lane: Lane = ALL) -> Batch:
    rows = await conn.fetch(_EXPIRE_DUE_UPLOADS, batch_size, float(age_seconds), lane.index, lane.count)
    return Batch(len(rows), sum(r["size_bytes"] for r in rows), rows)


async def expire_ephemeral_media(conn: Connection, batch_size: int, age_seconds: int, lane: Lane = ALL) -> Batch:
    """Deletes the batch and claims its purge; rows carry object_key and variant_keys like claim_purge's."""
    rows = await conn.fetch(_EXPIRE_EPHEMERAL, batch_size, float(age_seconds), lane.index, lane.count, float(PURGE_CLAIM_SECONDS))
    return Batch(len(rows), sum(r["size_bytes"] for r in rows), rows)


async def claim_purge(conn: Connection, batch_size: int, *, expired_only: bool = False) -> Batch:
    """Claims deleted media due for purge; expired_only, those the expiry job deleted (_CLAIM_EXPIRED_PURGE)."""
    rows = await conn.fetch(_CLAIM_EXPIRED_PURGE if expired_only else _CLAIM_PURGE, batch_size, float(PURGE_CLAIM_SECONDS))
    return Batch(len(rows), 0, rows)


async def mark_purged(conn: Connection | asyncpg.Pool, media_ids: list[uuid.UUID], deleted_keys: list[str]) -> list[uuid.UUID]:
    """Marks claimed media purged whose every variant's key is among those deleted; returns the
    others, unclaimed again for a later claim (see _MARK_PURGED)."""
    return [row["media_id"] for row in await conn.fetch(_MARK_PURGED, media_ids, deleted_keys)]


async def postpone_purge(conn: Connection | asyncpg.Pool, media_ids: list[uuid.UUID], retry_seconds: int) -> None:
    """Keeps the claimed media from being claimed again for retry_seconds (its blob deletions failed)."""
    await conn.execute(_POSTPONE_PURGE, media_ids, float(retry_seconds))


async def fail_stuck_processing(conn: Connection, batch_size: int, age_seconds: int, max_attempts: int) -> Batch:
    rows = await conn.fetch(_STUCK, batch_size, float(age_seconds), max_attempts)
    return Batch(len(rows), 0, rows)


async def heavy_reservations(conn: Connection | asyncpg.Pool, age_seconds: int, limit: int) -> list[asyncpg.Record]:
    """Accounts holding over half their quota in reservations for longer than age_seconds."""
    return await conn.fetch(_HEAVY_RESERVATIONS, float(age_seconds), limit)


async def owned_keys(conn: Connection | asyncpg.Pool, keys: list[str]) -> set[str]:
    return {r["key"] for r in await conn.fetch(_OWNED, keys)}


async def live_originals(
    conn: Connection | asyncpg.Pool, after: uuid.UUID, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(_LIVE_ORIGINALS, after, limit)


async def mark_original_missing(conn: Connection | asyncpg.Pool, media_id: uuid.UUID) -> str | None:
    """Marks the media FAILED "original missing"; returns its owner, None when it is gone (expired or deleted)."""
    owner: str | None = await conn.fetchval(_MARK_ORIGINAL_MISSING, media_id)
    return owner


async def count_purge_due(conn: Connection | asyncpg.Pool) -> int:
    return int(await conn.fetchval(_COUNT_PURGE_DUE))


async def orphans(conn: Connection | asyncpg.Pool, listed: Sequence[ListedObject], cutoff: datetime) -> list[str]:
    """The keys of the listed objects that no row owns and that were written before cutoff."""
    old = [o.key for o in listed if o.modified_at < cutoff]
    owned = await owned_keys(conn, old)
    return [key for key in old if key not in owned]


async def unowned_multipart_uploads(
    conn: Connection | asyncpg.Pool, listed: Sequence[MultipartUpload], cutoff: datetime
) -> list[MultipartUpload]:
    """The listed multipart uploads begun before cutoff that are no pending upload's."""
    old = [u for u in listed if u.started_at < cutoff]
    rows = await conn.fetch(_OWNED_MULTIPART, [u.key for u in old], [u.multipart_id for u in old])
    owned = {r["multipart_id"] for r in rows}
    return [u for u in old if u.multipart_id not in owned]


@dataclass(frozen=True)
class QuarantineVerdict:
    restore: list[tuple[str, str]]
    """(quarantined key, original key) of objects a row came to own since they were quarantined."""
    delete: list[str]
    """Quarantined keys still unowned and quarantined before the cutoff: deleted for good."""


async def judge_quarantined(
    conn: Connection | asyncpg.Pool, quarantined: Sequence[ListedObject], cutoff: datetime
) -> QuarantineVerdict:
    """Unowned objects quarantined after cutoff are in neither list: they wait for a later run."""
    originals = [o.key.removeprefix(QUARANTINE) for o in quarantined]
    owned = await owned_keys(conn, originals)
    pairs = list(zip(quarantined, originals, strict=True))
    return QuarantineVerdict(
        restore=[(o.key, original) for o, original in pairs if original in owned],
        delete=[o.key for o, original in pairs if original not in owned and o.modified_at < cutoff],
    )
