from __future__ import annotations

import asyncio
import importlib
import json
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from mediavault import cli, devservers
from mediavault.config import Settings
from mediavault.db import create_pool, migrate
from mediavault.db.migrate import MIGRATION_LOCK_ID, NO_TRANSACTION, MigrationBlocked, available_migrations, statements
from mediavault.domain import accounts, cleanup
from tests.conftest import JWT_SECRET
from tests.helpers import MISREAD_ZONES, set_session_defaults

# The module, which mediavault.db's function of the same name hides.
migrations = importlib.import_module("mediavault.db.migrate")


@pytest.fixture
async def scratch_database(postgres_admin_url: str) -> AsyncIterator[str]:
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    yield dsn
    await devservers.drop_database(postgres_admin_url, dsn)


async def apply_before(conn: asyncpg.Connection, first_pending: str) -> None:
    """The schema and ledger as migrate leaves them before the migration named first_pending."""
    await conn.execute("CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
    for name, sql in available_migrations():
        if name.startswith(first_pending):
            return
        await conn.execute(sql)
        await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)


async def test_replicas_migrating_at_once_apply_each_migration_once(postgres_admin_url):
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    try:
        results = await asyncio.gather(*(migrate(dsn) for _ in range(4)))
        names = [name for name, _ in available_migrations()]
        assert sorted(sum(results, [])) == sorted(names), "every migration applied by exactly one replica"
        assert await migrate(dsn) == []
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(names)
        finally:
            await conn.close()
    finally:
        await devservers.drop_database(postgres_admin_url, dsn)


async def test_replicas_migrating_at_once_through_pgbouncer_apply_each_migration_once_and_leave_no_lock(
    postgres_admin_url, pgbouncer_database_url
):
    # Transaction mode gives each transaction whichever server session is free: a session-level
    # lock would be released on another session than the one holding it, and stay held.
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    pooled = devservers.with_database(pgbouncer_database_url, urlsplit(dsn).path.lstrip("/"))
    try:
        results = await asyncio.wait_for(asyncio.gather(*(migrate(pooled) for _ in range(4))), timeout=60)
        names = [name for name, _ in available_migrations()]
        assert sorted(sum(results, [])) == sorted(names), "every migration applied by exactly one replica"
        assert await asyncio.wait_for(migrate(pooled), timeout=60) == []
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(names)
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                " WHERE l.locktype = 'advisory' AND d.datname = current_database()"
            )
            assert held == 0
        finally:
            await conn.close()
    finally:
        await devservers.drop_database(postgres_admin_url, dsn)


async def test_migrations_run_in_the_sessions_of_the_app_whatever_the_database_defaults_to(
    postgres_admin_url, scratch_database, monkeypatch
):
    await set_session_defaults(postgres_admin_url, scratch_database, MISREAD_ZONES[0])
    probe = "CREATE TABLE {} AS SELECT current_setting('TimeZone') AS timezone, current_setting('DateStyle') AS datestyle;"
    monkeypatch.setattr(migrations, "available_migrations", lambda: [
        ("0001_in_transaction", probe.format("in_transaction")),
        ("0002_outside_transaction", f"{NO_TRANSACTION}\n{probe.format('outside_transaction')}"),
    ])
    assert await migrate(scratch_database) == ["0001_in_transaction", "0002_outside_transaction"]

    pool = await create_pool(Settings(database_url=scratch_database, jwt_secret=JWT_SECRET))
    try:
        for table in ("in_transaction", "outside_transaction"):
            assert tuple(await pool.fetchrow(f"SELECT * FROM {table}")) == ("UTC", "ISO, YMD"), table
        assert tuple(await pool.fetchrow("SELECT current_setting('TimeZone'), current_setting('DateStyle')")) == ("UTC", "ISO, YMD")
    finally:
        await pool.close()


async def test_ledger_is_append_only(pool):
    await pool.execute(
        "INSERT INTO accounts (user_id, quota_bytes) VALUES ('ledger-probe', 10) ON CONFLICT DO NOTHING"
    )
    await pool.execute("INSERT INTO ledger_entries (user_id, kind, quota_delta) VALUES ('ledger-probe', 'grant', 10)")
    for statement in (
        "UPDATE ledger_entries SET quota_delta = 0 WHERE user_id = 'ledger-probe'",
        "DELETE FROM ledger_entries WHERE user_id = 'ledger-probe'",
        "TRUNCATE ledger_entries CASCADE",
    ):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await pool.execute(statement)
    assert await pool.fetchval("SELECT sum(quota_delta) FROM ledger_entries WHERE user_id = 'ledger-probe'") == 10


