"""The worker through infrastructure faults: a PostgreSQL failover, a Redis failover, a stuck run arq remembers.

Outcomes are read from the media rows (their status and variants), never from a job's own report.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc

from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import CORPUS, running
from tests.faults import PrivateRedis, free_port, proxied
from tests.helpers import upload
from tests.workers.test_transcode import start_worker

IMAGE = CORPUS / "images/formats/hopper.jpg"


async def statuses(pool, media_ids: list[str]) -> list[str]:
    rows = await pool.fetch("SELECT media_id::text, processing_status FROM media WHERE media_id = ANY($1::uuid[])", media_ids)
    by_id = {r["media_id"]: r["processing_status"] for r in rows}
    return [by_id[m] for m in media_ids]


async def wait_until_complete(pool, media_ids: list[str], timeout: float) -> float:
    """Seconds until every media is COMPLETE; fails on FAILED or at the timeout."""
    started = time.monotonic()
    while True:
        now = await statuses(pool, media_ids)
        assert "failed" not in now, now
        if now == ["complete"] * len(media_ids):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"still {now} after {timeout} s"
        await asyncio.sleep(0.05)


async def test_a_postgres_failover_while_jobs_are_queued_delays_them_by_seconds(make_settings, auth, user_id, pool):
    settings = make_settings(queue_name=f"pg-failover:{user_id}", transcode_retry_base_seconds=0.5)
    async with proxied(settings.database_url) as proxy, running(settings) as server:
        # The worker reaches PostgreSQL through the proxy; the API server directly.
        worker = start_worker(settings.model_copy(update={"database_url": proxy.url_for(settings.database_url)}))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                storage = storage_pb2_grpc.StorageServiceStub(channel)
                md = auth(user_id)
                warm = await upload(storage, md, IMAGE.read_bytes())
                await wait_until_complete(pool, [warm.media_id], timeout=60)

                await proxy.down()
                queued = [(await upload(storage, md, IMAGE.read_bytes(), filename=f"{i}.jpg")).media_id for i in range(4)]
                await asyncio.sleep(3)
                assert await statuses(pool, queued) == ["pending"] * 4
                await proxy.up()
                seconds = await wait_until_complete(pool, queued, timeout=30)
        finally:
            worker.terminate()
            # The worker's goodbyes to PostgreSQL pass through the proxy, which runs in this loop.
            await asyncio.to_thread(worker.wait)
    assert seconds < 15, f"the queued runs took {seconds:.1f} s after PostgreSQL came back"
    assert worker.returncode is not None
    counts = await pool.fetch("SELECT count(*) AS n FROM media_variants WHERE media_id = ANY($1::uuid[]) GROUP BY media_id", queued)
    assert [r["n"] for r in counts] == [5] * 4, "display, and thumbnail and preview in JPEG and AVIF"


async def worker_redis_up(metrics_port: int) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
        text = await response.text()
    [value] = [line.split()[1] for line in text.splitlines() if line.startswith("mediavault_worker_redis_up ")]
    return float(value)


async def test_the_worker_rides_out_a_redis_failover(make_settings, auth, user_id, pool):
    redis = PrivateRedis()
    redis.start()
    try:
        settings = make_settings(redis_url=redis.url, queue_name=f"redis-failover:{user_id}")
        metrics_port = free_port()
        async with running(settings) as server:
            worker = start_worker(settings, MEDIAVAULT_METRICS_ADDR=f"127.0.0.1:{metrics_port}")
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                    storage = storage_pb2_grpc.StorageServiceStub(channel)
                    md = auth(user_id)
                    before = await upload(storage, md, IMAGE.read_bytes())
                    await wait_until_complete(pool, [before.media_id], timeout=60)
                    assert await worker_redis_up(metrics_port) == 1

                    redis.stop()
                    await asyncio.sleep(3)
                    assert worker.poll() is None, "the worker exited when Redis went away"
                    assert await worker_redis_up(metrics_port) == 0
                    redis.start()
                    after = await upload(storage, md, IMAGE.read_bytes(), filename="after.jpg")
                    await wait_until_complete(pool, [after.media_id], timeout=30)
                    assert worker.poll() is None
                    assert await worker_redis_up(metrics_port) == 1
            finally:
                worker.terminate()
                worker.wait()
    finally:
        redis.close()
