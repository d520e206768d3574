"""arq worker configuration: job functions, cron schedules and the ctx filled at start-up."""

from __future__ import annotations

from typing import Any

from arq import cron
from arq.connections import RedisSettings

from mediavault.blobs import open_blob_store
from mediavault.config import Settings
from mediavault.db import create_pool
from workers.maintenance import reclaim_stale_uploads

CRON_JOBS = [cron(reclaim_stale_uploads, minute=set(range(0, 60, 5)), unique=True)]


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["pool"] = await create_pool(settings)
    ctx["blobs"] = await open_blob_store(settings)


async def shutdown(ctx: dict[str, Any]) -> None:
    if "blobs" in ctx:
        await ctx["blobs"].close()
    if "pool" in ctx:
        await ctx["pool"].close()


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for arq.Worker, bound to these settings."""
    return {
        "functions": [],
        "cron_jobs": CRON_JOBS,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "ctx": {"settings": settings},
    }
