"""Enqueue helpers shared by the servicers and the cron jobs: job names and ids live here only."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mediavault import metrics, tracing
from mediavault.batching import Batcher
from mediavault.domain.feed import bump_version_lua, version_key

log = logging.getLogger(__name__)

TRANSCODE = "transcode_media"
# A video's run, on the video queue: transcode_media hands videos over to it.
TRANSCODE_VIDEO = "transcode_video"
# Formats made on request (domain.media.Library.get), on the transcode queue.
MAKE_FORMATS = "make_formats"

# The arq releases whose enqueue protocol _ENQUEUE mirrors (pyproject pins arq to them;
# tests/test_jobs.py compares the script's keys, payload and expiry with arq's own enqueue_job).
MIRRORED_ARQ_VERSIONS = ("0.28.0",)

# arq's enqueue_job (WATCH the job key, EXISTS job or result, MULTI PSETEX + ZADD) for
# any number of runs in one script, each with the owner's feed-version bump that a new
# run goes with (the Lua domain.feed defines): one round trip where arq and the feed
# took four per run. Same keys, payload and expiry as arq's.
#   KEYS: the queue, then per run: job key, result key and, when its flag is 1, a feed version key
#   ARGV: the expiry in ms, then per run: payload, score, job id, flag
_ENQUEUE = AsyncScript(
    None,  # type: ignore[arg-type]  # bytes need no client to encode them; every call names one
    f"""
local k = 2
for a = 2, #ARGV, 4 do
    local job_key, result_key = KEYS[k], KEYS[k + 1]
    k = k + 2
    if ARGV[a + 3] == '1' then
        {bump_version_lua("KEYS[k]")}
        k = k + 1
    end
    if redis.call('EXISTS', job_key, result_key) == 0 then
        redis.call('PSETEX', job_key, ARGV[1], ARGV[a])
        redis.call('ZADD', KEYS[1], ARGV[a + 1], ARGV[a + 2])
    end
