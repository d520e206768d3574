"""make_formats: the formats of a processed image or video that a client asked for, made
from an image's original or from the rendition a video's poster came from.

Queued by MediaService (domain.media.Library.get) the first time a client asks for a
format made on request (imaging.spec, Alternate.eager). Idempotent per (media,
variants_version): it makes what is asked for and not stored, under the run's
deterministic keys, and a superseded or deleted run records nothing.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arq import Retry

from mediavault import metrics, tracing
from mediavault.domain.media import MAX_ATTEMPTS, Library, format_entry
from mediavault.imaging import ImagingError, PermanentImagingError
from mediavault.jobs import MAKE_FORMATS
from workers.transcode import INFRASTRUCTURE_TRIES, TRANSIENT_ERRORS, backoff, store_pictures

log = logging.getLogger(__name__)


async def make_formats(
    ctx: dict[str, Any], media_id: str, version: int, trace_context: Mapping[str, str] | None = None
) -> str:
    """trace_context: the W3C trace context of the enqueue (mediavault.jobs), when the enqueuer traced."""
    with tracing.job_span(MAKE_FORMATS, trace_context, ctx.get("job_id", ""), ctx.get("job_try", 1)):
        return await _run(ctx, uuid.UUID(media_id), version)


async def _run(ctx: dict[str, Any], media_id: uuid.UUID, version: int) -> str:
    library: Library = ctx["library"]
    wanted = None
    try:
        wanted = await library.formats_to_make(media_id, version)
        if wanted is None:
            return "skipped"
        # A file, not bytes: a video's rendition is decoded only as far as its poster frame.
        with tempfile.TemporaryDirectory(prefix="mediavault-formats-") as scratch:
            source = Path(scratch) / "source"
            await ctx["blobs"].download(wanted.object_key, source)
            made = await ctx["transcoder"].made_on_request(
                source, wanted.content_type, wanted.requested, wanted.primary_bytes, wanted.poster_seconds
            )
        stored = await store_pictures(ctx["blobs"], media_id, version, made)
        outcome = "complete" if await library.add_formats(media_id, version, stored) else "superseded"
        reason = ""
    except PermanentImagingError as exc:
        # The original was taken by its own job; refused now, it is refused for good.
        outcome, reason = "failed", exc.message
        log.warning("formats refused", extra={"media_id": str(media_id), "reason": exc.message})
    except TRANSIENT_ERRORS as exc:
        job_try = ctx.get("job_try", 1)
        # As a transcode's: faults of the database, Redis or the blob store are retried through
        # a quarter-hour outage, a crashed pool process as often as a run's pixel work.
        tries = MAX_ATTEMPTS if isinstance(exc, ImagingError) else INFRASTRUCTURE_TRIES
        metrics.FORMAT_OUTCOMES.labels("retry" if job_try < tries else "gave_up", type(exc).__name__).inc()
        if job_try >= tries:
            log.error("formats job gave up", extra={"media_id": str(media_id), "job_try": job_try}, exc_info=True)
            if wanted is not None:
                # Forgotten, so that the next client that wants them asks again.
                entries = [format_entry(name, mime) for name, mimes in wanted.requested.items() for mime in mimes]
                await library.withdraw_formats(media_id, version, entries)
            return "gave up"
        delay = backoff(ctx["settings"].transcode_retry_base_seconds, job_try)
        log.warning("formats job hit an infrastructure fault; retrying",
                    extra={"media_id": str(media_id), "job_try": job_try, "delay_seconds": delay}, exc_info=True)
        raise Retry(defer=delay) from exc
    metrics.FORMAT_OUTCOMES.labels(outcome, reason).inc()
    log.info("formats made", extra={"media_id": str(media_id), "outcome": outcome})
    return outcome
