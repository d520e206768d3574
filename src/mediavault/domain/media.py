"""Media records: access rules, delete/save/reprocess, and the processing status machine.

Status: pending -> processing -> complete | failed. Every worker transition names the
variants_version it works for, so a stale job (superseded by a reprocess) changes nothing,
and a rerun of the same job (worker killed mid-job) reclaims its own row and overwrites
its own deterministic variant keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import asyncpg

from mediavault.auth import Principal
from mediavault.blobs import BlobStore
from mediavault.config import Settings
from mediavault.db.pool import DATABASE_ERRORS
from mediavault.domain import formats
from mediavault.domain.content_types import MP4
from mediavault.errors import MediaBusy, NotFound

if TYPE_CHECKING:
    from mediavault.domain.feed import Feed
    from mediavault.imaging.metadata import PhotoFacts
    from mediavault.jobs import TranscodeQueue

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
READERS = ("admin", "service")
# The variant a feed shows, smallest first; the original when none exists yet.
FEED_ORDER = ("thumbnail", "preview", "display")

_COLUMNS = """
    m.media_id, m.owner_id, m.kind, m.content_type, m.size_bytes, m.sha256, m.object_key, m.retention,
    m.processing_status, m.processing_error, m.attempts, m.width, m.height, m.variants_version,
    m.created_at, m.saved_at, m.expires_at, m.next_attempt_at, m.thumbhash,
    coalesce(c.view_count, 0) AS view_count, coalesce(c.like_count, 0) AS like_count,
    coalesce(c.share_count, 0) AS share_count,
    coalesce((SELECT json_agg(json_build_object(
                 'name', v.name, 'object_key', v.object_key, 'content_type', v.content_type,
                 'width', v.width, 'height', v.height, 'size_bytes', v.size_bytes, 'bitrate', v.bitrate)
                 ORDER BY v.width, v.name, v.content_type)
              FROM media_variants v WHERE v.media_id = m.media_id), '[]') AS variants,
    m.duration_seconds, m.frame_rate, m.has_audio, m.source_codec, m.processing_progress,
    m.taken_at, m.taken_at_utc_offset_minutes, m.camera, m.animated, m.animation_duration_ms, m.animation_plays,
    m.requested_formats
"""


def expired_by(moment: str) -> str:
    """The one statement of when media m has expired: unsaved ephemeral media whose expires_at
    is at or before `moment` (SQL). Saving makes media permanent and clears expires_at."""
    return f"m.retention = 'ephemeral' AND m.saved_at IS NULL AND m.expires_at <= {moment}"


# Expired media is gone at once, though the expiry job (cleanup._EXPIRE_EPHEMERAL) deletes its
# row, frees its bytes and its blobs only on its next run: no read or save finds it meanwhile.
PRESENT = f"m.deleted_at IS NULL AND ({expired_by('now()')}) IS NOT TRUE"

_GET = f"""
SELECT {_COLUMNS} FROM media m LEFT JOIN media_counters c ON c.media_id = m.media_id
WHERE m.media_id = $1 AND {PRESENT}
"""


# A feed page is two statements, not one with "$2 IS NULL OR (created_at, media_id) < ($2, $3)":
# asyncpg keeps each statement prepared on its connection, and after five runs PostgreSQL may
# switch it to a generic plan, where that OR cannot bound the index scan, so a deep page read
# every newer row of the owner's.
def _page_statement(after: str, limit: str) -> str:
    return f"""