end
""".encode(),
)


@dataclass(frozen=True)
class TranscodeRun:
    media_id: uuid.UUID
    version: int
    requeue: int
    feed_owner: str | None
    # The enqueue span's W3C trace context, which the job carries to the worker (None when tracing is off).
    trace_context: Mapping[str, str] | None = None


def transcode_job_id(media_id: uuid.UUID, version: int, requeue: int = 0) -> str:
    # arq remembers a finished job's id for keep_result seconds, so every reprocess run
    # (a new variants_version) and every re-enqueue by the stuck sweep (media.requeues)
    # needs an id of its own.
    job_id = f"transcode:{media_id}" if version == 0 else f"transcode:{media_id}:v{version}"
    return f"{job_id}:r{requeue}" if requeue else job_id


async def _enqueue_runs(redis: ArqRedis, queue_name: str, runs: list[TranscodeRun]) -> list[bool]:
    enqueued_ms = timestamp_ms()
    keys: list[str] = [queue_name]
    args: list[bytes | str | int] = [redis.expires_extra_ms]
    for run in runs:
        job_id = transcode_job_id(run.media_id, run.version, run.requeue)
        keys += [job_key_prefix + job_id, result_key_prefix + job_id]
        if run.feed_owner is not None:
            keys.append(version_key(run.feed_owner))
        # Without tracing the payload is exactly arq's; with it, the job has one keyword more.
        kwargs = {"trace_context": dict(run.trace_context)} if run.trace_context else {}
        payload = serialize_job(TRANSCODE, (str(run.media_id), run.version), kwargs, None, enqueued_ms, serializer=redis.job_serializer)
        args += [payload, enqueued_ms, job_id, 1 if run.feed_owner is not None else 0]
    await _ENQUEUE(keys, args, client=redis)
    return [True] * len(runs)


def _enqueue_failed(run: TranscodeRun) -> bool:
    metrics.REDIS_FALLBACKS.labels("enqueue_transcode").inc()
    if run.feed_owner is not None:
        metrics.REDIS_FALLBACKS.labels("feed_invalidate").inc()
    log.warning("transcode enqueue failed", extra={"media_id": str(run.media_id)}, exc_info=True)
    tracing.mark_failed("redis unreachable")
    return False


async def enqueue_transcode(
    redis: ArqRedis | None, media_id: uuid.UUID, version: int, requeue: int = 0, *, feed_owner: str | None = None
) -> bool:
    """Queues the run unless its job id is already queued or finished, as arq's enqueue_job.

    With feed_owner, that owner's feed version is bumped in the same round trip (see
    domain.feed), so the new or reprocessed media shows on their next feed call.
    False when Redis is unreachable: the stuck-media sweep re-enqueues the run later,
    and the owner's cached feed pages live out their TTL.
    """
    if redis is None:
        return False
    job_id = transcode_job_id(media_id, version, requeue)
    with tracing.enqueue_span(TRANSCODE, job_id, redis.default_queue_name) as trace_context:
        run = TranscodeRun(media_id, version, requeue, feed_owner, trace_context)
        try:
            await _enqueue_runs(redis, redis.default_queue_name, [run])
        except (RedisError, OSError):
            return _enqueue_failed(run)
        return True


class TranscodeQueue:
    """enqueue_transcode for concurrent callers (the servicers): their runs go to Redis together.

    queue_name is the photo workers' queue (settings.queue_name), named rather than taken from
    the pool: an arq worker's pool is bound to that worker's own queue, and the cron and video
    workers re-enqueue transcodes too.
    """

    def __init__(self, redis: ArqRedis | None, queue_name: str, max_batch: int = 256) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self._batches: Batcher[TranscodeRun, bool] | None = None
        if redis is not None:
            self._batches = Batcher(lambda runs: _enqueue_runs(redis, queue_name, runs), max_batch, name=f"enqueue {TRANSCODE}")

    async def enqueue(
        self, media_id: uuid.UUID, version: int, requeue: int = 0, *, feed_owner: str | None = None
    ) -> bool:
        """As enqueue_transcode."""
        if self._batches is None:
            return False
        assert self.redis is not None  # batches exist only with Redis
        job_id = transcode_job_id(media_id, version, requeue)
        with tracing.enqueue_span(TRANSCODE, job_id, self.queue_name) as trace_context:
            run = TranscodeRun(media_id, version, requeue, feed_owner, trace_context)
            try:
                return await self._batches.submit(run)
            except (RedisError, OSError):
                return _enqueue_failed(run)

    async def enqueue_formats(self, media_id: uuid.UUID, version: int, request: int) -> bool:
        """Queues the job that makes the run's requested formats; False when it is not queued
        (Redis unreachable, or the job id already known to arq), so the caller withdraws the request.

        `request` is the media's format_requests number (domain.media), taken by this request
        alone and never again: arq keeps a finished job's id for an hour and ignores a new job under it.
        """
        if self.redis is None:
            return False
        job_id = f"formats:{media_id}:v{version}:q{request}"
        with tracing.enqueue_span(MAKE_FORMATS, job_id, self.queue_name) as trace_context:
            carried: dict[str, Any] = {"trace_context": trace_context} if trace_context else {}
            try:
                job = await self.redis.enqueue_job(
                    MAKE_FORMATS, str(media_id), version, _job_id=job_id, _queue_name=self.queue_name, **carried
                )
            except (RedisError, OSError):
                metrics.REDIS_FALLBACKS.labels("enqueue_formats").inc()
                log.warning("formats enqueue failed", extra={"media_id": str(media_id)}, exc_info=True)
                tracing.mark_failed("redis unreachable")
                return False
            if job is None:
                # A number handed out twice (a database restored from a backup older than Redis's
                # keys): the job arq knows may be finished, or have read its formats before this
                # request added its own, so the request is not left to it.
                log.warning("formats job id already used", extra={"media_id": str(media_id), "job_id": job_id})
                tracing.mark_failed("job id already used")
                return False
        return True


async def enqueue_video(redis: ArqRedis, queue_name: str, media_id: uuid.UUID, version: int, transcode_job_id: str) -> None:
    """Hands a video's run to the video queue, under an id derived from the transcode job's:
    the same run handed over twice is queued once, a re-enqueued run (a new job id) again."""
    job_id = f"video:{transcode_job_id}"
    with tracing.enqueue_span(TRANSCODE_VIDEO, job_id, queue_name) as trace_context:
        # Without tracing the job is exactly what it was: no trace_context argument at all.
        carried: dict[str, Any] = {"trace_context": trace_context} if trace_context else {}
        await redis.enqueue_job(TRANSCODE_VIDEO, str(media_id), version, _job_id=job_id, _queue_name=queue_name, **carried)
