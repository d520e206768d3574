"""The feed: cursor pages of an owner's media, cached in Redis under versioned keys.

Anything that changes an owner's feed bumps ``feed:v:<owner>``; page keys embed the
version, so the next call after a change misses and recomputes. An item leaving the feed
as it expires (media.expired_by) bumps nothing, so a page is cached no longer than until
its first item expires. Concurrent misses of one key compute once: in-process callers
share one task, other processes wait briefly on a Redis lock. With Redis unreachable the
feed is served straight from PostgreSQL.

Version keys expire after VERSION_TTL_SECONDS without a bump or a read, so Redis does
not keep one key per owner who ever uploaded. Every page is written after a read of its
version, so pages (seconds) are long gone before a version can expire and restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mediavault import metrics
from mediavault.domain import formats
from mediavault.domain import media as media_domain
from mediavault.domain.pages import TOKEN_VERSION, PageTokens, page_size

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 50
_LOCK_SECONDS = 5
VERSION_TTL_SECONDS = 7 * 24 * 3600
_LOCK_WAIT_STEP = 0.02
# The name the feed's page tokens are signed under.
LISTING = "feed"


# A page as computed, before its JSON text is made.
_Payload = dict[str, Any]
# A page as cached, the JSON of {"items": [Media as JSON], "next_page_token": str, "etag": str}:
# text, which callers of one page can share, each parsing its own Page from it.
_PageJson = str | bytes


@dataclass(frozen=True)
class _Computed:
    """A page as computed: its JSON, and when its first item expires (None when none does)."""

    text: _PageJson
    first_expiry: datetime | None


@dataclass(frozen=True)
class Page:
    items: list[media_domain.Media]
    next_page_token: str
    etag: str


def page_key(owner_id: str, version: int, page: str) -> str:
    """Where a page of the owner's feed at this feed version is cached; `page` is the size, the
    client's formats (formats.signature) and the page token."""
    return f"feed:p{TOKEN_VERSION}:{_item_fields(media_domain.Media, media_domain.Variant)}:{owner_id}:{version}:{page}"


@functools.cache
def _item_fields(media: type, variant: type) -> str:
    """A short name of the fields a cached page's items have. Pages are read back with Media(**item),
    which refuses a field it lacks: a release that adds, drops or renames one caches its pages
    under other keys, so that replicas of two releases never read each other's pages."""
    names = [[field.name for field in dataclasses.fields(shape)] for shape in (media, variant)]
    return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:8]


def version_key(owner_id: str) -> str:
    """The Redis counter that anything changing owner_id's feed increments."""
    return f"feed:v:{owner_id}"


def bump_version_lua(key: str) -> str:
    """The Lua that bumps the version counter named by the Lua expression key, and renews its expiry.

    Feed.changed_many runs it, and jobs' enqueue script embeds it, so that a new
    media's run and its owner's feed bump cost one round trip.
    """
    return f"redis.call('INCR', {key}) redis.call('EXPIRE', {key}, {VERSION_TTL_SECONDS})"


_BUMP_VERSIONS = AsyncScript(
    None,  # type: ignore[arg-type]  # bytes need no client to encode them; every call names one
    f"for i = 1, #KEYS do {bump_version_lua('KEYS[i]')} end".encode(),
)

# Deletes the lock KEYS[1] only if it still holds ARGV[1]: a fill that outlives the lock's
# expiry must not delete the lock another replica has taken since.
_RELEASE_LOCK = AsyncScript(
    None,  # type: ignore[arg-type]  # bytes need no client to encode them; every call names one
    b"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
)


def _to_json(items: list[media_domain.Media]) -> list[dict[str, Any]]:
    rows = [dataclasses.asdict(item) for item in items]
    for row in rows:
        row["thumbhash"] = row["thumbhash"].hex() if row["thumbhash"] is not None else None
    return rows


def _from_json(raw: list[dict[str, Any]]) -> list[media_domain.Media]:
    items = []
    for values in raw:
        variants = tuple(media_domain.Variant(**v) for v in values.pop("variants"))
        for key in ("created_at", "saved_at", "expires_at", "next_attempt_at", "taken_at"):
            if values[key] is not None:
                values[key] = datetime.fromisoformat(values[key])
        values["media_id"] = uuid.UUID(values["media_id"])
        if values["thumbhash"] is not None:
            values["thumbhash"] = bytes.fromhex(values["thumbhash"])
        values["requested_formats"] = tuple(values["requested_formats"])
        items.append(media_domain.Media(**values, variants=variants))
    return items


def _etag(payload: _Payload, preferred: str) -> str:
    # Signed URLs are made per response, so the etag covers the rows, not the URLs; and the
    # formats the client prefers, which decide the variants each row is answered with. The
    # formats asked for but not made yet change no answer, so they leave it alone.
    shown = {**payload, "items": [{k: v for k, v in item.items() if k != "requested_formats"} for item in payload["items"]]}
    canonical = json.dumps({"page": shown, "formats": preferred}, sort_keys=True, default=str).encode()
    return hashlib.sha256(canonical).hexdigest()[:32]