@pytest.mark.parametrize(
    ("used", "reserved", "quota"),
    [(-1, 0, 10), (0, -1, 10), (6, 5, 10)],
)
async def test_quota_invariant_is_a_constraint(pool, used, reserved, quota):
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "INSERT INTO accounts (user_id, quota_bytes, used_bytes, reserved_bytes) VALUES ('bad', $1, $2, $3)",
            quota, used, reserved,
        )


def _index_names(plan: dict) -> set[str]:
    names = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", ()):
        names |= _index_names(child)
    return names


@pytest.mark.parametrize(
    ("statement", "args", "index"),
    [
        (accounts._SUMMARY, ("someone",), "uploads_pending_oldest"),
        (cleanup._STUCK, (500, 3600.0, 3), "media_stuck"),
    ],
)
async def test_queries_of_dropped_indexes_keep_an_index(pool, statement, args, index):
    # 0005 dropped uploads_pending_by_user and media_unfinished as redundant: the queries
    # they served must still find the index that replaced them, not fall back to a scan.
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args))[0]["Plan"]
    assert index in _index_names(plan)
    names = await pool.fetchval(
        "SELECT array_agg(indexname) FROM pg_indexes WHERE indexname IN ('uploads_pending_by_user', 'media_unfinished')"
    )
    assert names is None


async def test_derived_bytes_are_backfilled_from_the_variants_of_media_not_deleted(postgres_admin_url):
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    conn = await asyncpg.connect(dsn)
    try:
        # The schema before 0012, with an account owning a live and a deleted media, each with variants.
        await apply_before(conn, "0012")
        await conn.execute("INSERT INTO accounts (user_id, quota_bytes, used_bytes) VALUES ('u', 1000000, 300)")
        for n, deleted in ((1, False), (2, True)):
            await conn.execute(
                "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, state, object_key,"
                " media_id, expires_at) VALUES ($1, 'u', 'a.jpg', 'image/jpeg', 100 * $2, 'permanent', 'finalized', $3, $1, now())",
                uuid.UUID(int=n), n, f"originals/{n}",
            )
            await conn.execute(
                "INSERT INTO media (media_id, owner_id, upload_id, kind, content_type, size_bytes, object_key, retention,"
                " deleted_at) VALUES ($1, 'u', $1, 'image', 'image/jpeg', 100 * $2, $3, 'permanent', CASE WHEN $4 THEN now() END)",
                uuid.UUID(int=n), n, f"originals/{n}", deleted,
            )
            await conn.executemany(
                "INSERT INTO media_variants (media_id, name, version, object_key, content_type, width, height, size_bytes)"
                " VALUES ($1, $2, 0, $3, $4, 10, 10, $5)",
                [
                    (uuid.UUID(int=n), name, f"variants/{n}/{name}.{content_type[6:]}", content_type, size * n)
                    for name, content_type, size in (("thumbnail", "image/jpeg", 10), ("thumbnail", "image/avif", 7), ("preview", "image/jpeg", 30))
                ],
            )

        assert await migrate(dsn) == [name for name, _ in available_migrations() if name >= "0012"]
        assert dict(await conn.fetch("SELECT media_id, derived_bytes FROM media ORDER BY media_id")) == {
            uuid.UUID(int=1): 47, uuid.UUID(int=2): 94,
        }
        assert await conn.fetchval("SELECT derived_bytes FROM accounts WHERE user_id = 'u'") == 47, "the deleted media's are not the account's"
    finally:
        await conn.close()
        await devservers.drop_database(postgres_admin_url, dsn)


