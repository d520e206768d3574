"""The synchronous pipeline one worker process runs: bytes and a declared type in, variants out."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

from mediavault.domain import content_types
from mediavault.imaging.decode import decode_poster, decode_with_pillow, open_image, sniff
from mediavault.imaging.spec import DEFAULT_LIMITS, DEFAULT_VARIANTS, Limits, VariantSet
from mediavault.imaging.strategies import PillowPipeline, transcode_image
from mediavault.imaging.thumbhash import from_variant
from mediavault.imaging.variants import TranscodeResult, Variant, make_variants


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


def made_on_request(
    data: bytes,
    content_type: str,
    requested: Mapping[str, Collection[str]],
    variants: VariantSet = DEFAULT_VARIANTS,
    limits: Limits = DEFAULT_LIMITS,
) -> list[Variant]:
    """The formats `requested` (content types by variant name) of an image's or a video's
    variants, each made as its job makes an alternate beside the primary: from an image's
    original, or from the poster frame of a video (`data` then being the video the upload's
    job took its poster from, workers.video).

    Pillow decodes an image, whatever strategy the upload's job took: that job's display and
    shared decode are not needed for a smaller variant, whose resize differs by rounding at
    most. A format no smaller than the variant's primary is left out (formats.alternates).
    Raises PermanentImagingError when the input is refused, as `transcode` does.
    """
    mime = sniff(data, content_type)
    kind = content_types.kind_of(mime)
    specs = [spec for spec in (variants.video if kind == "video" else variants.image) if spec.name in requested]
    if not specs:
        return []
    still = decode_poster(data, mime, limits) if kind == "video" else decode_with_pillow(open_image(data, mime, limits), specs)
    made = make_variants(still.image, still.width, still.height, specs, requested)
    return [alternate for variant in made for alternate in variant.alternates]
