"""Media records: access rules, delete/save/reprocess, and the processing status machine.

Status: pending -> processing -> complete | failed. Every worker transition names the
variants_version it works for, so a stale job (superseded by a reprocess) changes nothing,
and a rerun of the same job (worker killed mid-job) reclaims its own row and overwrites
its own deterministic variant keys.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from mediavault.auth import Principal
from mediavault.errors import FieldViolation, InvalidArgument, NotFound, UploadNotPending

MAX_ATTEMPTS = 3
READERS = ("admin", "service")

_COLUMNS = """
    m.media_id, m.owner_id, m.kind, m.content_type, m.size_bytes, m.sha256, m.object_key, m.retention,
    m.processing_status, m.processing_error, m.attempts, m.width, m.height, m.variants_version,
    m.created_at, m.saved_at, m.expires_at, m.next_attempt_at,
    coalesce(c.view_count, 0) AS view_count, coalesce(c.like_count, 0) AS like_count,
    coalesce(c.share_count, 0) AS share_count,
    coalesce((SELECT json_agg(json_build_object(
                 'name', v.name, 'object_key', v.object_key, 'content_type', v.content_type,
                 'width', v.width, 'height', v.height, 'size_bytes', v.size_bytes) ORDER BY v.width)
              FROM media_variants v WHERE v.media_id = m.media_id), '[]') AS variants
"""

_GET = f"""
SELECT {_COLUMNS} FROM media m LEFT JOIN media_counters c ON c.media_id = m.media_id
WHERE m.media_id = $1 AND m.deleted_at IS NULL
"""

_PAGE = f"""
SELECT {_COLUMNS} FROM media m LEFT JOIN media_counters c ON c.media_id = m.media_id
WHERE m.owner_id = $1 AND m.deleted_at IS NULL
  AND ($2::timestamptz IS NULL OR (m.created_at, m.media_id) < ($2, $3))
ORDER BY m.created_at DESC, m.media_id DESC
LIMIT $4
"""

_DELETE = """
WITH deleted AS (
    UPDATE media SET deleted_at = now(), purge_after = now() + make_interval(secs => $2), updated_at = now()
    WHERE media_id = $1 AND deleted_at IS NULL
    RETURNING media_id, owner_id, size_bytes
), freed AS (
    UPDATE accounts a SET used_bytes = a.used_bytes - d.size_bytes, updated_at = now()
    FROM deleted d WHERE a.user_id = d.owner_id
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, used_delta, media_id)
    SELECT owner_id, 'free', -size_bytes, media_id FROM deleted
)
SELECT * FROM deleted
"""

_SAVE = """
UPDATE media SET retention = 'permanent', saved_at = coalesce(saved_at, now()), expires_at = NULL, updated_at = now()
WHERE media_id = $1 AND deleted_at IS NULL AND retention = 'ephemeral'
"""

_REPROCESS = """
UPDATE media SET variants_version = variants_version + 1, processing_status = 'pending', attempts = 0,
                 processing_error = NULL, next_attempt_at = NULL, updated_at = now()
WHERE media_id = $1 AND deleted_at IS NULL AND processing_status IN ('complete', 'failed', 'pending')
RETURNING variants_version
"""

_CLAIM = """
UPDATE media SET processing_status = 'processing', attempts = attempts + 1, processing_started_at = now(),
                 next_attempt_at = NULL, updated_at = now()
WHERE media_id = $1 AND variants_version = $2 AND deleted_at IS NULL
  AND processing_status IN ('pending', 'processing')
RETURNING media_id, owner_id, kind, content_type, object_key, attempts
"""

_STORE_VARIANT = """
INSERT INTO media_variants (media_id, name, version, object_key, content_type, width, height, size_bytes)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (media_id, name) DO UPDATE SET
    version = EXCLUDED.version, object_key = EXCLUDED.object_key, content_type = EXCLUDED.content_type,
    width = EXCLUDED.width, height = EXCLUDED.height, size_bytes = EXCLUDED.size_bytes, created_at = now()
"""

_COMPLETE = """
UPDATE media SET processing_status = 'complete', width = $3, height = $4, processing_error = NULL,
                 processed_at = now(), updated_at = now()
WHERE media_id = $1 AND variants_version = $2 AND processing_status = 'processing' AND deleted_at IS NULL
RETURNING owner_id
"""

_FAIL = """
UPDATE media SET processing_status = 'failed', processing_error = $3, next_attempt_at = NULL, updated_at = now()
WHERE media_id = $1 AND variants_version = $2 AND processing_status IN ('pending', 'processing')
RETURNING owner_id
"""

_RETRY_LATER = """
UPDATE media SET processing_status = 'pending', processing_error = $3,
                 next_attempt_at = now() + make_interval(secs => $4), updated_at = now()
