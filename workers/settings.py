"""arq worker configuration: job functions, cron schedules and the ctx filled at start-up."""

from __future__ import annotations

import dataclasses
from typing import Any

from arq import cron, func
from arq.connections import RedisSettings

from mediavault import metrics
from mediavault.blobs import open_blob_store
from mediavault.config import Settings
from mediavault.db import create_pool
from mediavault.domain import media as media_domain
from mediavault.domain.feed import Feed
from mediavault.imaging import DEFAULT_LIMITS, Transcoder
from workers.maintenance import JOBS, cron_task, job_config, observe_queue
from workers.transcode import transcode_media


def _schedule(every_minutes: int) -> dict[str, set[int]]:
    """arq cron fields for "every N minutes": N below an hour, whole hours, or once a day."""
    if every_minutes < 60:
        return {"minute": set(range(0, 60, every_minutes))}
    if every_minutes < 24 * 60:
        return {"minute": {0}, "hour": set(range(0, 24, every_minutes // 60))}
    return {"minute": {0}, "hour": {3}}


def cron_jobs(settings: Settings) -> list:
    # unique=True only keeps one replica's clock from starting a run twice; the batches'
    # row locks are what make concurrent runs on many replicas split the work.
    cleanup = [
        cron(cron_task(name), name=f"cron:{name}", unique=True, timeout=settings.job_timeout_seconds,
             **_schedule(job_config(settings, name).every_minutes))
        for name in JOBS
        if job_config(settings, name).enabled
    ]
    return [*cleanup, cron(observe_queue, name="cron:observe_queue", second={0, 15, 30, 45})]


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["pool"] = await create_pool(settings)
    ctx["blobs"] = await open_blob_store(settings)
    ctx["feed"] = Feed(ctx["pool"], ctx["redis"], settings.feed_cache_ttl)
    if settings.metrics_addr:
        ctx["metrics"] = metrics.MetricsEndpoint(settings.metrics_addr)
    ctx["transcoder"] = Transcoder(
        workers=settings.transcode_workers or None,
        limits=dataclasses.replace(DEFAULT_LIMITS, job_timeout_seconds=settings.transcode_timeout_seconds),
        jpeg_planes=settings.imaging_jpeg_planes == "on",
    )


async def worker_startup(ctx: dict[str, Any]) -> None:
    """The arq worker's start-up: the shared resources, then the transcoding processes,
    which a one-off `mediavault jobs run` never needs."""
    await startup(ctx)
    await ctx["transcoder"].prewarm()


async def shutdown(ctx: dict[str, Any]) -> None:
    if "transcoder" in ctx:
        await ctx["transcoder"].close()
    if "metrics" in ctx:
        ctx["metrics"].close()
    if "blobs" in ctx:
        await ctx["blobs"].close()
    if "pool" in ctx:
        await ctx["pool"].close()


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for arq.Worker, bound to these settings."""
    return {
        # Our own attempt count in PostgreSQL decides retries; arq's bound only stops
        # a job whose database is unreachable from being retried forever.
        "functions": [func(transcode_media, max_tries=media_domain.MAX_ATTEMPTS + 2)],
        "cron_jobs": cron_jobs(settings),
        "on_startup": worker_startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.queue_name,
        "job_timeout": settings.job_timeout_seconds,
        "poll_delay": settings.worker_poll_delay_seconds,
        "ctx": {"settings": settings},
    }
