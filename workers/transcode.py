"""transcode_media: original -> variants -> status. Idempotent per (media, variants_version)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import asyncpg
from arq import Retry
from redis.exceptions import RedisError

from mediavault import metrics
from mediavault.blobs import BlobStoreError, single_chunk
from mediavault.domain import media as media_domain
from mediavault.imaging import ImagingError, PermanentImagingError

log = logging.getLogger(__name__)

# A worker process that crashed (ImagingError that is not permanent) is retried like
# an infrastructure fault: the next attempt runs in a fresh process.
TRANSIENT_ERRORS = (BlobStoreError, ImagingError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError, OSError)


def backoff(base_seconds: float, attempt: int) -> float:
    return base_seconds * 2 ** (attempt - 1)


async def transcode_media(ctx: dict[str, Any], media_id: str, version: int) -> str:
    pool = ctx["pool"]
    media_uuid = uuid.UUID(media_id)
    claim = await media_domain.claim(pool, media_uuid, version)
    if claim is None:
        return "skipped"
    started = time.perf_counter()
    try:
        data = await ctx["blobs"].read(claim.object_key)
        result = await ctx["transcoder"].run(data, claim.content_type)
        stored = []
        for variant in result.variants:
            key = media_domain.variant_key(media_uuid, version, variant.name, variant.content_type)
            await ctx["blobs"].write(key, single_chunk(variant.data), content_type=variant.content_type)
            stored.append(
                media_domain.Variant(variant.name, key, variant.content_type, variant.width, variant.height, len(variant.data))
            )
        owner = await media_domain.complete(pool, media_uuid, version, result.width, result.height, stored)
        outcome, reason = ("complete", "") if owner else ("superseded", "")
    except PermanentImagingError as exc:
        owner = await media_domain.fail(pool, media_uuid, version, exc.message)
        outcome, reason = "failed", exc.message
    except TRANSIENT_ERRORS as exc:
        log.warning("transcode attempt failed", extra={"media_id": media_id, "attempt": claim.attempts}, exc_info=True)
        metrics.TRANSCODE_OUTCOMES.labels("retry" if claim.attempts < media_domain.MAX_ATTEMPTS else "failed", type(exc).__name__).inc()
        if claim.attempts >= media_domain.MAX_ATTEMPTS:
            owner = await media_domain.fail(pool, media_uuid, version, "processing failed, try again later")
            await _feed_changed(ctx, owner)
            return "failed"
        delay = backoff(ctx["settings"].transcode_retry_base_seconds, claim.attempts)
        await media_domain.retry_later(pool, media_uuid, version, "temporary error, retrying", delay)
        raise Retry(defer=delay) from exc
    metrics.TRANSCODE_OUTCOMES.labels(outcome, reason).inc()
    metrics.TRANSCODE_SECONDS.labels(claim.kind).observe(time.perf_counter() - started)
    await _feed_changed(ctx, owner)
    log.info("transcode finished", extra={"media_id": media_id, "outcome": outcome, "reason": reason})
    return outcome


async def _feed_changed(ctx: dict[str, Any], owner: str | None) -> None:
    if owner is not None:
        await ctx["feed"].changed(owner)
