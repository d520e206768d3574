"""Behind PgBouncer in transaction mode (Debian's 1.18, started by tests/conftest.py): why
MEDIAVAULT_DATABASE_POOLER=pgbouncer is needed, and `mediavault serve` / `migrate` as operators run them there.

The concurrency, flow and uploads suites themselves run through PgBouncer too (conftest: stack).
Resumable uploads behind a PgBouncer of one or two server connections: no writer holds one while
a client's bytes come in.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import grpc
import pytest

from mediavault import devservers
from mediavault.auth import Authenticator, Principal
from mediavault.blobs import open_blob_store
from mediavault.db import create_pool, migrate
from mediavault.db.migrate import available_migrations
from mediavault.domain import accounts, ledger, uploads
from mediavault.jobs import TranscodeQueue
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import JWT_SECRET, running
from tests.helpers import fake_jpeg, serve_environment, sha256_hex, upload
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


# PgBouncer's default is 120 s: a statement stuck for want of a server connection fails sooner here.
QUERY_WAIT_SECONDS = 5
MiB = 1024 * 1024


def principal(user_id: str) -> Principal:
    return Principal(user_id, frozenset({"user"}))


async def begin_tus(pool, service: uploads.Uploads, data: bytes) -> tuple[str, uuid.UUID]:
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    await accounts.ensure(pool, user_id, 100 * MiB)
    request = uploads.BeginRequest("a.jpg", "image/jpeg", len(data), sha256_hex(data), None, "permanent", "tus")
    return user_id, (await service.begin(principal(user_id), request)).upload.upload_id


async def test_concurrent_tus_appends_cross_their_checkpoints_behind_two_server_connections(
    make_settings, postgres_admin_url, database_url
):
    """More writers than PgBouncer has server connections, each past a checkpoint inside its chunk:
    no writer holds a connection while its bytes come in, so none waits for another's."""
    with devservers.pgbouncer(postgres_admin_url, pool_size=2, query_wait_timeout=QUERY_WAIT_SECONDS) as admin_url:
        settings = make_settings(
            database_url=devservers.with_database(admin_url, database_name(database_url)),
            database_pooler="pgbouncer",
            tus_chunk_size_bytes=5 * MiB,
        )
        pool = await create_pool(settings)
        blobs = await open_blob_store(settings)
        try:
            resumable = uploads.Resumable(pool, blobs, settings)
            service = uploads.Uploads(pool, blobs, settings, TranscodeQueue(None, settings.queue_name), resumable)
            data = [fake_jpeg(7 * MiB, fill=bytes([n])) for n in (1, 2)]
            begun = [await begin_tus(pool, service, d) for d in data]
            both_writing = asyncio.Barrier(len(data))

            async def body(d: bytes) -> AsyncIterator[bytes]:
                yield d[:MiB]
                # Each writer has its upload, and then crosses the 5 MiB checkpoint.
                await both_writing.wait()
                for start in range(MiB, len(d), MiB):
                    yield d[start : start + MiB]

            done = await asyncio.wait_for(
                asyncio.gather(*(resumable.append(u, body(d), offset=0, length=len(d)) for (_, u), d in zip(begun, data, strict=True))),
                timeout=4 * QUERY_WAIT_SECONDS,
            )
            assert [p.received_bytes for p in done] == [7 * MiB, 7 * MiB]
            for (user_id, upload_id), d in zip(begun, data, strict=True):
                finalized = await service.finalize(principal(user_id), upload_id)
                assert finalized.state == "finalized"
                assert sha256_hex(await blobs.read(finalized.object_key)) == sha256_hex(d)
        finally:
            await blobs.close()
            await pool.close()


async def test_a_stalled_tus_patch_holds_no_database_connection(make_settings, fresh_database, postgres_admin_url, tmp_path):
    """One server connection behind PgBouncer for the whole server, a PATCH whose body stalls, and
    another process's pool: its statement runs at once, and no session sits in a transaction."""
    await migrate(fresh_database)
    name = database_name(fresh_database)
    with devservers.pgbouncer(postgres_admin_url, pool_size=1, query_wait_timeout=QUERY_WAIT_SECONDS) as admin_url:
        settings = make_settings(
            database_url=devservers.with_database(admin_url, name),
            database_pooler="pgbouncer",
            blob_dir=tmp_path / "blobs",
            # Renewed every half second: the stall spans several renewals.
            tus_lease_seconds=2.0,
        )
        data = fake_jpeg(100_000)
        release = asyncio.Event()
        first_part_sent = asyncio.Event()

        async def stalling_body() -> AsyncIterator[bytes]:
            yield data[:30_000]
            first_part_sent.set()
            await release.wait()
            yield data[30_000:]

        other_process = await create_pool(settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": 1}))
        direct = await asyncpg.connect(fresh_database)
        try:
            async with (
                running(settings) as server,
                grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
                aiohttp.ClientSession() as http,
            ):
                storage = storage_pb2_grpc.StorageServiceStub(channel)
                user_id = f"user-{uuid.uuid4().hex[:12]}"
                md = (("authorization", f"Bearer {Authenticator(JWT_SECRET).issue(user_id, ['user'])}"),)
                begun = await storage.BeginUpload(
                    pb.BeginUploadRequest(
                        filename="a.jpg", content_type="image/jpeg", size_bytes=len(data), sha256=sha256_hex(data),
                        protocol=pb.UPLOAD_PROTOCOL_TUS,
                    ),
                    metadata=md,
                )
                headers = {"Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}

                async def patch() -> int:
                    async with http.patch(begun.upload_url, data=stalling_body(), headers=headers) as response:
                        return response.status

                patching = asyncio.create_task(patch())
                try:
                    await first_part_sent.wait()
                    # Into the stall, past a renewal or two.
                    await asyncio.sleep(1.2)
                    assert not patching.done()
                    in_transaction = await direct.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state LIKE 'idle in transaction%'", name
                    )
                    assert in_transaction == 0
                    started = asyncio.get_running_loop().time()
                    assert await asyncio.wait_for(other_process.fetchval("SELECT 1"), timeout=2) == 1
                    assert asyncio.get_running_loop().time() - started < 1
                    assert await direct.fetchval(
                        "SELECT lease_until > now() FROM upload_progress WHERE upload_id = $1::uuid", begun.upload.upload_id
                    ), "the writer still holds its upload"
                finally:
                    release.set()
                assert await patching == 204
                finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
                assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
        finally:
            await direct.close()
            await other_process.close()
