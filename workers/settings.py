"""arq worker configuration: job functions, cron schedules and the ctx filled at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

from arq import cron, func
from arq.connections import RedisSettings

from mediavault import metrics, tracing
from mediavault.blobs import open_blob_store
from mediavault.config import Settings
from mediavault.db import close_pool, create_pool
from mediavault.domain.media import MAX_ATTEMPTS
from mediavault.imaging import DEFAULT_LIMITS, AnimationLimits, Transcoder, pool_size
from mediavault.services import build_services
from workers.formats import make_formats
from workers.maintenance import JOBS, cron_task, job_config, sample_pool, sample_queues
from workers.transcode import INFRASTRUCTURE_TRIES, transcode_media
from workers.video import transcode_video


def _schedule(every_seconds: int) -> tuple[set[int], set[int] | None]:
    """arq cron (minute, hour) for "every N minutes": N below an hour, whole hours, or once a day."""
    every_minutes = every_seconds // 60
    if every_minutes < 60:
        return set(range(0, 60, every_minutes)), None
    if every_minutes < 24 * 60:
        return {0}, set(range(0, 24, every_minutes // 60))
    return {0}, {3}


def cron_jobs(settings: Settings) -> list:
    # unique=True only keeps one replica's clock from starting a run twice; the batches'
    # row locks are what make concurrent runs on many replicas split the work.
    cleanup = []
    for name in JOBS:
        if not job_config(settings, name).enabled:
            continue
        minute, hour = _schedule(job_config(settings, name).every_seconds)
        cleanup.append(cron(cron_task(name), name=f"cron:{name}", unique=True, timeout=settings.job_timeout_seconds,
                            minute=minute, hour=hour))
    return cleanup


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # First: the pool and the blob store are made traced or not by it.
    ctx["traced"] = tracing.start("mediavault-worker")
    queue = ctx.get("queue")
    video_queue = queue == "video"
    # A video transcode needs a connection for its claim, its progress reports and its
    # completion: its worker's pool stays small beside the photo worker's. The cron worker
    # is idle between runs, so its pool keeps one connection open.
    if video_queue:
        pool_settings = settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": settings.video_workers + 1})
    elif queue == "cron":
        pool_settings = settings.model_copy(update={"db_pool_min_size": 1})
    else:
        pool_settings = settings
    ctx["pool"] = await create_pool(pool_settings)
    ctx["blobs"] = tracing.traced_blobs(await open_blob_store(settings), settings.blob_backend)
    services = build_services(ctx["pool"], ctx["blobs"], ctx["redis"], settings)
    ctx["library"] = services.library
    ctx["feed"] = services.feed
    ctx["accounts"] = services.accounts
    ctx["transcodes"] = services.transcodes
    # The video and cron workers run in the photo worker's process and share its registry and endpoint.
    if settings.metrics_addr and queue is None:
        ctx["metrics"] = metrics.MetricsEndpoint(settings.metrics_addr)
    # The cleanup runs decode nothing.
    if queue == "cron":
        return
    # The video worker's pool only makes posters, one video at a time per transcode slot.
    processes = settings.video_workers if video_queue else settings.transcode_workers or None
    ctx["transcoder"] = Transcoder(
        workers=processes,
        limits=dataclasses.replace(
            DEFAULT_LIMITS,
            job_timeout_seconds=settings.transcode_timeout_seconds,
            process_memory_bytes=settings.transcode_memory_limit_mb * 1024 * 1024,
            animation=AnimationLimits(
                max_frames=settings.imaging_animation_max_frames,
                max_total_pixels=settings.imaging_animation_max_total_pixels,
                max_seconds=settings.imaging_animation_max_seconds,
            ),
        ),
        jpeg_planes=settings.imaging_jpeg_planes == "on",
        lossless_display=settings.imaging_lossless_display == "on",
    )


async def worker_startup(ctx: dict[str, Any]) -> None:
    """The arq worker's start-up: the shared resources, then the transcoding processes,
    which a one-off `mediavault jobs run` never needs."""
    await startup(ctx)
    if "transcoder" in ctx:
        await ctx["transcoder"].prewarm()
    # Every worker process samples the queues itself, so each exports a current depth (arq
    # runs a cron job on one worker per tick, which would leave the others' gauges stale).
    if ctx.get("queue") is None:
        ctx["queue_sampler"] = asyncio.create_task(sample_queues(ctx))
    ctx["pool_sampler"] = asyncio.create_task(sample_pool(ctx))


async def shutdown(ctx: dict[str, Any]) -> None:
    for sampler in ("queue_sampler", "pool_sampler"):
        if sampler in ctx:
            ctx[sampler].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ctx[sampler]
    if "transcoder" in ctx:
        await ctx["transcoder"].close()
    if "metrics" in ctx:
        ctx["metrics"].close()
    if "blobs" in ctx:
        await ctx["blobs"].close()
    if "pool" in ctx:
        await close_pool(ctx["pool"])
    if ctx.pop("traced", False):
        await tracing.stop()


def _redis_settings(settings: Settings) -> RedisSettings:
    redis = RedisSettings.from_dsn(settings.redis_url)
    # A worker starting during a Redis failover waits for it as long as a running one does.
    redis.conn_retries = max(1, int(settings.worker_redis_outage_seconds / redis.conn_retry_delay))
    return redis


JOBS_PER_TRANSCODE_PROCESS = 2


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for workers.worker.Worker, bound to these settings."""
    return {
        # Our own attempt count in PostgreSQL bounds the retries of the pixel work; arq's
        # bound adds the retries through an outage of the database, Redis or blob store.
        "functions": [
            func(transcode_media, max_tries=MAX_ATTEMPTS + INFRASTRUCTURE_TRIES),
            func(make_formats, max_tries=INFRASTRUCTURE_TRIES),
        ],
        "on_startup": worker_startup,
        "on_shutdown": shutdown,
        "redis_settings": _redis_settings(settings),
        "redis_outage_seconds": settings.worker_redis_outage_seconds,
        "queue_name": settings.queue_name,
        # arq's default of 10 let one worker take a burst of jobs its few transcoding processes
        # then ran one by one while another worker's stood idle: each process gets the job it
        # runs and one doing its blob and database I/O beside it; the rest wait in the queue
        # for whichever worker frees a slot first.
        "max_jobs": JOBS_PER_TRANSCODE_PROCESS * pool_size(settings.transcode_workers or None),
        "job_timeout": settings.job_timeout_seconds,
        "poll_delay": settings.worker_poll_delay_seconds,
        "ctx": {"settings": settings},
    }