SELECT {_COLUMNS} FROM media m LEFT JOIN media_counters c ON c.media_id = m.media_id
WHERE m.owner_id = $1 AND {PRESENT}{after}
ORDER BY m.created_at DESC, m.media_id DESC
LIMIT {limit}
"""


_FIRST_PAGE = _page_statement("", "$2")
_PAGE_AFTER = _page_statement(" AND (m.created_at, m.media_id) < ($2, $3)", "$4")

# A run recording its variants (complete, add_formats) holds the media row until it has added
# their bytes to the account. A delete that waited for that row gets them back in `deleted`,
# while its snapshot, taken before the run committed, shows the account without them, and
# PostgreSQL checks a CHECK on the new row made from that snapshot's row before it moves to
# the run's: a figure computed from it would break accounts_derived_nonnegative. So the account
# is locked after the media row (the CTE reads `deleted`), which gives its latest row, and the
# figures are computed from that.
_DELETE = """
WITH deleted AS (
    UPDATE media SET deleted_at = now(), purge_after = now() + make_interval(secs => $2), updated_at = now()
    WHERE media_id = $1 AND deleted_at IS NULL
    RETURNING media_id, owner_id, size_bytes, derived_bytes
), locked AS (
    SELECT a.user_id, a.used_bytes, a.derived_bytes FROM accounts a JOIN deleted d ON a.user_id = d.owner_id
    FOR NO KEY UPDATE OF a
), freed AS (
    UPDATE accounts a SET used_bytes = l.used_bytes - d.size_bytes, derived_bytes = l.derived_bytes - d.derived_bytes,
                          updated_at = now()
    FROM deleted d JOIN locked l ON l.user_id = d.owner_id WHERE a.user_id = d.owner_id
), entry AS (
    INSERT INTO ledger_entries (user_id, kind, used_delta, media_id)
    SELECT owner_id, 'free', -size_bytes, media_id FROM deleted
)
SELECT * FROM deleted
"""

# No row when nothing changed: the media is permanent already, or expired meanwhile.
_SAVE = f"""
UPDATE media m SET retention = 'permanent', saved_at = coalesce(saved_at, now()), expires_at = NULL, updated_at = now()
WHERE m.media_id = $1 AND {PRESENT} AND m.retention = 'ephemeral'
RETURNING m.owner_id
"""

# Present media only (PRESENT), as the read before it: media that expired in between is gone.
_REPROCESS = f"""
UPDATE media m SET variants_version = variants_version + 1, processing_status = 'pending', attempts = 0,
                   processing_error = NULL, next_attempt_at = NULL, requested_formats = '{{}}', processing_progress = NULL,
                   updated_at = now()
WHERE m.media_id = $1 AND {PRESENT} AND m.processing_status IN ('complete', 'failed', 'pending')
RETURNING m.variants_version
"""

# Present media only (PRESENT): a render of expired media is for no one, and the expiry job
# removes that media on its next run.
_CLAIM = f"""
UPDATE media m SET processing_status = 'processing', attempts = m.attempts + 1, processing_started_at = now(),
                   next_attempt_at = NULL, processing_progress = NULL, updated_at = now()
WHERE m.media_id = $1 AND m.variants_version = $2 AND {PRESENT}
  AND m.processing_status IN ('pending', 'processing')
RETURNING m.media_id, m.owner_id, m.kind, m.content_type, m.object_key, m.attempts
"""

_STORE_VARIANT = """
INSERT INTO media_variants (media_id, name, version, object_key, content_type, width, height, size_bytes, bitrate)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (media_id, name, content_type) DO UPDATE SET
    version = EXCLUDED.version, object_key = EXCLUDED.object_key, content_type = EXCLUDED.content_type,
    width = EXCLUDED.width, height = EXCLUDED.height, size_bytes = EXCLUDED.size_bytes, bitrate = EXCLUDED.bitrate,
    created_at = now()
"""

_COMPLETE = """
UPDATE media SET processing_status = 'complete', width = $3, height = $4, thumbhash = $5, processing_error = NULL,
                 duration_seconds = $6, frame_rate = $7, has_audio = $8, source_codec = $9, poster_seconds = $10,
                 processing_progress = NULL, processed_at = now(), updated_at = now()
WHERE media_id = $1 AND variants_version = $2 AND processing_status = 'processing' AND deleted_at IS NULL
RETURNING owner_id
"""

# In the completing transaction, after _COMPLETE has matched the run. GPS is never stored.
_RECORD_IMAGE_FACTS = """
UPDATE media SET taken_at = $2, taken_at_utc_offset_minutes = $3, camera = nullif($4, ''),
                 animated = $5::integer IS NOT NULL, animation_duration_ms = $5, animation_plays = $6
