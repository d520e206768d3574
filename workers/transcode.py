"""transcode_media: original -> variants -> status. Idempotent per (media, variants_version)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import asyncpg
from arq import Retry
from redis.exceptions import RedisError

from mediavault import imaging, metrics, tracing
from mediavault.blobs import BlobStore, BlobStoreError, single_chunk
from mediavault.domain.media import MAX_ATTEMPTS, Claim, Library, Variant, variant_key
from mediavault.imaging import ImagingError, PermanentImagingError
from mediavault.imaging.variants import bitrate
from mediavault.jobs import TRANSCODE, enqueue_video

log = logging.getLogger(__name__)

# A worker process that crashed (ImagingError that is not permanent) is retried like
# an infrastructure fault: the next attempt runs in a fresh process.
TRANSIENT_ERRORS = (BlobStoreError, ImagingError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError, OSError)

# Faults of the database, Redis or the blob store are retried by arq, at any step of the
# job, the claim included: with the delays capped at RETRY_CAP_SECONDS, this many tries
# ride out an outage of a quarter of an hour. The media's own attempts (MAX_ATTEMPTS,
# counted in PostgreSQL) bound the retries of a run that reached the pixel work.
INFRASTRUCTURE_TRIES = 20
RETRY_CAP_SECONDS = 60.0


def backoff(base_seconds: float, attempt: int) -> float:
    return min(base_seconds * 2 ** (attempt - 1), RETRY_CAP_SECONDS)


async def retried_on_fault(ctx: dict[str, Any], job: str, media_id: str, run: Awaitable[str]) -> str:
    """What `run` returns; an infrastructure fault that reaches here (one outside a claimed run's
    attempt, the claim included) is retried by arq after a backoff by the job's try."""
    try:
        return await run
    except TRANSIENT_ERRORS as exc:
        job_try = ctx.get("job_try", 1)
        delay = backoff(ctx["settings"].transcode_retry_base_seconds, job_try)
        log.warning(f"{job} job hit an infrastructure fault; retrying",
                    extra={"media_id": media_id, "job_try": job_try, "delay_seconds": delay}, exc_info=True)
        metrics.TRANSCODE_OUTCOMES.labels("retry", type(exc).__name__).inc()
        raise Retry(defer=delay) from exc


async def attempt_failed(ctx: dict[str, Any], job: str, claim: Claim, version: int, exc: Exception) -> str:
    """After a fault in a claimed run's attempt: "failed" once it was the media's last attempt
    (the media FAILED for its client), else the run is put back and arq retries the job after a
    backoff by the attempt (raises Retry)."""
    library: Library = ctx["library"]
    log.warning(f"{job} attempt failed", extra={"media_id": str(claim.media_id), "attempt": claim.attempts}, exc_info=exc)
    last = claim.attempts >= MAX_ATTEMPTS
    metrics.TRANSCODE_OUTCOMES.labels("failed" if last else "retry", type(exc).__name__).inc()
    if last:
        await library.fail(claim.media_id, version, "processing failed, try again later")
        return "failed"
    delay = backoff(ctx["settings"].transcode_retry_base_seconds, claim.attempts)
    await library.retry_later(claim.media_id, version, "temporary error, retrying", delay)
    raise Retry(defer=delay) from exc


async def store_pictures(
    blobs: BlobStore, media_id: uuid.UUID, version: int, pictures: Iterable[imaging.Variant]
) -> list[Variant]:
    """Writes each picture, and each of its alternates (imaging/formats.py), under the run's
    deterministic key (a rerun overwrites its own) and returns the records of them."""
    stored = []
    for picture in (made for primary in pictures for made in (primary, *primary.alternates)):
        key = variant_key(media_id, version, picture.name, picture.content_type)
        await blobs.write(key, single_chunk(picture.data), content_type=picture.content_type)
        stored.append(Variant(picture.name, key, picture.content_type, picture.width, picture.height, len(picture.data)))
    return stored


async def transcode_media(
    ctx: dict[str, Any], media_id: str, version: int, trace_context: Mapping[str, str] | None = None
) -> str:
    """trace_context: the W3C trace context of the enqueue (mediavault.jobs), when the enqueuer traced."""
    with tracing.job_span(TRANSCODE, trace_context, ctx.get("job_id", ""), ctx.get("job_try", 1)):
        return await retried_on_fault(ctx, "transcode", media_id, _transcode(ctx, uuid.UUID(media_id), version))


async def _transcode(ctx: dict[str, Any], media_id: uuid.UUID, version: int) -> str:
    library: Library = ctx["library"]
    if await library.kind(media_id) == "video":
        await enqueue_video(ctx["redis"], ctx["settings"].video_queue, media_id, version, ctx["job_id"])
        return "handed to the video queue"
    claim = await library.claim(media_id, version)
    if claim is None:
        return "skipped"
    started = time.perf_counter()
    try:
        data = await ctx["blobs"].read(claim.object_key)
        with tracing.span("transcode", **{"mediavault.media_id": str(media_id), "mediavault.content_type": claim.content_type}) as span:
            result = await ctx["transcoder"].run(data, claim.content_type)
            if span is not None:
                span.set_attributes({"mediavault.width": result.width, "mediavault.height": result.height,
                                     "mediavault.variants": len(result.variants)})
        # Every variant, and an animation's moving ones, each format under its own key.
        moving = result.animation.variants if result.animation else []
        stored = await store_pictures(ctx["blobs"], media_id, version, (*result.variants, *moving))
        duration_ms, plays = (result.animation.duration_ms, result.animation.plays) if result.animation else (None, None)
        if duration_ms is not None:
            # The gifv lasts one loop, and says its bits a second as a video's renditions do.
            stored = [replace(v, bitrate=bitrate(v.size_bytes, duration_ms / 1000)) if v.is_rendition else v for v in stored]
        completed = await library.complete(
            media_id, version, result.width, result.height, stored, result.thumbhash,
            photo=result.photo, animation_duration_ms=duration_ms, animation_plays=plays,
        )
        outcome, reason = ("complete", "") if completed else ("superseded", "")
    except PermanentImagingError as exc:
        await library.fail(media_id, version, exc.message)
        outcome, reason = "failed", exc.message
    except TRANSIENT_ERRORS as exc:
        return await attempt_failed(ctx, "transcode", claim, version, exc)
    metrics.TRANSCODE_OUTCOMES.labels(outcome, reason).inc()
    metrics.TRANSCODE_SECONDS.labels(claim.kind).observe(time.perf_counter() - started)
    log.info("transcode finished", extra={"media_id": str(media_id), "outcome": outcome, "reason": reason})
    return outcome
