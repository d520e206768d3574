"""Enqueue helpers shared by the servicers and the cron jobs: job names and ids live here only."""

from __future__ import annotations

import logging
import uuid

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mediavault import metrics
from mediavault.domain.feed import version_key

log = logging.getLogger(__name__)

TRANSCODE = "transcode_media"

# arq's enqueue_job (WATCH the job key, EXISTS job or result, MULTI PSETEX + ZADD) as
# one script, with the owner's feed-version bump that every new run goes with: one
# round trip where arq and the feed took four. Same keys, payload and expiry as arq's.
_ENQUEUE = AsyncScript(
    None,  # type: ignore[arg-type]  # bytes need no client to encode them; every call names one
    b"""
if KEYS[4] then
    redis.call('INCR', KEYS[4])
end
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 1 then
    return 0
end
redis.call('PSETEX', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
""",
)


def transcode_job_id(media_id: uuid.UUID, version: int, retry: int = 0) -> str:
    # arq remembers a finished job's id for keep_result seconds, so every reprocess run
    # (a new variants_version) and every re-enqueue by the stuck sweep needs an id of its own.
    job_id = f"transcode:{media_id}" if version == 0 else f"transcode:{media_id}:v{version}"
    return f"{job_id}:r{retry}" if retry else job_id


async def enqueue_transcode(
    redis: ArqRedis | None, media_id: uuid.UUID, version: int, retry: int = 0, *, feed_owner: str | None = None
) -> bool:
    """Queues the run unless its job id is already queued or finished, as arq's enqueue_job.

    With feed_owner, that owner's feed version is bumped in the same round trip (see
    domain.feed), so the new or reprocessed media shows on their next feed call.
    False when Redis is unreachable: the stuck-media sweep re-enqueues the run later,
    and the owner's cached feed pages live out their TTL.
    """
    if redis is None:
        return False
    job_id = transcode_job_id(media_id, version, retry)
    enqueued_ms = timestamp_ms()
    job = serialize_job(TRANSCODE, (str(media_id), version), {}, None, enqueued_ms, serializer=redis.job_serializer)
    keys = [job_key_prefix + job_id, result_key_prefix + job_id, redis.default_queue_name]
    if feed_owner is not None:
        keys.append(version_key(feed_owner))
    try:
        await _ENQUEUE(keys, [redis.expires_extra_ms, job, enqueued_ms, job_id], client=redis)
    except (RedisError, OSError):
        metrics.REDIS_FALLBACKS.labels("enqueue_transcode").inc()
        if feed_owner is not None:
            metrics.REDIS_FALLBACKS.labels("feed_invalidate").inc()
        log.warning("transcode enqueue failed", extra={"media_id": str(media_id)}, exc_info=True)
        return False
    return True
