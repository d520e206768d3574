"""Feed invalidation against a real Redis."""

from __future__ import annotations

from redis.asyncio import Redis

from mediavault import metrics
from mediavault.domain.feed import VERSION_TTL_SECONDS, Feed, version_key
from mediavault.domain.pages import PageTokens

TOKENS = PageTokens(b"test-page-token-key")


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
        assert await redis.exists(f"feed:p:{user_id}:1:20::")
        await redis.delete(version_key(user_id))
        assert (await feed.page(user_id, 20, "")).etag == first.etag
        assert await redis.exists(f"feed:p:{user_id}:0:20::")
    finally:
        keys = [k async for k in redis.scan_iter(match=f"feed:*{user_id}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