WHERE media_id = $1
"""

_FAIL = """
UPDATE media SET processing_status = 'failed', processing_error = $3, next_attempt_at = NULL,
                 processing_progress = NULL, updated_at = now()
WHERE media_id = $1 AND variants_version = $2 AND processing_status IN ('pending', 'processing')
RETURNING owner_id
"""

# Also the liveness check of a running transcode: no row means the media is gone (deleted, or
# expired: PRESENT, the claim's rule) or its run superseded, and the transcode stops. updated_at
# is its heartbeat: the stuck-media sweep leaves a long transcode that still reports progress alone.
_PROGRESS = f"""
UPDATE media m SET processing_progress = $3, updated_at = now()
WHERE m.media_id = $1 AND m.variants_version = $2 AND m.processing_status = 'processing' AND {PRESENT}
RETURNING m.owner_id
"""

_KIND = f"SELECT m.kind FROM media m WHERE m.media_id = $1 AND {PRESENT}"

_DROP_OTHER_VARIANTS = """
DELETE FROM media_variants WHERE media_id = $1
  AND (name, content_type) NOT IN (SELECT * FROM unnest($2::text[], $3::text[]))
"""

# In the completing transaction, once the run's variants are stored and the others dropped:
# the media row is locked by _COMPLETE, so its previous figure is read race-free, and the
# owner's figure moves by the difference.
_COUNT_DERIVED = """
WITH previous AS (
    SELECT media_id, owner_id, derived_bytes FROM media WHERE media_id = $1
), counted AS (
    UPDATE media m SET derived_bytes = (SELECT coalesce(sum(v.size_bytes), 0) FROM media_variants v WHERE v.media_id = $1)
    FROM previous p WHERE m.media_id = p.media_id
    RETURNING p.owner_id, m.derived_bytes - p.derived_bytes AS delta
)
UPDATE accounts a SET derived_bytes = a.derived_bytes + c.delta, updated_at = now()
FROM counted c WHERE a.user_id = c.owner_id AND c.delta <> 0
"""

# Formats made on request (imaging/spec.py, Alternate.eager), as "<variant name>:<content type>"
# entries. Rows are locked in media_id order, so two requests for the same items cannot
# deadlock; a row that already lists every entry asked for is left alone, so of concurrent
# requests for one format exactly one adds it and queues the job that makes it. That request
# takes the next format_requests number under the row lock, for a job id of its own.
_REQUEST_FORMATS = """
WITH wanted AS (
    SELECT w.media_id, w.version, array_agg(w.entry ORDER BY w.entry) AS entries
    FROM unnest($1::uuid[], $2::integer[], $3::text[]) AS w(media_id, version, entry)
    GROUP BY w.media_id, w.version
), locked AS (
    SELECT m.media_id, w.entries FROM media m JOIN wanted w ON w.media_id = m.media_id AND w.version = m.variants_version
    WHERE m.processing_status = 'complete' AND m.deleted_at IS NULL
    ORDER BY m.media_id
    FOR UPDATE OF m
)
UPDATE media m SET requested_formats = ARRAY(SELECT DISTINCT e FROM unnest(m.requested_formats || l.entries) AS e ORDER BY e),
                   format_requests = m.format_requests + 1
FROM locked l
WHERE m.media_id = l.media_id AND NOT m.requested_formats @> l.entries
RETURNING m.media_id, m.variants_version, m.owner_id, l.entries, m.format_requests
"""

_UNREQUEST_FORMATS = """
UPDATE media SET requested_formats = ARRAY(SELECT e FROM unnest(requested_formats) AS e WHERE e <> ALL($3::text[]) ORDER BY e)
WHERE media_id = $1 AND variants_version = $2
"""

# A video's formats are made from the rendition its poster came from, the smallest (workers.video).
# Present media only (PRESENT), as the transcode claim: formats of expired media are for no one.
_FORMATS_TO_MAKE = f"""
SELECT m.kind, m.content_type, m.object_key, m.poster_seconds,
       (SELECT v.object_key FROM media_variants v
        WHERE v.media_id = m.media_id AND v.content_type = $3
        ORDER BY v.width * v.height, v.name LIMIT 1) AS smallest_rendition,
       ARRAY(SELECT e FROM unnest(m.requested_formats) AS e
             EXCEPT SELECT v.name || ':' || v.content_type FROM media_variants v WHERE v.media_id = m.media_id) AS missing,
       -- Every stored format of a variant is smaller than its primary (imaging.formats.alternates),
       -- so a variant's largest is its primary.
       (SELECT jsonb_object_agg(p.name, p.size_bytes)
        FROM (SELECT v.name, max(v.size_bytes) AS size_bytes FROM media_variants v
              WHERE v.media_id = m.media_id GROUP BY v.name) AS p) AS primary_bytes