async def test_a_migration_behind_a_long_transaction_gives_up_without_holding_up_the_tables_readers(
    scratch_database, monkeypatch
):
    monkeypatch.setattr(migrations, "LOCK_TIMEOUT_SECONDS", 0.2)
    monkeypatch.setattr(migrations, "RETRY_DELAYS_SECONDS", (0.1, 0.2, 0.4))
    setup, long_reader, reader = [await asyncpg.connect(scratch_database) for _ in range(3)]
    try:
        await apply_before(setup, "0012")  # whose first statement is an ALTER TABLE media
        long_transaction = long_reader.transaction(isolation="repeatable_read", readonly=True)
        await long_transaction.start()
        await long_reader.fetchval("SELECT count(*) FROM media")
        # A feed read queued behind the migration for as long as the long transaction lasts fails here.
        await reader.execute("SET statement_timeout = '2s'")

        migration = asyncio.create_task(migrate(scratch_database))
        waits = []
        while not migration.done():
            started = asyncio.get_running_loop().time()
            await reader.fetchval("SELECT count(*) FROM media WHERE owner_id = 'someone' AND deleted_at IS NULL")
            waits.append(asyncio.get_running_loop().time() - started)
            await asyncio.sleep(0.05)
        with pytest.raises(MigrationBlocked, match="^migration 0012_derived_bytes not applied: a long transaction holds a table"):
            await migration
        assert len(waits) > 10
        assert max(waits) < 1, "a reader waits at most one attempt's lock_timeout"
        assert await setup.fetchval("SELECT count(*) FROM schema_migrations WHERE name >= '0012'") == 0

        await long_transaction.rollback()
        assert await migrate(scratch_database) == [name for name, _ in available_migrations() if name >= "0012"]
    finally:
        for conn in (setup, long_reader, reader):
            await conn.close()


async def test_a_blocked_migration_ends_the_command_with_its_message(scratch_database, monkeypatch):
    monkeypatch.setattr(migrations, "LOCK_TIMEOUT_SECONDS", 0.2)
    monkeypatch.setattr(migrations, "RETRY_DELAYS_SECONDS", (0.1,))
    monkeypatch.setenv("MEDIAVAULT_DATABASE_URL", scratch_database)
    setup, long_reader = [await asyncpg.connect(scratch_database) for _ in range(2)]
    try:
        await apply_before(setup, "0012")
        async with long_reader.transaction(isolation="repeatable_read", readonly=True):
            await long_reader.fetchval("SELECT count(*) FROM media")
            with pytest.raises(SystemExit) as ended:
                await asyncio.to_thread(cli.main, ["migrate"])
        assert str(ended.value.code).startswith("migration 0012_derived_bytes not applied: a long transaction holds a table")
    finally:
        for conn in (setup, long_reader):
            await conn.close()


async def test_an_index_build_goes_on_while_a_replica_waits_for_the_migration_lock(scratch_database):
    # A replica waiting for the lock must hold no snapshot meanwhile: the replica holding it may be
    # building an index concurrently, which waits for every older snapshot to go.
    holder, builder = [await asyncpg.connect(scratch_database) for _ in range(2)]
    try:
        await builder.execute("CREATE TABLE probe (n integer)")
        migrating = holder.transaction()
        await migrating.start()
        # A simple query (no arguments), as migrate's last before it builds an index: one sent with
        # arguments leaves its portal, and the portal's snapshot, open until the next statement.
        await holder.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
        waiting = asyncio.create_task(migrate(scratch_database))
        while await builder.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()") < 3:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        try:
            await asyncio.wait_for(builder.execute("CREATE INDEX CONCURRENTLY probe_n ON probe (n)"), timeout=5)
        finally:
            await migrating.rollback()
        assert await waiting == [name for name, _ in available_migrations()]
    finally:
        for conn in (holder, builder):
            await conn.close()


def test_a_no_transaction_migration_is_split_at_lines_ending_in_a_semicolon():
    sql = "\n".join([
        "-- mediavault: no-transaction",
        "-- a comment; not a statement;",
        "DROP INDEX CONCURRENTLY IF EXISTS a;",
        "CREATE INDEX CONCURRENTLY a",
        "    ON t (x) WHERE y = ';' ;  ",
        "",
        "SELECT 1; SELECT 2;",
    ])
    assert statements(sql) == [
        "DROP INDEX CONCURRENTLY IF EXISTS a;",
        "CREATE INDEX CONCURRENTLY a\n    ON t (x) WHERE y = ';' ;",
        "SELECT 1; SELECT 2;",
    ]
    with pytest.raises(ValueError, match="no semicolon ends the last statement: 'CREATE INDEX b ON t \\(x\\)'"):
        statements("DROP INDEX a;\nCREATE INDEX b ON t (x)\n-- done\n")


async def index_definitions(conn: asyncpg.Connection, name: str) -> list[tuple[str, bool]]:
    rows = await conn.fetch(
        "SELECT pg_get_indexdef(i.indexrelid), i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = $1", name
    )
    return [tuple(r) for r in rows]


