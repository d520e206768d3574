"""reclaim_stale_uploads against real PostgreSQL and the fs blob store."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from arq import create_pool
from arq.connections import RedisSettings

from mediavault.domain import ledger
from mediavault.storage.v1 import storage_pb2 as pb
from tests.helpers import begin, fake_jpeg, put
from workers.maintenance import reclaim_stale_uploads
from workers.settings import shutdown, startup


@pytest.fixture
async def ctx(server):
    redis = await create_pool(RedisSettings.from_dsn(server.settings.redis_url))
    ctx = {"settings": server.settings, "redis": redis}
    await startup(ctx)
    yield ctx
    await shutdown(ctx)
    await redis.aclose()


async def test_lapsed_reservations_are_released_and_objects_deleted(ctx, storage, auth, user_id, pool, server):
    md = auth(user_id)
    data = fake_jpeg(4096)
    lapsed = await begin(storage, md, data)
    await put(lapsed.upload_url, dict(lapsed.upload_headers), data)
    fresh = await begin(storage, md, data)
    await pool.execute("UPDATE uploads SET expires_at = now() - interval '1 second' WHERE upload_id = $1::uuid", lapsed.upload.upload_id)

    result = await reclaim_stale_uploads(ctx)
    assert result["expired"] >= 1 and result["freed_bytes"] >= len(data)

    got = (await storage.GetUpload(pb.GetUploadRequest(upload_id=lapsed.upload.upload_id), metadata=md)).upload
    assert got.state == pb.UPLOAD_STATE_EXPIRED and got.failure_reason == "EXPIRED"
    still = (await storage.GetUpload(pb.GetUploadRequest(upload_id=fresh.upload.upload_id), metadata=md)).upload
    assert still.state == pb.UPLOAD_STATE_PENDING
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert summary.reserved_bytes == len(data)
    key = await pool.fetchval("SELECT object_key FROM uploads WHERE upload_id = $1::uuid", lapsed.upload.upload_id)
    assert not server.blobs.path(key).exists()
    assert await ledger.audit(pool) == []

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=lapsed.upload.upload_id), metadata=md)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_finalize_racing_reclaim_ends_committed_or_released_never_both(ctx, storage, auth, user_id, pool):
    md = auth(user_id)
    for _ in range(25):
        data = fake_jpeg(2048)
        begun = await begin(storage, md, data)
        await put(begun.upload_url, dict(begun.upload_headers), data)
        await pool.execute(
            "UPDATE uploads SET expires_at = now() + make_interval(secs => $2) WHERE upload_id = $1::uuid",
            begun.upload.upload_id, random.uniform(0.0, 0.02),
        )
        await asyncio.sleep(random.uniform(0.0, 0.02))
        await asyncio.gather(
            storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md),
            reclaim_stale_uploads(ctx),
            return_exceptions=True,
        )
        state = await pool.fetchval("SELECT state FROM uploads WHERE upload_id = $1::uuid", begun.upload.upload_id)
        if state == "pending":
            await reclaim_stale_uploads(ctx)
            state = await pool.fetchval("SELECT state FROM uploads WHERE upload_id = $1::uuid", begun.upload.upload_id)
        kinds = tuple(r["kind"] for r in await pool.fetch("SELECT kind FROM ledger_entries WHERE upload_id = $1::uuid ORDER BY entry_id", begun.upload.upload_id))
        assert (state, kinds) in {("finalized", ("reserve", "commit")), ("expired", ("reserve", "release"))}
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert summary.reserved_bytes == 0
    assert await ledger.audit(pool) == []