FROM media m
WHERE m.media_id = $1 AND m.variants_version = $2 AND m.processing_status = 'complete' AND {PRESENT}
"""

# The run whose variants a format made on request joins; locked, so a reprocess waits.
_LOCK_COMPLETE_RUN = """
SELECT owner_id FROM media
WHERE media_id = $1 AND variants_version = $2 AND processing_status = 'complete' AND deleted_at IS NULL
FOR UPDATE
"""

_RETRY_LATER = """
UPDATE media SET processing_status = 'pending', processing_error = $3, processing_progress = NULL,
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
    # Bits per second of a playable rendition (a video's, an animated image's gifv); None for pictures.
    bitrate: int | None = None

    @property
    def is_rendition(self) -> bool:
        """A playable video encoding, as opposed to a picture (poster, thumbnail, ...)."""
        return self.content_type.startswith("video/")


@dataclass(frozen=True)
class VideoFacts:
    """What a source video is, as probed from its container, and the time of its poster frame in
    its smallest rendition, where its formats made on request take that frame again."""

    duration_seconds: float
    frame_rate: float
    has_audio: bool
    source_codec: str
    poster_seconds: float | None = None


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
    # ThumbHash of the smallest variant (imaging/thumbhash.py); None until processed.
    thumbhash: bytes | None = None
    # One per (name, format): a variant in several formats has several.
    variants: tuple[Variant, ...] = field(default=())
    duration_seconds: float | None = None
    frame_rate: float | None = None
    has_audio: bool | None = None
    source_codec: str | None = None
    # 0-100 while a video transcode runs.
    processing_progress: int | None = None
    # From the photo's EXIF: the camera's wall clock, the UTC offset it recorded (None when
    # none), and "Make Model".
    taken_at: datetime | None = None
    taken_at_utc_offset_minutes: int | None = None
    camera: str | None = None
    animated: bool = False
    animation_duration_ms: int | None = None
    # How many times it plays through, 0 for ever; None for a still, and for an animation made
    # before it was recorded (whose WebP plays for ever).
    animation_plays: int | None = None
    # Formats made on request that a client has asked for, as "<variant name>:<content type>";
    # each is made, or was no smaller than its primary and is not made (see Library.get).
    requested_formats: tuple[str, ...] = ()

    @property
    def taken_at_iso(self) -> str:
        """taken_at in ISO 8601, with the recorded UTC offset when there is one; empty when unknown."""
        if self.taken_at is None:
            return ""
        if self.taken_at_utc_offset_minutes is None:
            return self.taken_at.isoformat()
        offset = timezone(timedelta(minutes=self.taken_at_utc_offset_minutes))
        return self.taken_at.replace(tzinfo=offset).isoformat()


@dataclass(frozen=True)
class Claim:
    media_id: uuid.UUID
    owner_id: str
    kind: str
    content_type: str
    object_key: str
    attempts: int


@dataclass(frozen=True)
class FormatsToMake:
    """What a make_formats job makes: `requested` content types by variant name, from the
    object at object_key (an image's original; the rendition a video's poster came from, whose
    poster frame is at poster_seconds, None for an image or a video processed before it was kept).
    `primary_bytes` is the size of each variant's stored primary, which a format made must be
    smaller than: the job's own JPEG of the variant may differ from it (the upload's job may
    have taken the planes or lossless strategy)."""

    content_type: str
    object_key: str
    requested: dict[str, tuple[str, ...]]
    primary_bytes: dict[str, int]
    poster_seconds: float | None = None