async def test_a_no_transaction_migration_cut_short_runs_again_to_a_valid_index(scratch_database):
    conn = await asyncpg.connect(scratch_database)
    try:
        assert await migrate(scratch_database) == [name for name, _ in available_migrations()]
        built = ("CREATE INDEX media_object_key ON public.media USING btree (object_key) WHERE (purged_at IS NULL)", True)
        assert await index_definitions(conn, "media_object_key") == [built]

        # A build cut short, as by a crash before the migration was recorded: one that failed on
        # duplicates leaves its index behind, INVALID, as a cancelled or killed one does.
        await conn.execute("DELETE FROM schema_migrations WHERE name = '0016_media_object_key_index'")
        await conn.execute("DROP INDEX media_object_key")
        await conn.execute(
            "INSERT INTO accounts (user_id, quota_bytes) VALUES ('u', 1000);"
            "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, state, object_key, media_id,"
            " expires_at) SELECT id, 'u', 'a.jpg', 'image/jpeg', 1, 'permanent', 'finalized', 'originals/' || id, id, now()"
            " FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 2)) g;"
            "INSERT INTO media (media_id, owner_id, upload_id, kind, content_type, size_bytes, object_key, retention)"
            " SELECT media_id, user_id, upload_id, 'image', content_type, size_bytes, object_key, retention FROM uploads"
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("CREATE UNIQUE INDEX CONCURRENTLY media_object_key ON media (owner_id)")
        assert await index_definitions(conn, "media_object_key") == [
            ("CREATE UNIQUE INDEX media_object_key ON public.media USING btree (owner_id)", False)
        ]

        assert await migrate(scratch_database) == ["0016_media_object_key_index"]
        assert await index_definitions(conn, "media_object_key") == [built]
    finally:
        await conn.close()
async def test_the_writer_lease_migration_holds_up_no_statement_behind_a_writer_of_the_previous_release(postgres_admin_url):
    """0015 needs ACCESS EXCLUSIVE on upload_progress, where a writer of the previous release holds
    ROW SHARE for as long as it writes a chunk: it waits a moment per try, so that the statements
    queued behind it (that writer's own checkpoints among them) go on, and lands once the writer is done."""
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    conn, old_writer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    upload_id = uuid.uuid4()
    try:
        await conn.execute("CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        for name, sql in available_migrations():
            if name.startswith("0015"):
                break
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
        await conn.execute("INSERT INTO accounts (user_id, quota_bytes, reserved_bytes) VALUES ('u', 1000, 100)")
        await conn.execute(
            "INSERT INTO uploads (upload_id, user_id, filename, content_type, size_bytes, retention, object_key, expires_at, protocol)"
            " VALUES ($1, 'u', 'a.jpg', 'image/jpeg', 100, 'permanent', 'originals/x', now() + interval '1 hour', 'tus')",
            upload_id,
        )
        await conn.execute("INSERT INTO upload_progress (upload_id) VALUES ($1)", upload_id)

        async with old_writer.transaction():
            await old_writer.execute("SELECT 1 FROM upload_progress WHERE upload_id = $1 FOR NO KEY UPDATE NOWAIT", upload_id)
            migrating = asyncio.create_task(migrate(dsn))
            for received in range(1, 6):
                await asyncio.sleep(0.3)
                started = asyncio.get_running_loop().time()
                await asyncio.wait_for(
                    conn.execute(
                        "INSERT INTO upload_checkpoints (upload_id, received_bytes, sha256_state, head) VALUES ($1, $2, '', '')"
                        " ON CONFLICT (upload_id) DO UPDATE SET received_bytes = excluded.received_bytes",
                        upload_id, received,
                    ),
                    timeout=2,
                )
                assert asyncio.get_running_loop().time() - started < 0.5
            assert not migrating.done(), "the ALTER cannot have its lock while the old writer holds the table"
        assert await asyncio.wait_for(migrating, timeout=5) == [name for name, _ in available_migrations() if name >= "0015"]
        assert await conn.fetchval("SELECT writer IS NULL AND lease_until IS NULL FROM upload_progress WHERE upload_id = $1", upload_id)
    finally:
        await old_writer.close()
        await conn.close()
        await devservers.drop_database(postgres_admin_url, dsn)
