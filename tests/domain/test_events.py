"""usage_events' day partitions (migration 0011): made ahead, safe to make from many replicas
at once, made by an insert that finds none, and counters kept with the events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlsplit

import asyncpg
import pytest

from mediavault import devservers
from mediavault.db import migrate
from mediavault.db.migrate import available_migrations
from mediavault.domain import events
from mediavault.domain.events import PARTITION_DAYS_AHEAD, Event, Events
from tests.helpers import partition_days


@pytest.fixture
async def fresh_pool(postgres_admin_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database of the test's own, for tests that remove partitions."""
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    try:
        await migrate(dsn)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        await devservers.drop_database(postgres_admin_url, dsn)


async def a_media_row(pool: asyncpg.Pool, owner: str) -> uuid.UUID:
    media_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO accounts (user_id, quota_bytes) VALUES ($1, 1000) ON CONFLICT DO NOTHING", owner)
        await conn.execute(
            "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, state, object_key, media_id, expires_at) "
            "VALUES ($1, $2, 'x.jpg', 'image/jpeg', 100, 'permanent', 'finalized', $3, $1, now())", media_id, owner, f"originals/{media_id}")
        await conn.execute(
            "INSERT INTO media (media_id, owner_id, upload_id, kind, content_type, size_bytes, object_key, retention, processing_status) "
            "VALUES ($1, $2, $1, 'image', 'image/jpeg', 100, $3, 'permanent', 'complete')", media_id, owner, f"originals/{media_id}")
    return media_id


async def test_partitions_exist_for_today_and_the_days_ahead(pool):
    today = datetime.now(UTC).date()
    days = await partition_days(pool)
    assert {today + timedelta(days=n) for n in range(PARTITION_DAYS_AHEAD + 1)} <= days.keys()
    assert await events.add_partitions(pool) == 0, "made once, found the next time"


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
async def test_replicas_adding_partitions_at_once_make_each_day_once(postgres_admin_url, pgbouncer_database_url, through):
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    pooled = devservers.with_database(pgbouncer_database_url, urlsplit(dsn).path.lstrip("/"))
    dsn_used = pooled if through == "pgbouncer" else dsn
    try:
        await migrate(dsn)
        first, last = date(2100, 1, 1), date(2100, 1, 30)
        replicas = [await asyncpg.connect(dsn_used, statement_cache_size=0) for _ in range(6)]
        try:
            made = await asyncio.wait_for(asyncio.gather(
                *(r.fetchval("SELECT usage_events_add_partitions($1, $2)", first, last) for r in replicas)), timeout=60)
        finally:
            for replica in replicas:
                await replica.close()
        assert sum(made) == 30, "every day made by exactly one replica, no replica failed"
        conn = await asyncpg.connect(dsn)
        try:
            days = await partition_days(conn)
            assert {first + timedelta(days=n) for n in range(30)} <= days.keys()
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                " WHERE d.datname = current_database() AND l.relation = 'usage_events'::regclass")
            assert held == 0, "the lock ends with each replica's transaction"
        finally:
            await conn.close()
    finally:
        await devservers.drop_database(postgres_admin_url, dsn)


async def test_an_insert_that_finds_no_partition_for_today_makes_it_and_counts_once(fresh_pool):
    pool = fresh_pool
    owner = f"user-{uuid.uuid4().hex[:12]}"
    media_id = await a_media_row(pool, owner)
    today = datetime.now(UTC).date()
    await pool.execute(f'DROP TABLE "{(await partition_days(pool))[today]}"')
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("INSERT INTO usage_events (user_id, media_id, event_type, occurred_at) VALUES ('u', $1, 'like', now())", media_id)

    batch = [Event("impression", str(media_id), "feed", None, {}), Event("like", str(media_id), "feed", None, {})]
    assert await Events(pool).record(owner, batch) == (2, 0)

    assert today in await partition_days(pool)
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE media_id = $1", media_id) == 2
    counters = await pool.fetchrow("SELECT view_count, like_count, share_count FROM media_counters WHERE media_id = $1", media_id)
    assert tuple(counters) == (1, 1, 0)


async def test_a_check_constraint_violation_is_not_taken_for_a_missing_partition(fresh_pool):
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await fresh_pool.execute(
            "INSERT INTO usage_events (user_id, media_id, event_type, occurred_at) VALUES ('u', gen_random_uuid(), 'unknown', now())")
    assert not events._no_partition(caught.value)


async def test_migration_copies_existing_events_into_their_days(postgres_admin_url):
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    conn = await asyncpg.connect(dsn)
    try:
        before = [(name, sql) for name, sql in available_migrations() if name < "0011"]
        for _name, sql in before:
            await conn.execute(sql)
        await conn.execute("CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        await conn.executemany("INSERT INTO schema_migrations (name) VALUES ($1)", [(name,) for name, _ in before])
        await conn.execute(
            "INSERT INTO usage_events (user_id, media_id, event_type, occurred_at, received_at, meta) "
            "SELECT 'u' || d, gen_random_uuid(), 'click', now(), now() - make_interval(days => d, hours => d), '{\"d\": 1}' "
            "FROM generate_series(0, 12) AS d")
        old = await conn.fetch("SELECT * FROM usage_events ORDER BY event_id")

        assert await migrate(dsn) == [name for name, _ in available_migrations() if name >= "0011"]

        assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = 'usage_events'::regclass") == "p"
        assert [dict(r) for r in await conn.fetch("SELECT * FROM usage_events ORDER BY event_id")] == [dict(r) for r in old]
        days = await partition_days(conn)
        assert {r["received_at"].astimezone(UTC).date() for r in old} <= days.keys()
        for row in old:
            assert await conn.fetchval(
                f'SELECT count(*) FROM "{days[row["received_at"].astimezone(UTC).date()]}" WHERE event_id = $1', row["event_id"]) == 1
        fresh = await conn.fetchval(
            "INSERT INTO usage_events (user_id, media_id, event_type, occurred_at) VALUES ('u', gen_random_uuid(), 'click', now()) RETURNING event_id")
        assert fresh > max(r["event_id"] for r in old), "the identity goes on after the copied ids"
    finally:
        await conn.close()
        await devservers.drop_database(postgres_admin_url, dsn)
