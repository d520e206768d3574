"""`mediavault worker`'s process: its workers start, and stop on SIGTERM whatever their jobs are doing."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import Any

import arq
import pytest
from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from prometheus_client import REGISTRY

import workers.settings
from mediavault.config import JobsConfig
from tests.conftest import CORPUS, POOLERS, running_worker
from tests.faults import PrivateRedis, database_through, proxied
from tests.helpers import upload
from workers.worker import run_workers


async def test_sigterm_while_a_job_records_its_result_closes_every_worker(make_settings, pool, monkeypatch):
    # One cleanup job on, so that the process has its cron worker too (its runs only read).
    jobs = JobsConfig(**{name: {"enabled": name == "audit_accounts"} for name in JobsConfig.model_fields})
    settings = make_settings(queue_name=f"mediavault-test-close:{uuid.uuid4().hex}", jobs=jobs)
    recording = asyncio.Event()
    finish_job = arq.Worker.finish_job

    async def slow_finish_job(self: arq.Worker, *args: Any, **kwargs: Any) -> None:
        # A Redis round trip slow enough for the signal to land while the job's result is written.
        recording.set()
        await asyncio.sleep(0.5)
        await finish_job(self, *args, **kwargs)

    closed: list[str] = []
    shutdown = workers.settings.shutdown

    async def recorded_shutdown(ctx: dict[str, Any]) -> None:
        await shutdown(ctx)
        closed.append(ctx.get("queue") or "photo")

    monkeypatch.setattr(arq.Worker, "finish_job", slow_finish_job)
    monkeypatch.setattr(workers.settings, "shutdown", recorded_shutdown)
    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name)
    try:
        # A media no row names: the job claims nothing and ends "skipped" at once.
        await redis.enqueue_job("transcode_media", str(uuid.uuid4()), 0)
        run = asyncio.create_task(run_workers(settings))
        await asyncio.wait_for(recording.wait(), 60)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(run, 60)
    finally:
        await redis.delete(settings.queue_name)
        await redis.aclose()
    assert sorted(closed) == sorted(["photo", "video", "cron"]), "every worker's resources are closed"


def recorded_lifecycle(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """The queues whose workers have started and those whose resources have been closed, as they go."""
    started: list[str] = []
    closed: list[str] = []
    startup, shutdown = workers.settings.worker_startup, workers.settings.shutdown

    async def recorded_startup(ctx: dict[str, Any]) -> None:
        await startup(ctx)
        started.append(ctx.get("queue") or "photo")

    async def recorded_shutdown(ctx: dict[str, Any]) -> None:
        await shutdown(ctx)
        closed.append(ctx.get("queue") or "photo")

    monkeypatch.setattr(workers.settings, "worker_startup", recorded_startup)
    monkeypatch.setattr(workers.settings, "shutdown", recorded_shutdown)
    return started, closed


async def test_sigterm_while_redis_is_down_closes_every_worker(make_settings, pool, monkeypatch):
    redis = PrivateRedis()
    redis.start()
    try:
        jobs = JobsConfig(**{name: {"enabled": name == "audit_accounts"} for name in JobsConfig.model_fields})
        settings = make_settings(redis_url=redis.url, queue_name=f"mediavault-test-outage:{uuid.uuid4().hex}", jobs=jobs)
        started, closed = recorded_lifecycle(monkeypatch)
        run = asyncio.create_task(run_workers(settings))
        async with asyncio.timeout(60):
            while len(started) < 3:
                await asyncio.sleep(0.05)
        redis.stop()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(run, 60)
    finally:
        redis.close()
    assert sorted(closed) == ["cron", "photo", "video"], "every worker's resources are closed"


@pytest.mark.parametrize("pooler", POOLERS)
async def test_sigterm_while_postgres_stops_answering_closes_every_worker(
    make_settings, postgres_admin_url, database_url, monkeypatch, pooler
):
    """A job waits on a statement PostgreSQL never answers, nor its cancel: the signal cancels the
    job, and every worker closes all the same."""
    started, closed = recorded_lifecycle(monkeypatch)
    jobs = JobsConfig(**{name: {"enabled": name == "audit_accounts"} for name in JobsConfig.model_fields})
    async with proxied(postgres_admin_url) as proxy:
        with database_through(pooler, proxy, postgres_admin_url, database_url) as url:
            settings = make_settings(
                database_url=url,
                database_pooler=pooler,
                queue_name=f"mediavault-test-hung:{uuid.uuid4().hex}",
                jobs=jobs,
                transcode_workers=1,
                video_workers=1,
            )
            redis = await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name)
            run = asyncio.create_task(run_workers(settings))
            try:
                async with asyncio.timeout(60):
                    while len(started) < 3:
                        await asyncio.sleep(0.05)
                proxy.freeze()
                job = await redis.enqueue_job("transcode_media", str(uuid.uuid4()), 0)
                assert job is not None
                async with asyncio.timeout(10):
                    while not await redis.exists(in_progress_key_prefix + job.job_id):
                        await asyncio.sleep(0.05)
                await asyncio.sleep(0.2)
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(asyncio.shield(run), 20)
            finally:
                await proxy.down()
                await asyncio.wait_for(run, 60)
                await redis.delete(settings.queue_name)
                await redis.aclose()
    assert sorted(closed) == ["cron", "photo", "video"], "every worker's resources are closed"


async def test_a_worker_exports_its_database_pools_connections_in_use_and_their_most(make_settings, storage, auth, user_id, pool):
    def in_use(queue: str) -> float | None:
        return REGISTRY.get_sample_value("mediavault_worker_db_connections_in_use", {"queue": queue})

    async def until_in_use(queue: str, connections: int) -> None:
        async with asyncio.timeout(20):
            while in_use(queue) != connections:
                await asyncio.sleep(0.05)

    settings = make_settings(queue_name=f"pool-metrics:{uuid.uuid4().hex}")
    done = await upload(storage, auth(user_id), (CORPUS / "images/formats/hopper.jpg").read_bytes())
    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name)
    try:
        async with running_worker(settings):
            async with pool.acquire() as conn, conn.transaction():
                # The job's claim waits for this lock on its media row, on a connection of the photo
                # worker's pool; the gauges of an earlier test's workers may still read 0.
                await conn.execute("SELECT 1 FROM media WHERE media_id = $1::uuid FOR UPDATE", done.media_id)
                await redis.enqueue_job("transcode_media", done.media_id, 0)
                await until_in_use("photo", 1)
                await until_in_use("video", 0)
            await until_in_use("photo", 0)
            most = {
                queue: REGISTRY.get_sample_value("mediavault_worker_db_connections_max", {"queue": queue})
                for queue in ("photo", "video")
            }
    finally:
        await redis.aclose()
    assert most == {"photo": settings.db_pool_max_size, "video": settings.video_workers + 1}