def video_worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for the Worker of the video queue: video_workers transcodes at a
    time, each with a job timeout above the longest video's transcode limit."""
    longest = settings.video_timeout_seconds(settings.video_max_duration_seconds)
    return {
        "functions": [func(transcode_video, max_tries=MAX_ATTEMPTS + INFRASTRUCTURE_TRIES, timeout=longest + 120)],
        "on_startup": worker_startup,
        "on_shutdown": shutdown,
        "redis_settings": _redis_settings(settings),
        "redis_outage_seconds": settings.worker_redis_outage_seconds,
        "queue_name": settings.video_queue,
        "max_jobs": settings.video_workers,
        "job_timeout": longest + 120,
        "poll_delay": settings.worker_poll_delay_seconds,
        "ctx": {"settings": settings, "queue": "video"},
    }


def cron_worker_settings(settings: Settings) -> dict[str, Any] | None:
    """Keyword arguments for the Worker of the cron queue, which schedules and runs the
    cleanup jobs, every enabled one at once if their ticks meet; None when all are disabled."""
    jobs = cron_jobs(settings)
    if not jobs:
        return None
    return {
        "functions": [],
        "cron_jobs": jobs,
        "on_startup": worker_startup,
        "on_shutdown": shutdown,
        "redis_settings": _redis_settings(settings),
        "redis_outage_seconds": settings.worker_redis_outage_seconds,
        "queue_name": settings.cron_queue,
        "max_jobs": len(jobs),
        "job_timeout": settings.job_timeout_seconds,
        "poll_delay": settings.worker_poll_delay_seconds,
        "ctx": {"settings": settings, "queue": "cron"},
    }