@dataclass(frozen=True)
class Located:
    """A stored variant and the URL it is served at."""

    variant: Variant
    url: str

    @property
    def content_type(self) -> str:
        return self.variant.content_type


@dataclass(frozen=True)
class Offered:
    """One variant as a client gets it: in the format chosen for it (domain.formats), and its other formats."""

    chosen: Located
    alternatives: tuple[Located, ...]


@dataclass(frozen=True)
class Shown:
    """A media item as a client sees it: with the URLs of each variant, formats chosen, and of its
    original for its owner alone ("" for anyone else)."""

    media: Media
    original_url: str
    variants: tuple[Offered, ...]

    @property
    def feed_url(self) -> str:
        urls = {offered.chosen.variant.name: offered.chosen.url for offered in self.variants}
        return next((urls[n] for n in FEED_ORDER if n in urls), self.original_url)


@dataclass(frozen=True)
class FeedPage:
    items: list[Shown]
    next_page_token: str
    etag: str
    not_modified: bool


def from_row(row: asyncpg.Record) -> Media:
    values = dict(row)
    raw = values.pop("variants")
    variants = json.loads(raw) if isinstance(raw, str) else raw
    values["requested_formats"] = tuple(values["requested_formats"])
    return Media(**values, variants=tuple(Variant(**v) for v in variants))


def format_entry(name: str, content_type: str) -> str:
    return f"{name}:{content_type}"


def split_entry(entry: str) -> tuple[str, str]:
    """The variant name and content type of a format_entry."""
    name, content_type = entry.split(":", 1)
    return name, content_type


def variant_key(media_id: uuid.UUID, version: int, name: str, content_type: str) -> str:
    """Deterministic per run, so a rerun overwrites; versioned, so a served URL never changes content."""
    extension = {"image/jpeg": "jpg", "image/webp": "webp", "image/png": "png", "image/avif": "avif", "video/mp4": "mp4"}[content_type]
    hex_id = media_id.hex
    return f"variants/{hex_id[:2]}/{hex_id}/v{version}/{name}.{extension}"


async def page(
    pool: asyncpg.Pool, owner_id: str, size: int, after: tuple[datetime, uuid.UUID] | None
) -> tuple[list[Media], bool]:
    """One page of the owner's media, newest first, and whether more follow."""
    if after:
        rows = await pool.fetch(_PAGE_AFTER, owner_id, *after, size + 1)
    else:
        rows = await pool.fetch(_FIRST_PAGE, owner_id, size + 1)
    return [from_row(r) for r in rows[:size]], len(rows) > size


