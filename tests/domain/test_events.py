"""usage_events' day partitions (migrations 0011, 0018): made ahead, safe to make from many
replicas at once, made by an insert that finds none, UTC days whatever the session's TimeZone
and DateStyle, and counters kept with the events."""

from __future__ import annotations

import asyncio
import json
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
from mediavault.errors import IdempotencyConflict
from tests.helpers import MISREAD_ZONES, UTC_SESSION, midnight, partition_days, set_session_defaults


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


@pytest.fixture(params=MISREAD_ZONES)
async def misread_zone_database(request, postgres_admin_url: str) -> AsyncIterator[str]:
    """A database of the test's own whose sessions default to a zone far from UTC and the SQL DateStyle."""
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    try:
        await set_session_defaults(postgres_admin_url, dsn, request.param)
        yield dsn
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


async def test_only_media_still_there_is_counted_and_every_event_is_kept(fresh_pool):
    # A database of its own: a_media_row makes an account without the ledger's grant.
    pool = fresh_pool
    owner = f"user-{uuid.uuid4().hex[:12]}"
    present, deleted, expired, saved = [await a_media_row(pool, owner) for _ in range(4)]
    await pool.execute("UPDATE media SET deleted_at = now() WHERE media_id = $1", deleted)
    await pool.execute(
        "UPDATE media SET retention = 'ephemeral', expires_at = now() - interval '1 second' WHERE media_id = ANY($1::uuid[])",
        [expired, saved])
    # Saved before it expired: permanent, with no expires_at.
    await pool.execute("UPDATE media SET retention = 'permanent', saved_at = now(), expires_at = NULL WHERE media_id = $1", saved)
    every = (present, deleted, expired, saved)
    batch = [Event(kind, str(media_id), "feed", None, {}) for media_id in every for kind in ("impression", "like", "share")]

    assert await Events(pool).record(owner, batch) == (12, 0)

    counted = await pool.fetch(
        "SELECT media_id, view_count, like_count, share_count FROM media_counters WHERE media_id = ANY($1::uuid[])", list(every))
    assert {row["media_id"]: tuple(row)[1:] for row in counted} == {present: (1, 1, 1), saved: (1, 1, 1)}
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE media_id = ANY($1::uuid[])", list(every)) == 12


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


async def test_a_database_defaulting_to_another_zone_and_datestyle_gets_utc_days_and_stores_events_at_their_edges(
    misread_zone_database,
):
    dsn = misread_zone_database
    await migrate(dsn)
    # Sessions with the database's defaults, not the app's: the partition functions set their own.
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    utc = await asyncpg.connect(dsn, server_settings=UTC_SESSION)
    try:
        assert await pool.fetchval("SHOW datestyle") == "SQL, DMY"
        today = datetime.now(UTC).date()
        days = await partition_days(utc)
        assert {today + timedelta(days=n) for n in range(PARTITION_DAYS_AHEAD + 1)} <= days.keys()

        owner = f"user-{uuid.uuid4().hex[:12]}"
        media_id = await a_media_row(pool, owner)
        assert await Events(pool).record(owner, [Event("like", str(media_id), "feed", None, {})]) == (1, 0)
        last = today + timedelta(days=PARTITION_DAYS_AHEAD)
        edges = [midnight(today), midnight(today + timedelta(days=1)) - timedelta(microseconds=1), midnight(today + timedelta(days=1)),
                 midnight(last), midnight(last + timedelta(days=1)) - timedelta(microseconds=1)]
        for received_at in edges:
            stored_in = await pool.fetchval(
                "INSERT INTO usage_events (user_id, media_id, event_type, occurred_at, received_at) VALUES ($1, $2, 'click', now(), $3)"
                " RETURNING tableoid::regclass::text", owner, media_id, received_at)
            assert stored_in == days[received_at.date()], received_at

        assert await events.add_partitions(pool, PARTITION_DAYS_AHEAD + 1) == 1, "the day after the migration's last does not overlap it"
        await pool.execute("SELECT usage_events_add_partitions($1, $2)", today - timedelta(days=40), today - timedelta(days=1))
        await pool.execute(
            "INSERT INTO usage_events (user_id, media_id, event_type, occurred_at, received_at) "
            "SELECT $1, $2, 'click', now(), $3::timestamptz - make_interval(days => d) FROM generate_series(1, 40) AS d",
            owner, media_id, midnight(today) + timedelta(hours=12))
        days = await partition_days(utc)
        assert {today + timedelta(days=n) for n in range(-40, PARTITION_DAYS_AHEAD + 2)} == days.keys()

        retention = 30 * 86400
        async with pool.acquire() as conn, conn.transaction():
            dropped = await events.drop_partitions(conn, retention, lock_timeout_ms=1000)
        cutoff_day = (datetime.now(UTC) - timedelta(seconds=retention)).date()
        gone = sorted(day for day in days if day < cutoff_day)
        assert len(gone) == 10
        assert [(r["partition_name"], r["received_before"]) for r in dropped] == [
            (days[day], midnight(day + timedelta(days=1))) for day in gone]
        assert (await partition_days(utc)).keys() == days.keys() - set(gone)
        assert await pool.fetchval("SELECT min(received_at) FROM usage_events") == midnight(cutoff_day) + timedelta(hours=12)
    finally:
        await utc.close()
        await pool.close()