WHERE media_id = $1 AND variants_version = $2 AND processing_status = 'processing'
RETURNING owner_id
"""


@dataclass(frozen=True)
class Variant:
    name: str
    object_key: str
    content_type: str
    width: int
    height: int
    size_bytes: int


@dataclass(frozen=True)
class Media:
    media_id: uuid.UUID
    owner_id: str
    kind: str
    content_type: str
    size_bytes: int
    sha256: str | None
    object_key: str
    retention: str
    processing_status: str
    processing_error: str | None
    attempts: int
    width: int | None
    height: int | None
    variants_version: int
    created_at: datetime
    saved_at: datetime | None
    expires_at: datetime | None
    next_attempt_at: datetime | None
    view_count: int
    like_count: int
    share_count: int
    variants: tuple[Variant, ...] = field(default=())

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


@dataclass(frozen=True)
class Claim:
    media_id: uuid.UUID
    owner_id: str
    kind: str
    content_type: str
    object_key: str
    attempts: int


def from_row(row: asyncpg.Record) -> Media:
    values = dict(row)
    raw = values.pop("variants")
    variants = json.loads(raw) if isinstance(raw, str) else raw
    return Media(**values, variants=tuple(Variant(**v) for v in variants))


def parse_media_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidArgument([FieldViolation("media_id", "must be a UUID")]) from None


async def _visible(pool: asyncpg.Pool, principal: Principal, media_id: uuid.UUID, *, read_roles: tuple[str, ...]) -> Media:
    row = await pool.fetchrow(_GET, media_id)
    # Others' media is indistinguishable from missing media.
    if row is None or (row["owner_id"] != principal.user_id and not principal.has_any(*read_roles)):
        raise NotFound("media not found")
    return from_row(row)


async def get(pool: asyncpg.Pool, principal: Principal, media_id: uuid.UUID) -> Media:
    return await _visible(pool, principal, media_id, read_roles=READERS)


async def page(
    pool: asyncpg.Pool, owner_id: str, size: int, after: tuple[datetime, uuid.UUID] | None
) -> tuple[list[Media], bool]:
    """One page of the owner's media, newest first, and whether more follow."""
    after_at, after_id = after if after else (None, None)
    rows = await pool.fetch(_PAGE, owner_id, after_at, after_id, size + 1)
    return [from_row(r) for r in rows[:size]], len(rows) > size


async def delete(pool: asyncpg.Pool, principal: Principal, media_id: uuid.UUID, purge_grace_seconds: float) -> Media:
    """Soft delete; the owner's used bytes are freed at once, the blobs purged after the grace period."""
    media = await _visible(pool, principal, media_id, read_roles=("admin",))
    if await pool.fetchrow(_DELETE, media_id, purge_grace_seconds) is None:
        raise NotFound("media not found")
    return media


async def save(pool: asyncpg.Pool, principal: Principal, media_id: uuid.UUID) -> Media:
    await _visible(pool, principal, media_id, read_roles=())
    await pool.execute(_SAVE, media_id)
    return await get(pool, principal, media_id)


async def request_reprocess(pool: asyncpg.Pool, principal: Principal, media_id: uuid.UUID) -> int:
    """Starts a new processing run and returns its version; refused while a run is in progress."""
    await _visible(pool, principal, media_id, read_roles=("admin",))
    version: int | None = await pool.fetchval(_REPROCESS, media_id)
    if version is None:
        raise UploadNotPending("media is being processed; reprocess it when that finishes")
    return version


async def claim(pool: asyncpg.Pool, media_id: uuid.UUID, version: int) -> Claim | None:
    """Marks the run as processing and counts the attempt; None when there is nothing to do."""
    row = await pool.fetchrow(_CLAIM, media_id, version)
    return Claim(**row) if row else None


async def complete(
    pool: asyncpg.Pool, media_id: uuid.UUID, version: int, width: int, height: int, variants: list[Variant]
) -> str | None:
    """Records the run's variants and marks it complete; returns the owner, or None if the run was superseded."""
    async with pool.acquire() as conn, conn.transaction():
        owner: str | None = await conn.fetchval(_COMPLETE, media_id, version, width, height)
        if owner is None:
            return None
        await conn.executemany(
            _STORE_VARIANT,
            [(media_id, v.name, version, v.object_key, v.content_type, v.width, v.height, v.size_bytes) for v in variants],
        )
        names = [v.name for v in variants]
        await conn.execute("DELETE FROM media_variants WHERE media_id = $1 AND NOT (name = ANY($2::text[]))", media_id, names)
    return owner


async def fail(pool: asyncpg.Pool, media_id: uuid.UUID, version: int, error: str) -> str | None:
    owner: str | None = await pool.fetchval(_FAIL, media_id, version, error)
    return owner


async def retry_later(pool: asyncpg.Pool, media_id: uuid.UUID, version: int, error: str, delay_seconds: float) -> str | None:
    owner: str | None = await pool.fetchval(_RETRY_LATER, media_id, version, error, delay_seconds)
    return owner


def variant_key(media_id: uuid.UUID, version: int, name: str, content_type: str) -> str:
    """Deterministic per run, so a rerun overwrites; versioned, so a served URL never changes content."""
    extension = {"image/jpeg": "jpg", "image/webp": "webp", "image/png": "png"}[content_type]
    hex_id = media_id.hex
    return f"variants/{hex_id[:2]}/{hex_id}/v{version}/{name}.{extension}"
