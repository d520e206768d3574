"""Behind PgBouncer in transaction mode (Debian's 1.18, started by tests/conftest.py): why
MEDIAVAULT_DATABASE_POOLER=pgbouncer is needed, and `mediavault serve` / `migrate` as operators run them there.

The concurrency, flow and uploads suites themselves run through PgBouncer too (conftest: stack).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest

from mediavault import devservers
from mediavault.db import create_pool
from mediavault.db.migrate import available_migrations
from mediavault.domain import ledger
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.helpers import fake_jpeg, serve_environment, upload
from tests.test_cli import mediavault
from tests.test_shutdown import audit_ledger, serving

AUDITS = 60


def database_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


async def concurrent_audits(settings) -> list[object]:
    pool = await create_pool(settings)
    try:
        return await asyncio.gather(*(ledger.audit(pool) for _ in range(AUDITS)), return_exceptions=True)
    finally:
        await pool.close()


async def test_cached_statements_fail_behind_pgbouncer_unless_the_pooler_is_set(make_settings, pgbouncer_database_url):
    # Settings that do not say a pooler is in between: asyncpg caches named prepared statements,
    # and a connection's next transaction runs them in a server session that never prepared them.
    unaware = await concurrent_audits(make_settings(database_url=pgbouncer_database_url))
    failures = [outcome for outcome in unaware if isinstance(outcome, Exception)]
    assert failures, "with the statement cache on, some audits must land on a session without their statement"
    for failure in failures:
        assert isinstance(failure, asyncpg.InvalidSQLStatementNameError), repr(failure)
        assert 'prepared statement "__asyncpg_stmt_' in str(failure)

    aware = await concurrent_audits(make_settings(database_url=pgbouncer_database_url, database_pooler="pgbouncer"))
    assert aware == [[]] * AUDITS


@pytest.fixture
async def fresh_database(postgres_admin_url: str) -> AsyncIterator[str]:
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_pooler")
    yield dsn
    await devservers.drop_database(postgres_admin_url, dsn)


def test_migrate_goes_to_the_migrate_url_when_set(fresh_database):
    result = mediavault(
        "migrate", database_url="postgresql://postgres@127.0.0.1:1/unreachable", MEDIAVAULT_MIGRATE_DATABASE_URL=fresh_database
    )
    assert result.returncode == 0, result.stderr
    assert f"applied {len(available_migrations())} migration(s)" in result.stdout


@pytest.fixture
async def pooled_environment(
    fresh_database: str, pgbouncer_database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[dict[str, str]]:
    async with serve_environment(
        devservers.with_database(pgbouncer_database_url, database_name(fresh_database)),
        redis_url,
        tmp_path / "blobs",
        MEDIAVAULT_DATABASE_POOLER="pgbouncer",
        MEDIAVAULT_MIGRATE_DATABASE_URL=fresh_database,
    ) as env:
        yield env


async def test_serve_behind_pgbouncer_migrates_and_serves_concurrent_uploads(pooled_environment, fresh_database, auth):
    async with serving(pooled_environment) as (_, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        users = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(8)]
        done = await asyncio.gather(*(upload(storage, auth(user), fake_jpeg(5000)) for user in users for _ in range(3)))
        assert {d.upload.state for d in done} == {pb.UPLOAD_STATE_FINALIZED}
        summaries = await asyncio.gather(
            *(storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user)) for user in users)
        )
        assert {(s.summary.used_bytes, s.summary.media_count) for s in summaries} == {(15000, 3)}

    conn = await asyncpg.connect(fresh_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(available_migrations())
        assert await conn.fetchval("SELECT count(*) FROM media") == 24
    finally:
        await conn.close()
    audited = await audit_ledger(pooled_environment)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "ledger audit ok: 8 account(s) add up" in audited.stdout