async def test_partitions_made_off_their_utc_day_are_made_again_with_their_events(misread_zone_database):
    dsn = misread_zone_database
    local = await asyncpg.connect(dsn)
    utc = await asyncpg.connect(dsn, server_settings=UTC_SESSION)
    try:
        # 0011 as migrate ran it before it set its session up: under the database's defaults.
        await local.execute("CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        for name, sql in available_migrations():
            if name >= "0012":
                break
            await local.execute(sql)
            await local.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
        with pytest.raises(AssertionError):
            await partition_days(utc)
        bounds = await utc.fetch(
            "SELECT c.relname, m[1]::timestamptz AS lower, m[2]::timestamptz AS upper FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid,"
            " regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') AS m"
            " WHERE i.inhparent = 'usage_events'::regclass ORDER BY lower")
        assert len(bounds) == PARTITION_DAYS_AHEAD + 1
        assert bounds[0]["lower"] != midnight(bounds[0]["lower"].astimezone(UTC).date())
        await local.executemany(
            "INSERT INTO usage_events (user_id, media_id, event_type, occurred_at, received_at) VALUES ('u', gen_random_uuid(), 'click', now(), $1)",
            [(at,) for b in bounds for at in (b["lower"], b["upper"] - timedelta(microseconds=1))])
        old = [dict(r) for r in await utc.fetch("SELECT * FROM usage_events ORDER BY event_id")]

        assert await migrate(dsn) == [name for name, _ in available_migrations() if name >= "0012"]

        days = await partition_days(utc)
        first, last = bounds[0]["lower"].astimezone(UTC).date(), bounds[-1]["upper"].astimezone(UTC).date()
        assert days.keys() == {first + timedelta(days=n) for n in range((last - first).days + 1)}
        assert [dict(r) for r in await utc.fetch("SELECT * FROM usage_events ORDER BY event_id")] == old
        for row in old:
            assert await utc.fetchval(
                "SELECT tableoid::regclass::text FROM usage_events WHERE event_id = $1", row["event_id"]
            ) == days[row["received_at"].astimezone(UTC).date()]
        assert await utc.fetchval("SELECT count(*) FROM pg_class WHERE relname LIKE 'usage_events_p%_off_utc'") == 0
        assert await events.add_partitions(local, (last - datetime.now(UTC).date()).days + 1) == 1
    finally:
        await utc.close()
        await local.close()


async def test_keys_naming_an_ip_address_or_a_coordinate_are_dropped_however_they_are_spelt(pool):
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    personal = {"client_ip": "1.2.3.4", "clientIp": "1.2.3.4", "userIP": "1.2.3.4", "ipv4": "1.2.3.4", "IPv6": "::1",
                "src_ip_hash": "ab12", "remoteAddr": "1.2.3.4:5", "lat": 37.7, "lng": -122.4, "latitude_deg": 37.7,
                "geo": {"lat": 37.7, "lng": -122.4, "lon": -122.4}}
    innocent = {"latency_ms": 12, "clip": "intro", "ship_mode": "fast", "tip": 1}
    assert await Events(pool).record(user_id, [Event("click", str(uuid.uuid4()), "feed", None, {**personal, **innocent})]) == (1, 0)

    stored = await pool.fetchval("SELECT meta FROM usage_events WHERE user_id = $1", user_id)
    assert json.loads(stored) == {**innocent, "geo": {}}


async def test_meta_of_non_ascii_text_is_kept_up_to_the_same_bytes_as_ascii(pool):
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    # About 1 KiB as UTF-8 either way, or as JSON that writes each non-ASCII character as \uXXXX.
    metas = [{"caption": "e" * 256, "title": "f" * 256}, {"caption": "é" * 256, "title": "日" * 256}]
    batch = [Event("click", str(uuid.uuid4()), "feed", None, meta) for meta in metas]
    assert await Events(pool).record(user_id, batch) == (2, 0)

    stored = await pool.fetch("SELECT meta FROM usage_events WHERE user_id = $1 ORDER BY event_id", user_id)
    assert [json.loads(row["meta"]) for row in stored] == metas


async def test_calls_repeating_an_idempotency_key_store_its_batch_once_and_are_answered_alike(fresh_pool):
    pool = fresh_pool
    user_id, other_user = (f"user-{uuid.uuid4().hex[:12]}" for _ in range(2))
    media_id = await a_media_row(pool, user_id)
    batch = [Event("impression", str(media_id), "feed", None, {}), Event("like", str(media_id), "feed", None, {}),
             Event("click", "not-a-uuid", "feed", None, {})]
    recorder = Events(pool)

    answers = await asyncio.gather(*(recorder.record(user_id, batch, "batch-1") for _ in range(6)))
    assert answers == [(2, 1)] * 6
    # A repeat must carry the events the key stored (their times as sent, none here): other
    # events under it are a conflict, and store nothing.
    with pytest.raises(IdempotencyConflict):
        await recorder.record(user_id, batch[:1], "batch-1")
    with pytest.raises(IdempotencyConflict):
        await recorder.record(user_id, [*batch[:2], Event("click", "not-a-uuid", "grid", None, {})], "batch-1")
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE media_id = $1", media_id) == 2
    counters = await pool.fetchrow("SELECT view_count, like_count FROM media_counters WHERE media_id = $1", media_id)
    assert tuple(counters) == (1, 1)

    # The key names one batch of one user; no key is no claim.
    assert await recorder.record(user_id, batch, "batch-2") == (2, 1)
    assert await recorder.record(other_user, batch, "batch-1") == (2, 1)
    assert await recorder.record(user_id, batch) == (2, 1)
    assert await recorder.record(user_id, batch) == (2, 1)
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE media_id = $1", media_id) == 10


async def test_an_idempotency_key_past_its_lifetime_is_deleted_and_its_batch_stored_again(pool):
    user_id, media_id = f"user-{uuid.uuid4().hex[:12]}", uuid.uuid4()
    batch = [Event("impression", str(media_id), "feed", None, {})]
    recorder = Events(pool)
    for key in ("old", "young"):
        assert await recorder.record(user_id, batch, key) == (1, 0)
    await pool.execute(
        "UPDATE usage_event_batches SET recorded_at = now() - $2::interval - interval '1 minute'"
        " WHERE user_id = $1 AND idempotency_key = 'old'", user_id, events.IDEMPOTENCY_KEY_LIFETIME)

    assert await events.drop_idempotency_keys(pool, 1000) >= 1
    keys = await pool.fetch("SELECT idempotency_key FROM usage_event_batches WHERE user_id = $1", user_id)
    assert [row["idempotency_key"] for row in keys] == ["young"]
    for key in ("old", "young"):
        assert await recorder.record(user_id, batch, key) == (1, 0)
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE media_id = $1", media_id) == 3


async def test_a_partition_detached_and_left_in_place_is_attached_again_and_its_day_takes_inserts(fresh_pool):
    pool = fresh_pool
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    today = datetime.now(UTC).date()
    ahead = today + timedelta(days=PARTITION_DAYS_AHEAD)
    before = await partition_days(pool)
    # As an operator may leave them: detached, the tables kept under their names.
    for day in (today, ahead):
        await pool.execute(f'ALTER TABLE usage_events DETACH PARTITION "{before[day]}"')
    await pool.execute(
        f"""INSERT INTO "{before[today]}" (event_id, user_id, media_id, event_type, occurred_at, received_at)"""
        " VALUES (2^40, $1, gen_random_uuid(), 'click', now(), now())", user_id)

    # Today's insert finds no partition, and makes the missing ones: the detached tables are attached.
    batch = [Event("impression", str(uuid.uuid4()), "feed", None, {})]
    assert await Events(pool).record(user_id, batch) == (1, 0)
    assert await partition_days(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", user_id) == 2
    assert await events.add_partitions(pool) == 0


async def test_a_table_of_a_partitions_name_that_cannot_be_attached_is_named_in_the_error(fresh_pool):
    pool = fresh_pool
    ahead = datetime.now(UTC).date() + timedelta(days=PARTITION_DAYS_AHEAD + 1)
    name = f"usage_events_p{ahead:%Y%m%d}"
    await pool.execute(f'CREATE TABLE "{name}" (note text)')
    with pytest.raises(asyncpg.PostgresError, match=name):
        await events.add_partitions(pool, PARTITION_DAYS_AHEAD + 1)
    assert ahead not in await partition_days(pool)


async def half_detached(pool: asyncpg.Pool, partition: str) -> None:
    """Leaves partition as an interrupted `DETACH PARTITION ... CONCURRENTLY` leaves it: its first
    transaction committed (pg_inherits.inhdetachpending), the second never run. After its first
    transaction the detach waits for the transactions that use usage_events, and is cancelled
    while it waits for one kept open."""
    async with pool.acquire() as older, pool.acquire() as detaching, older.transaction():
        await older.fetchval("SELECT count(*) FROM usage_events")
        detach = asyncio.create_task(detaching.execute(f'ALTER TABLE usage_events DETACH PARTITION "{partition}" CONCURRENTLY'))
        pid = detaching.get_server_pid()
        async with asyncio.timeout(10):
            while not await pool.fetchval(
                "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass($1)", f'"{partition}"'
            ):
                await asyncio.sleep(0.02)
        await pool.execute("SELECT pg_cancel_backend($1)", pid)
        with pytest.raises(asyncpg.QueryCanceledError):
            await detach


async def test_a_partition_left_half_detached_is_detached_and_attached_again_and_its_day_takes_inserts(fresh_pool):
    pool = fresh_pool
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    today = datetime.now(UTC).date()
    before = await partition_days(pool)
    await pool.execute(
        f"""INSERT INTO "{before[today]}" (event_id, user_id, media_id, event_type, occurred_at, received_at)"""
        " VALUES (2^40, $1, gen_random_uuid(), 'click', now(), now())", user_id)
    await half_detached(pool, before[today])

    batch = [Event("impression", str(uuid.uuid4()), "feed", None, {})]
    assert await Events(pool).record(user_id, batch) == (1, 0)
    assert await partition_days(pool) == before
    assert not await pool.fetchval("SELECT bool_or(inhdetachpending) FROM pg_inherits WHERE inhparent = 'usage_events'::regclass")
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE user_id = $1", user_id) == 2


async def test_the_half_detached_partition_of_a_past_day_is_left_detached_under_its_name(fresh_pool):
    pool = fresh_pool
    past = datetime.now(UTC).date() - timedelta(days=3)
    await pool.fetchval("SELECT usage_events_add_partitions($1, $1)", past)
    partition = (await partition_days(pool))[past]
    await half_detached(pool, partition)

    assert await events.add_partitions(pool) == 0
    assert past not in await partition_days(pool)
    assert await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{partition}"')
    assert not await pool.fetchval("SELECT EXISTS (SELECT FROM pg_inherits WHERE inhrelid = to_regclass($1))", f'"{partition}"')


async def test_inserts_wait_for_a_partition_drop_until_its_transaction_ends(fresh_pool):
    """What operations.md says: the drop's ACCESS EXCLUSIVE lock on usage_events is held to the end
    of its transaction, not only for its catalog change, so prune_telemetry commits at once."""
    pool = fresh_pool
    past = datetime.now(UTC).date() - timedelta(days=3)
    await pool.fetchval("SELECT usage_events_add_partitions($1, $1)", past)
    insert = "INSERT INTO usage_events (user_id, media_id, event_type, occurred_at) VALUES ('u', gen_random_uuid(), 'like', now())"
    async with pool.acquire() as dropping, pool.acquire() as inserting:
        async with dropping.transaction():
            dropped = await events.drop_partitions(dropping, 86_400, 1000)
            assert [r["partition_name"] for r in dropped] == [f"usage_events_p{past:%Y%m%d}"]
            async with inserting.transaction():
                await inserting.execute("SET LOCAL lock_timeout = '300ms'")
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await inserting.execute(insert)
        await inserting.execute(insert)
    assert past not in await partition_days(pool)