class Feed:
    def __init__(self, pool: asyncpg.Pool, redis: Redis | None, ttl_seconds: int, tokens: PageTokens) -> None:
        self.pool = pool
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self._tokens = tokens
        self._inflight: dict[str, asyncio.Task[_PageJson]] = {}

    async def page(self, owner_id: str, requested_size: int, page_token: str, preferred: Sequence[str] = ()) -> Page:
        """A page of the owner's media; `preferred` (formats.preference) is the client's, which the etag covers."""
        size = page_size(requested_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        # Verified before the cache: the token is part of the page's key, so only issued tokens make keys.
        after = self._tokens.decode(LISTING, owner_id, page_token) if page_token else None
        named = formats.signature(preferred)
        as_json = await self._cached(owner_id, f"{size}:{named}:{page_token}", lambda: self._compute(owner_id, size, after, named))
        payload = json.loads(as_json)
        return Page(_from_json(payload["items"]), payload["next_page_token"], payload["etag"])

    async def changed(self, owner_id: str) -> None:
        """Makes the owner's next feed call recompute; a Redis outage only delays that by one TTL."""
        await self.changed_many((owner_id,))

    async def changed_many(self, owner_ids: Iterable[str]) -> None:
        """`changed` for many owners in one round trip (the cleanup jobs touch thousands)."""
        owners = list(owner_ids)
        if self.redis is None or not owners:
            return
        try:
            await _BUMP_VERSIONS([version_key(owner_id) for owner_id in owners], [], client=self.redis)
        except (RedisError, OSError):
            self._invalidation_failed(owners)

    @staticmethod
    def _invalidation_failed(owners: list[str]) -> None:
        metrics.REDIS_FALLBACKS.labels("feed_invalidate").inc()
        log.warning("feed invalidation failed", extra={"owners": len(owners), "example": owners[0]}, exc_info=True)

    async def _compute(
        self, owner_id: str, size: int, after: tuple[datetime, uuid.UUID] | None, preferred: str
    ) -> _Computed:
        items, more = await media_domain.page(self.pool, owner_id, size, after)
        next_token = self._tokens.encode(LISTING, owner_id, items[-1].created_at, items[-1].media_id) if more else ""
        payload: _Payload = {"items": _to_json(items), "next_page_token": next_token}
        payload["etag"] = _etag(payload, preferred)
        # Only unsaved ephemeral media has an expires_at (saving clears it).
        first_expiry = min((item.expires_at for item in items if item.expires_at is not None), default=None)
        return _Computed(json.dumps(payload, default=str), first_expiry)

    async def _cached(self, owner_id: str, page: str, compute: Callable[[], Awaitable[_Computed]]) -> _PageJson:
        redis = self.redis
        if redis is None:
            return (await compute()).text
        try:
            version = int(await redis.getex(version_key(owner_id), ex=VERSION_TTL_SECONDS) or 0)
            key = page_key(owner_id, version, page)
            cached = await redis.get(key)
        except (RedisError, OSError):
            metrics.REDIS_FALLBACKS.labels("feed_read").inc()
            return (await compute()).text
        if cached is not None:
            metrics.FEED_CACHE.labels("hit").inc()
            hit: _PageJson = cached
            return hit
        metrics.FEED_CACHE.labels("miss").inc()
        fill = self._inflight.get(key)
        if fill is None:
            # A task of its own, so that a caller going away (deadline, disconnect) cancels only
            # its own wait, never the fill the page's other callers are waiting for.
            fill = asyncio.create_task(self._fill(redis, key, compute))
            self._inflight[key] = fill
            fill.add_done_callback(lambda _: self._inflight.pop(key))
        return await asyncio.shield(fill)

    async def _fill(self, redis: Redis, key: str, compute: Callable[[], Awaitable[_Computed]]) -> _PageJson:
        lock = f"{key}:lock"
        token = secrets.token_hex(16)
        try:
            locked = await redis.set(lock, token, nx=True, ex=_LOCK_SECONDS)
            waits = int(_LOCK_SECONDS / _LOCK_WAIT_STEP)
            # Another process is computing this page: wait for its result, briefly.
            while not locked and waits:
                await asyncio.sleep(_LOCK_WAIT_STEP)
                waits -= 1
                cached, holder = await redis.mget(key, lock)
                if cached is not None:
                    filled: _PageJson = cached
                    return filled
                if holder is None:
                    # Its fill ended without a page (its query failed, or the page was not to be
                    # cached): the wait is over, and one of the waiters computes in its place.
                    locked = await redis.set(lock, token, nx=True, ex=_LOCK_SECONDS)
        except (RedisError, OSError):
            metrics.REDIS_FALLBACKS.labels("feed_lock").inc()
            return (await compute()).text
        try:
            page = await compute()
            ttl_ms = self._ttl_ms(page.first_expiry)
            try:
                if ttl_ms > 0:
                    await redis.set(key, page.text, px=ttl_ms)
            except (RedisError, OSError):
                metrics.REDIS_FALLBACKS.labels("feed_write").inc()
            return page.text
        finally:
            # Released when the fill fails too, so that the next miss computes at once rather
            # than after the lock's expiry.
            if locked:
                await self._release(redis, lock, token)

    def _ttl_ms(self, first_expiry: datetime | None) -> int:
        """How long a page stays cached: an item leaving it by its expiry bumps no feed version,
        so the page must not outlive the first item to expire (0: not cached at all)."""
        ttl_ms = self.ttl_seconds * 1000
        if first_expiry is None:
            return ttl_ms
        return max(0, min(ttl_ms, int((first_expiry - datetime.now(UTC)).total_seconds() * 1000)))

    @staticmethod
    async def _release(redis: Redis, lock: str, token: str) -> None:
        try:
            await _RELEASE_LOCK([lock], [token], client=redis)
        except (RedisError, OSError):
            metrics.REDIS_FALLBACKS.labels("feed_write").inc()