class Library:
    """Media records: what users do to them (get, delete, save, reprocess) and the workers' status machine.

    Every change that alters an owner's feed bumps it through the Feed; a new
    processing run goes to the transcode queue, with its feed bump in the same call.
    `on_request` names, per kind of media and variant, the formats made only once a client
    asks for them (imaging.spec.on_request); their jobs go to the transcode queue too.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        blobs: BlobStore,
        settings: Settings,
        transcodes: TranscodeQueue,
        feed: Feed,
        on_request: Mapping[str, Mapping[str, tuple[str, ...]]],
    ) -> None:
        self._pool = pool
        self._blobs = blobs
        self._settings = settings
        self._transcodes = transcodes
        self._feed = feed
        self._on_request = on_request

    async def url(self, object_key: str, content_type: str) -> str:
        """A variant's URL: a plain CDN URL when PUBLIC_BASE_URL is set, else a signed one."""
        if self._settings.public_base_url:
            return f"{self._settings.public_base_url.rstrip('/')}/{object_key}"
        return await self.signed_url(object_key, content_type)

    async def signed_url(self, object_key: str, content_type: str) -> str:
        """A URL that expires after MEDIA_URL_TTL_SECONDS, straight from the blob store."""
        return await self._blobs.presign_get(
            object_key, expires_in=self._settings.media_url_ttl_seconds, content_type=content_type
        )

    async def show(self, principal: Principal, media: Media, preferred: Sequence[str] = ()) -> Shown:
        """The media with URLs, each variant in the first format of `preferred` (domain.formats.preference) it has.

        The original's URL goes to the owner alone: the original is the upload as it came,
        metadata and GPS included, and a reader role (the feed service) shows media to others.
        It is always signed, never a CDN URL: a variant's CDN URL names the media, and a CDN
        serving originals/ would give anyone who saw a thumbnail the original beside it.
        """
        by_name: dict[str, list[Located]] = {}
        for v in media.variants:
            by_name.setdefault(v.name, []).append(Located(v, await self.url(v.object_key, v.content_type)))
        offered = []
        for located in by_name.values():
            chosen, *alternatives = formats.ordered(located, preferred)
            offered.append(Offered(chosen, tuple(alternatives)))
        owned = media.owner_id == principal.user_id
        original_url = await self.signed_url(media.object_key, media.content_type) if owned else ""
        return Shown(media, original_url, tuple(offered))

    async def _visible(self, principal: Principal, media_id: uuid.UUID, *, read_roles: tuple[str, ...]) -> Media:
        row = await self._pool.fetchrow(_GET, media_id)
        # Others' media is indistinguishable from missing media.
        if row is None or (row["owner_id"] != principal.user_id and not principal.has_any(*read_roles)):
            raise NotFound("media not found")
        return from_row(row)

    async def get(self, principal: Principal, media_id: uuid.UUID, accept: Sequence[str] = ()) -> Shown:
        """One media item, each variant in the first of the `accept`ed MIME types it exists in.

        A variant whose first accepted format is one made on request and not made yet
        answers in the next one it exists in, and that format is requested: its job makes
        it for the calls that follow.
        """
        media = await self._visible(principal, media_id, read_roles=READERS)
        preferred = formats.preference(accept)
        await self._request_formats([media], preferred)
        return await self.show(principal, media, preferred)

    def _formats_wanted(self, media: Media, preferred: Sequence[str]) -> list[str]:
        """Entries of the formats made on request that this client would be answered in and
        that are neither made nor asked for: per variant, the first preferred format it has or could have."""
        on_request = self._on_request.get(media.kind)
        if not preferred or not on_request or media.processing_status != "complete":
            return []
        made: dict[str, set[str]] = {}
        for v in media.variants:
            made.setdefault(v.name, set()).add(v.content_type)
        wanted = []
        for name, stored in made.items():
            possible = stored.union(on_request.get(name, ()))
            first = next((mime for mime in preferred if mime in possible), None)
            if first is None or first in stored:
                continue
            entry = format_entry(name, first)
            if entry not in media.requested_formats:
                wanted.append(entry)
        return wanted

    async def _request_formats(self, items: Sequence[Media], preferred: Sequence[str]) -> None:
        """Asks for the formats made on request that these items lack for this client (see get).

        PostgreSQL decides which call asks first (_REQUEST_FORMATS); only that one queues
        the job. A request that cannot be queued is withdrawn, so a later call asks again.
        Best effort: a fault here is logged and the call answers with what exists.
        """
        wanted = [(m.media_id, m.variants_version, entry) for m in items for entry in self._formats_wanted(m, preferred)]
        if not wanted:
            return
        try:
            ids, versions, entries = (list(column) for column in zip(*wanted, strict=True))
            rows = await self._pool.fetch(_REQUEST_FORMATS, ids, versions, entries)
            for row in rows:
                queued = await self._transcodes.enqueue_formats(row["media_id"], row["variants_version"], row["format_requests"])
                if not queued:
                    await self.withdraw_formats(row["media_id"], row["variants_version"], row["entries"])
            # The cached pages learn that these are asked for, so their next reads ask no more.
            await self._feed.changed_many({row["owner_id"] for row in rows})
        except DATABASE_ERRORS:
            log.warning("formats could not be requested", extra={"formats": len(wanted)}, exc_info=True)

    async def feed_page(
        self, principal: Principal, owner_id: str, page_size: int, page_token: str, if_none_match: str = "",
        accept: Sequence[str] = (),
    ) -> FeedPage:
        """A page of the owner's feed (the caller's own unless a reader role names another owner).

        Each variant comes in the first of the `accept`ed MIME types it exists in, and the
        etag covers that choice. With the etag the client already holds, an unchanged page
        comes back without items.
        """
        owner = principal.user_or_self(owner_id, *READERS)
        preferred = formats.preference(accept)
        page = await self._feed.page(owner, page_size, page_token, preferred)
        await self._request_formats(page.items, preferred)
        etag = self._answer_etag(page.etag, owned=owner == principal.user_id)
        if if_none_match and if_none_match == etag:
            return FeedPage([], page.next_page_token, etag, not_modified=True)
        items = [await self.show(principal, m, preferred) for m in page.items]
        return FeedPage(items, page.next_page_token, etag, not_modified=False)

    def _answer_etag(self, page_etag: str, *, owned: bool) -> str:
        """The page's etag as this caller's answer shows it. The owner's answer has the originals'
        URLs, a reader's none. And signed URLs expire (MEDIA_URL_TTL_SECONDS): their answers' etag
        also names the half TTL it was made in, so an etag stops being current before the URLs of
        the answer it came with have less than half their life left. Only the variants' CDN URLs
        (PUBLIC_BASE_URL, on a reader's answer) never expire."""
        parts = [page_etag, "owner" if owned else "reader"]
        if owned or not self._settings.public_base_url:
            half_ttl = self._settings.media_url_ttl_seconds / 2
            parts.append(str(int(time.time() // half_ttl)))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    async def delete(self, principal: Principal, media_id: uuid.UUID) -> None:
        """Soft delete; the owner's used bytes are freed at once, the blobs purged after the grace period."""
        media = await self._visible(principal, media_id, read_roles=("admin",))
        grace = float(self._settings.jobs.purge_deleted_media.age_seconds)
        if await self._pool.fetchrow(_DELETE, media_id, grace) is None:
            raise NotFound("media not found")
        await self._feed.changed(media.owner_id)

    async def save(self, principal: Principal, media_id: uuid.UUID) -> Shown:
        """An ephemeral item becomes permanent; saving a permanent one changes nothing."""
        await self._visible(principal, media_id, read_roles=())
        owner = await self._pool.fetchval(_SAVE, media_id)
        # Only a save that changed the row changes the feed: a bump drops every cached page of the owner's.
        if owner is not None:
            await self._feed.changed(owner)
        return await self.get(principal, media_id)

    async def reprocess(self, principal: Principal, media_id: uuid.UUID) -> Shown:
        """Starts a new processing run; refused while a run is in progress."""
        await self._visible(principal, media_id, read_roles=("admin",))
        version = await self._pool.fetchval(_REPROCESS, media_id)
        if version is None:
            # Deleted since it was read (NotFound, for good), or a run is in progress.
            await self._visible(principal, media_id, read_roles=("admin",))
            raise MediaBusy("media is being processed; reprocess it when that finishes")
        shown = await self.get(principal, media_id)
        await self._transcodes.enqueue(media_id, version, feed_owner=shown.media.owner_id)
        return shown

    async def claim(self, media_id: uuid.UUID, version: int) -> Claim | None:
        """Marks the run as processing and counts the attempt; None when there is nothing to do."""
        row = await self._pool.fetchrow(_CLAIM, media_id, version)
        if row is None:
            return None
        # The feed shows the status and the attempts: its cached pages and etags must change.
        await self._feed.changed(row["owner_id"])
        return Claim(**row)

    async def complete(
        self,
        media_id: uuid.UUID,
        version: int,
        width: int,
        height: int,
        variants: list[Variant],
        thumbhash: bytes = b"",
        video: VideoFacts | None = None,
        photo: PhotoFacts | None = None,
        animation_duration_ms: int | None = None,
        animation_plays: int | None = None,
    ) -> bool:
        """Records the run's variants (every format of each), its ThumbHash, a video's facts or an
        image's EXIF facts and animation length and plays, and marks it complete; False when the run was superseded or the media deleted."""
        facts = (
            (video.duration_seconds, video.frame_rate, video.has_audio, video.source_codec, video.poster_seconds)
            if video
            else (None,) * 5
        )
        async with self._pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchval(_COMPLETE, media_id, version, width, height, thumbhash or None, *facts)
            if owner is None:
                return False
            if photo is not None:
                await conn.execute(
                    _RECORD_IMAGE_FACTS, media_id, photo.taken_at, photo.utc_offset_minutes, photo.camera,
                    animation_duration_ms, animation_plays,
                )
            await conn.executemany(
                _STORE_VARIANT,
                [
                    (media_id, v.name, version, v.object_key, v.content_type, v.width, v.height, v.size_bytes, v.bitrate)
                    for v in variants
                ],
            )
            await conn.execute(_DROP_OTHER_VARIANTS, media_id, [v.name for v in variants], [v.content_type for v in variants])
            await conn.execute(_COUNT_DERIVED, media_id)
        await self._feed.changed(owner)
        return True

    async def formats_to_make(self, media_id: uuid.UUID, version: int) -> FormatsToMake | None:
        """The requested formats of the run that are not made yet; None when there are none,
        or the run is not complete (superseded, deleted, expired, or still running)."""
        row = await self._pool.fetchrow(_FORMATS_TO_MAKE, media_id, version, MP4)
        if row is None or not row["missing"]:
            return None
        requested: dict[str, tuple[str, ...]] = {}
        for entry in sorted(row["missing"]):
            name, content_type = split_entry(entry)
            requested[name] = (*requested.get(name, ()), content_type)
        primary_bytes = json.loads(row["primary_bytes"])
        if row["kind"] == "video":
            # A complete video has its renditions; without one there is no frame to make them from.
            if not row["smallest_rendition"]:
                return None
            return FormatsToMake(MP4, row["smallest_rendition"], requested, primary_bytes, row["poster_seconds"])
        return FormatsToMake(row["content_type"], row["object_key"], requested, primary_bytes)

    async def add_formats(self, media_id: uuid.UUID, version: int, variants: Sequence[Variant]) -> bool:
        """Records formats made on request beside the run's variants, and their bytes; False
        when the run is no longer the media's complete one (reprocessed or deleted)."""
        async with self._pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchval(_LOCK_COMPLETE_RUN, media_id, version)
            if owner is None:
                return False
            await conn.executemany(
                _STORE_VARIANT,
                [(media_id, v.name, version, v.object_key, v.content_type, v.width, v.height, v.size_bytes, v.bitrate)
                 for v in variants],
            )
            await conn.execute(_COUNT_DERIVED, media_id)
        await self._feed.changed(owner)
        return True

    async def withdraw_formats(self, media_id: uuid.UUID, version: int, entries: Sequence[str]) -> None:
        """Forgets that these formats were asked for, so the next client that wants them asks again."""
        await self._pool.execute(_UNREQUEST_FORMATS, media_id, version, list(entries))

    async def kind(self, media_id: uuid.UUID) -> str | None:
        """image or video; None when the media is gone."""
        kind: str | None = await self._pool.fetchval(_KIND, media_id)
        return kind

    async def progress(self, media_id: uuid.UUID, version: int, percent: int) -> bool:
        """Records how far a running transcode is; False when the run is no longer wanted
        (the media was deleted or expired, or a reprocess superseded the run)."""
        owner = await self._pool.fetchval(_PROGRESS, media_id, version, percent)
        if owner is None:
            return False
        # The feed shows the progress; a worker reports it at most twice a second.
        await self._feed.changed(owner)
        return True

    async def fail(self, media_id: uuid.UUID, version: int, error: str) -> bool:
        """Ends the run FAILED with a reason for the client; False when it was no longer running."""
        owner = await self._pool.fetchval(_FAIL, media_id, version, error)
        if owner is None:
            return False
        await self._feed.changed(owner)
        return True

    async def retry_later(self, media_id: uuid.UUID, version: int, error: str, delay_seconds: float) -> bool:
        """Puts the run back to PENDING until its next attempt; False when it was no longer running."""
        owner = await self._pool.fetchval(_RETRY_LATER, media_id, version, error, delay_seconds)
        if owner is None:
            return False
        await self._feed.changed(owner)
        return True
