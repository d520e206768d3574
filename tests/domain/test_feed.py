"""The feed's cache against real PostgreSQL and Redis: invalidation, and concurrent misses of one page."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import pytest
from redis.asyncio import Redis

from mediavault import metrics
from mediavault.domain import media as media_domain
from mediavault.domain.feed import VERSION_TTL_SECONDS, Feed, page_key, version_key
from mediavault.domain.media import Variant
from mediavault.domain.pages import PageTokens

TOKENS = PageTokens(b"test-page-token-key")


@pytest.fixture
async def redis(redis_url: str, user_id: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    try:
        yield redis
    finally:
        keys = [k async for k in redis.scan_iter(match=f"feed:*{user_id}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


@pytest.fixture
async def one_connection_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool whose only connection a test can hold, so that a page's query waits until it lets go."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    yield pool
    await pool.close()


async def media_with_a_thumbnail(pool: asyncpg.Pool, owner: str, count: int) -> list[uuid.UUID]:
    """count media rows of a new owner's, newest first, each with a thumbnail, in the books as finalize
    and the transcode leave them (the suite's other tests audit the whole ledger)."""
    ids = [uuid.uuid4() for _ in range(count)]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO accounts (user_id, quota_bytes, used_bytes, derived_bytes) VALUES ($1, 1000000, $2, $3)", owner, 100 * count, 5 * count)
        await conn.execute("INSERT INTO ledger_entries (user_id, kind, quota_delta) VALUES ($1, 'grant', 1000000)", owner)
        for age, media_id in enumerate(ids):
            key = f"originals/{media_id}"
            await conn.execute(
                "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, state, object_key, media_id, expires_at) "
                "VALUES ($1, $2, 'x.jpg', 'image/jpeg', 100, 'permanent', 'finalized', $3, $1, now())", media_id, owner, key)
            await conn.execute(
                "INSERT INTO media (media_id, owner_id, upload_id, kind, content_type, size_bytes, derived_bytes, object_key, retention, "
                "processing_status, created_at) VALUES ($1, $2, $1, 'image', 'image/jpeg', 100, 5, $3, 'permanent', 'complete', "
                "now() - make_interval(secs => $4))", media_id, owner, key, float(age))
            await conn.execute(
                "INSERT INTO media_variants (media_id, name, version, object_key, content_type, width, height, size_bytes) "
                "VALUES ($1, 'thumbnail', 0, $2, 'image/jpeg', 10, 10, 5)", media_id, f"variants/{media_id}/thumbnail.jpg")
            await conn.execute("INSERT INTO ledger_entries (user_id, kind, used_delta, media_id) VALUES ($1, 'commit', 100, $2)", owner, media_id)
    return ids


def thumbnail(media_id: uuid.UUID) -> Variant:
    return Variant("thumbnail", f"variants/{media_id}/thumbnail.jpg", "image/jpeg", 10, 10, 5)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


def misses() -> float:
    return metrics.FEED_CACHE.labels("miss")._value.get()


async def test_changed_many_bumps_every_owner_once_in_one_round(pool, redis_url, user_id):
    owners = [f"{user_id}-{i}" for i in range(300)]
    redis = Redis.from_url(redis_url)
    try:
        feed = Feed(pool, redis, ttl_seconds=30, tokens=TOKENS)
        await feed.changed(owners[0])
        await feed.changed_many(owners)
        versions = [int(v) for v in await redis.mget([f"feed:v:{o}" for o in owners])]
        assert versions == [2] + [1] * 299
        for owner in (owners[0], owners[299]):
            assert VERSION_TTL_SECONDS - 60 < await redis.ttl(version_key(owner)) <= VERSION_TTL_SECONDS
        await feed.changed_many([])
    finally:
        await redis.delete(*(f"feed:v:{o}" for o in owners))
        await redis.aclose()


async def test_changed_many_with_redis_down_counts_a_fallback_and_does_not_raise(pool, user_id):
    redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    fallbacks = metrics.REDIS_FALLBACKS.labels("feed_invalidate")
    before = fallbacks._value.get()
    try:
        await Feed(pool, redis, ttl_seconds=30, tokens=TOKENS).changed_many([user_id, f"{user_id}-b"])
    finally:
        await redis.aclose()
    assert fallbacks._value.get() == before + 1


async def test_a_feed_read_keeps_the_version_alive_and_an_expired_version_restarts_uncached(pool, redis_url, user_id):
    redis = Redis.from_url(redis_url)
    try:
        feed = Feed(pool, redis, ttl_seconds=30, tokens=TOKENS)
        await feed.changed(user_id)
        await redis.expire(version_key(user_id), 100)
        first = await feed.page(user_id, 20, "")
        assert VERSION_TTL_SECONDS - 60 < await redis.ttl(version_key(user_id)) <= VERSION_TTL_SECONDS
        assert first.items == []
        assert await redis.exists(page_key(user_id, 1, "20::"))
        await redis.delete(version_key(user_id))
        assert (await feed.page(user_id, 20, "")).etag == first.etag
        assert await redis.exists(page_key(user_id, 0, "20::"))
    finally:
        keys = [k async for k in redis.scan_iter(match=f"feed:*{user_id}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_concurrent_misses_of_one_page_each_get_the_whole_page(pool, one_connection_pool, redis, user_id):
    ids = await media_with_a_thumbnail(pool, user_id, 3)
    feed = Feed(one_connection_pool, redis, ttl_seconds=30, tokens=TOKENS)
    before = misses()
    # Every caller misses before the page's query can run, so all of them share its one fill.
    async with one_connection_pool.acquire():
        reads = [asyncio.create_task(feed.page(user_id, 20, "")) for _ in range(6)]
        await until(lambda: misses() >= before + 6)
    pages = await asyncio.gather(*reads)
    assert [(item.media_id, item.variants) for item in pages[0].items] == [(i, (thumbnail(i),)) for i in ids]
    assert all(page == pages[0] for page in pages)
    assert await feed.page(user_id, 20, "") == pages[0], "the cached page reads back the same"


async def test_a_caller_going_away_leaves_the_page_to_the_others_and_the_lock_is_released(
    pool, one_connection_pool, redis, user_id
):
    ids = await media_with_a_thumbnail(pool, user_id, 2)
    feed = Feed(one_connection_pool, redis, ttl_seconds=30, tokens=TOKENS)
    before = misses()
    async with one_connection_pool.acquire():
        first = asyncio.create_task(feed.page(user_id, 20, ""))
        second = asyncio.create_task(feed.page(user_id, 20, ""))
        await until(lambda: misses() >= before + 2)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    page = await second
    assert [item.media_id for item in page.items] == ids
    assert await redis.exists(page_key(user_id, 0, "20::")), "the fill the first caller began went on and cached the page"
    assert not await redis.exists(page_key(user_id, 0, "20::") + ":lock")


async def test_a_failed_fill_releases_its_lock(database_url, redis, user_id):
    closed = await asyncpg.create_pool(database_url, min_size=0, max_size=1)
    await closed.close()
    feed = Feed(closed, redis, ttl_seconds=30, tokens=TOKENS)
    with pytest.raises(asyncpg.InterfaceError):
        await feed.page(user_id, 20, "")
    assert not await redis.exists(page_key(user_id, 0, "20::") + ":lock"), "the next miss computes without waiting out the lock"


async def test_a_miss_waiting_for_another_replicas_fill_computes_at_once_when_that_fill_ends_without_a_page(
    pool, redis, user_id
):
    ids = await media_with_a_thumbnail(pool, user_id, 2)
    lock = page_key(user_id, 0, "20::") + ":lock"
    await redis.set(lock, "another replica", ex=30)
    read = asyncio.create_task(Feed(pool, redis, ttl_seconds=30, tokens=TOKENS).page(user_id, 20, ""))
    await asyncio.sleep(0.5)
    assert not read.done(), "it waits for the other replica's page"
    # The other replica's query failed, or its page was not to be cached: it lets go of the lock
    # and writes no page.
    await redis.delete(lock)
    async with asyncio.timeout(2):
        page = await read
    assert [item.media_id for item in page.items] == ids
    assert await redis.exists(page_key(user_id, 0, "20::"))


async def test_a_fill_leaves_the_lock_another_replica_took_after_its_own_expired(one_connection_pool, redis, user_id):
    lock = page_key(user_id, 0, "20::") + ":lock"
    feed = Feed(one_connection_pool, redis, ttl_seconds=30, tokens=TOKENS)
    async with one_connection_pool.acquire():
        read = asyncio.create_task(feed.page(user_id, 20, ""))
        async with asyncio.timeout(10):
            while not await redis.exists(lock):
                await asyncio.sleep(0.005)
        # What another replica does once this fill has held the lock past its expiry.
        await redis.set(lock, "another replica", ex=30)
    assert (await read).items == []
    assert await redis.get(lock) == b"another replica"


async def test_a_cached_page_lasts_no_longer_than_the_first_expiry_on_it(pool, redis, user_id):
    ids = await media_with_a_thumbnail(pool, user_id, 3)
    expires_at = await pool.fetchval(
        "UPDATE media SET retention = 'ephemeral', expires_at = now() + interval '2 seconds' WHERE media_id = $1 RETURNING expires_at",
        ids[1])
    feed = Feed(pool, redis, ttl_seconds=300, tokens=TOKENS)
    first = await feed.page(user_id, 20, "")
    assert [item.media_id for item in first.items] == ids
    # An expiry bumps no feed version: the cached page ends with it instead.
    assert 0 < await redis.pttl(page_key(user_id, 0, "20::")) <= 2000

    await asyncio.sleep((expires_at - datetime.now(UTC)).total_seconds() + 0.1)
    later = await feed.page(user_id, 20, "")
    assert [item.media_id for item in later.items] == [ids[0], ids[2]]
    assert later.etag != first.etag
    assert 290_000 < await redis.pttl(page_key(user_id, 0, "20::")) <= 300_000, "no item on it expires"


async def test_a_page_another_release_cached_is_not_served(pool, redis, user_id):
    # During a rolling deploy, replicas of the previous release cache pages whose tokens (named
    # the list alone) this release refuses; they cached them under this key.
    ids = await media_with_a_thumbnail(pool, user_id, 1)
    await redis.set(f"feed:p:{user_id}:0:20::", '{"items": [], "next_page_token": "old", "etag": "old"}', ex=60)
    page = await Feed(pool, redis, ttl_seconds=300, tokens=TOKENS).page(user_id, 20, "")
    assert [item.media_id for item in page.items] == ids


@dataclasses.dataclass(frozen=True)
class MediaOfALaterRelease(media_domain.Media):
    a_later_field: int = 0


async def test_a_page_a_release_with_other_media_fields_cached_is_not_served(pool, redis, user_id, monkeypatch):
    # During a rolling deploy, replicas of the release that adds a field to Media cache pages
    # whose items have it; this release's Media takes no such field.
    ids = await media_with_a_thumbnail(pool, user_id, 1)
    feed = Feed(pool, redis, ttl_seconds=300, tokens=TOKENS)
    with monkeypatch.context() as later_release:
        later_release.setattr(media_domain, "Media", MediaOfALaterRelease)
        assert [type(item) for item in (await feed.page(user_id, 20, "")).items] == [MediaOfALaterRelease]
    page = await feed.page(user_id, 20, "")
    assert [(type(item), item.media_id) for item in page.items] == [(media_domain.Media, ids[0])]
