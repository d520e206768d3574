"""Enqueue helpers shared by the servicers and the cron jobs: job names and ids live here only."""

from __future__ import annotations

import logging
import uuid

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from mediavault import metrics

log = logging.getLogger(__name__)

TRANSCODE = "transcode_media"


def transcode_job_id(media_id: uuid.UUID, version: int, retry: int = 0) -> str:
    # arq remembers a finished job's id for keep_result seconds, so every reprocess run
    # (a new variants_version) and every re-enqueue by the stuck sweep needs an id of its own.
    job_id = f"transcode:{media_id}" if version == 0 else f"transcode:{media_id}:v{version}"
    return f"{job_id}:r{retry}" if retry else job_id


async def enqueue_transcode(redis: ArqRedis | None, media_id: uuid.UUID, version: int, retry: int = 0) -> bool:
    """Queues the run; False when Redis is unreachable (the stuck-media sweep re-enqueues it later)."""
    if redis is None:
        return False
    try:
        await redis.enqueue_job(TRANSCODE, str(media_id), version, _job_id=transcode_job_id(media_id, version, retry))
    except (RedisError, OSError):
        metrics.REDIS_FALLBACKS.labels("enqueue_transcode").inc()
        log.warning("transcode enqueue failed", extra={"media_id": str(media_id)}, exc_info=True)
        return False
    return True
