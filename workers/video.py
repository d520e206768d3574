"""transcode_video: a video's original -> H.264 renditions, poster variants, facts -> status.

Runs on the video queue (workers.settings.video_worker_settings), so that a long
transcode never holds a photo's place. Idempotent per (media, variants_version) like
transcode_media: keys are deterministic per run, and a rerun overwrites them.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from mediavault import metrics, tracing
from mediavault.config import Settings
from mediavault.domain import content_types
from mediavault.domain.content_types import MP4
from mediavault.domain.media import Library, Variant, VideoFacts, variant_key
from mediavault.imaging import PermanentImagingError, TranscodeResult
from mediavault.imaging import video as videos
from mediavault.imaging.decode import sniff
from mediavault.jobs import TRANSCODE_VIDEO
from workers.transcode import TRANSIENT_ERRORS, attempt_failed, retried_on_fault, store_pictures

log = logging.getLogger(__name__)

# The database is told of progress at most this often; each report is also the check
# that the run is still wanted.
PROGRESS_EVERY_SECONDS = 0.5


def limits(settings: Settings) -> videos.VideoLimits:
    return videos.VideoLimits(
        max_duration_seconds=settings.video_max_duration_seconds,
        max_long_side=settings.video_max_long_side_px,
        max_frame_rate=settings.video_max_frame_rate,
        max_memory_bytes=videos.memory_cap_bytes(settings.video_ffmpeg_threads)
        if settings.video_memory_limit_mb is None
        else settings.video_memory_limit_mb * 1024 * 1024,
    )


async def transcode_video(
    ctx: dict[str, Any], media_id: str, version: int, trace_context: Mapping[str, str] | None = None
) -> str:
    """trace_context: the W3C trace context of the hand-over (mediavault.jobs.enqueue_video), when traced."""
    with tracing.job_span(TRANSCODE_VIDEO, trace_context, ctx.get("job_id", ""), ctx.get("job_try", 1)):
        return await retried_on_fault(ctx, "video", media_id, _transcode_video(ctx, uuid.UUID(media_id), version))


class _Progress:
    """The progress callback of one run: whole percents, at most every PROGRESS_EVERY_SECONDS."""

    def __init__(self, library: Library, media_id: uuid.UUID, version: int) -> None:
        self.library = library
        self.media_id = media_id
        self.version = version
        self.reported = -1
        self.at = 0.0

    async def __call__(self, done: float) -> bool:
        percent = min(99, int(done * 100))
        now = time.monotonic()
        if percent == self.reported or now - self.at < PROGRESS_EVERY_SECONDS:
            return True
        self.reported, self.at = percent, now
        return await self.library.progress(self.media_id, self.version, percent)


async def _transcode_video(ctx: dict[str, Any], media_id: uuid.UUID, version: int) -> str:
    library: Library = ctx["library"]
    claim = await library.claim(media_id, version)
    if claim is None:
        return "skipped"
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="mediavault-video-") as scratch:
            outcome, reason = await _run(ctx, claim.media_id, version, claim.object_key, claim.content_type, Path(scratch))
    except videos.Cancelled:
        outcome, reason = "cancelled", ""
    except PermanentImagingError as exc:
        await library.fail(media_id, version, exc.message)
        outcome, reason = "failed", exc.message
    except TRANSIENT_ERRORS as exc:
        return await attempt_failed(ctx, "video", claim, version, exc)
    metrics.TRANSCODE_OUTCOMES.labels(outcome, reason).inc()
    metrics.TRANSCODE_SECONDS.labels("video").observe(time.perf_counter() - started)
    log.info("video transcode finished", extra={"media_id": str(media_id), "outcome": outcome, "reason": reason})
    return outcome


async def _run(
    ctx: dict[str, Any], media_id: uuid.UUID, version: int, object_key: str, content_type: str, scratch: Path
) -> tuple[str, str]:
    library: Library = ctx["library"]
    settings: Settings = ctx["settings"]
    # Up to MAX_VIDEO_BYTES: to the scratch file ffmpeg reads, never whole in memory.
    source_path = scratch / "source"
    await ctx["blobs"].download(object_key, source_path)
    with source_path.open("rb") as source_file:
        head = source_file.read(content_types.SNIFF_BYTES)
    mime = sniff(head, content_type)
    if content_types.kind_of(mime) != "video":
        raise PermanentImagingError("unsupported format")
    bounds = limits(settings)
    source = await videos.probe(source_path, mime, bounds)
    renditions = await videos.transcode(
        source_path, mime, source, scratch, limits=bounds,
        timeout_seconds=settings.video_timeout_seconds(source.duration_seconds),
        on_progress=_Progress(library, media_id, version),
        threads=settings.video_ffmpeg_threads,
    )
    # The poster comes from the smallest rendition: already upright, square-pixelled and
    # SDR, and the cheapest to decode; its 640 px cover the poster's 600 px box. Its first frame is
    # held from 0 until the picture starts, where the search for a poster frame starts.
    poster = await ctx["transcoder"].run_poster(renditions[0].path, MP4, source.first_frame_seconds)
    stored = await _store(ctx, media_id, version, poster, renditions)
    facts = VideoFacts(source.duration_seconds, source.frame_rate, source.has_audio, source.codec, poster.poster_seconds)
    # From here on the blobs stay, whatever complete() answers or raises: a fault may come
    # after its COMMIT, and "superseded" may mean that another run of this version, whose rows
    # own these same keys, completed first. The orphan sweep removes what no row owns.
    if await library.complete(
        media_id, version, source.width, source.height, stored, thumbhash=poster.thumbhash, video=facts
    ):
        return "complete", ""
    return "superseded", ""


async def _store(
    ctx: dict[str, Any], media_id: uuid.UUID, version: int, poster: TranscodeResult, renditions: list[videos.Rendition]
) -> list[Variant]:
    """Writes the poster's pictures and the renditions under the run's keys and returns their
    records. Nothing written is deleted on a fault: a twin run of the same version may already
    have committed rows owning these keys, a rerun overwrites them, and the orphan sweep
    removes what no row owns (as for photos)."""
    stored = await store_pictures(ctx["blobs"], media_id, version, poster.variants)
    for rendition in renditions:
        key = variant_key(media_id, version, rendition.name, MP4)
        await ctx["blobs"].write(key, _file_chunks(rendition.path), content_type=MP4)
        stored.append(Variant(rendition.name, key, MP4, rendition.width, rendition.height, rendition.size_bytes,
                              rendition.bitrate))
    return stored


async def _file_chunks(path: Path, chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            yield chunk
