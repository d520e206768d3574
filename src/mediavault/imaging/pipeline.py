"""The synchronous pipeline one worker process runs: bytes and a declared type in, variants out."""

from __future__ import annotations

import dataclasses

from mediavault.domain import content_types
from mediavault.imaging.decode import decode_poster, sniff
from mediavault.imaging.spec import DEFAULT_LIMITS, DEFAULT_VARIANTS, Limits, VariantSet
from mediavault.imaging.strategies import PillowPipeline, transcode_image
from mediavault.imaging.thumbhash import from_variant
from mediavault.imaging.variants import TranscodeResult, make_variants


def transcode(
    data: bytes,
    content_type: str,
    variants: VariantSet = DEFAULT_VARIANTS,
    limits: Limits = DEFAULT_LIMITS,
    jpeg_planes: bool = True,
    lossless_display: bool = True,
) -> TranscodeResult:
    """Decode once and make every variant of the kind the bytes turn out to be.

    `jpeg_planes` lets JPEGs take the planes strategy, `lossless_display` the lossless one (see strategies). Raises
    PermanentImagingError when the input is refused. CPU-bound: call it from a worker
    process (Transcoder does), never on an event loop.
    """
    mime = sniff(data, content_type)
    if content_types.kind_of(mime) == "video":
        poster = decode_poster(data, mime, limits)
        made = make_variants(poster.image, poster.width, poster.height, (variants.poster, *variants.video))
        result = TranscodeResult("video", poster.width, poster.height, made, PillowPipeline.name)
    else:
        result = transcode_image(data, mime, limits, variants.image, jpeg_planes, lossless_display)
    return with_thumbhash(result)


def with_thumbhash(result: TranscodeResult) -> TranscodeResult:
    """The result with the ThumbHash of its smallest variant, for images and video posters alike."""
    if not result.variants:
        return result
    smallest = min(result.variants, key=lambda variant: variant.width * variant.height)
    return dataclasses.replace(result, thumbhash=from_variant(smallest.data))
