"""The synchronous pipeline one worker process runs: an image's bytes (or a video's file) and a declared type in, variants out."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from pathlib import Path

from mediavault.domain import content_types
from mediavault.imaging.decode import Still, decode_poster, decode_with_pillow, open_image, sniff
from mediavault.imaging.errors import UNSUPPORTED_FORMAT, PermanentImagingError
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
    """Decode an image once and make every variant of it.

    `jpeg_planes` lets JPEGs take the planes strategy, `lossless_display` the lossless one (see strategies). Raises
    PermanentImagingError when the input is refused; a video is (`transcode_poster` makes its
    variants, from a file). CPU-bound: call it from a worker process (Transcoder does), never on
    an event loop.
    """
    mime = sniff(data, content_type)
    if content_types.kind_of(mime) == "video":
        raise PermanentImagingError(UNSUPPORTED_FORMAT)
    return with_thumbhash(transcode_image(data, mime, limits, variants.image, jpeg_planes, lossless_display))


def transcode_poster(
    path: Path,
    content_type: str,
    variants: VariantSet = DEFAULT_VARIANTS,
    limits: Limits = DEFAULT_LIMITS,
    picture_start_seconds: float = 0.0,
) -> TranscodeResult:
    """The poster and the other picture variants of the video file at path, from its poster frame
    (decode.decode_poster, which reads the file only as far as that frame, searching from
    picture_start_seconds on). Raises PermanentImagingError when the file is refused, or is not a video."""
    mime = _sniff_file(path, content_type)
    if content_types.kind_of(mime) != "video":
        raise PermanentImagingError(UNSUPPORTED_FORMAT)
    poster = decode_poster(path, mime, limits, picture_start_seconds)
    made = make_variants(poster.image, poster.width, poster.height, (variants.poster, *variants.video))
    result = TranscodeResult("video", poster.width, poster.height, made, PillowPipeline.name, poster_seconds=poster.seconds)
    return with_thumbhash(result)


def with_thumbhash(result: TranscodeResult) -> TranscodeResult:
    """The result with the ThumbHash of its smallest variant, for images and video posters alike."""
    if not result.variants:
        return result
    smallest = min(result.variants, key=lambda variant: variant.width * variant.height)
    return dataclasses.replace(result, thumbhash=from_variant(smallest.data))


def made_on_request(
    path: Path,
    content_type: str,
    requested: Mapping[str, Collection[str]],
    primary_bytes: Mapping[str, int],
    variants: VariantSet = DEFAULT_VARIANTS,
    limits: Limits = DEFAULT_LIMITS,
    poster_seconds: float | None = None,
) -> list[Variant]:
    """The formats `requested` (content types by variant name) of an image's or a video's
    variants, each made as its job makes an alternate beside the primary, from the file at path:
    an image's original, or the video the upload's job took its poster from (workers.video),
    decoded only as far as the poster frame: the one at poster_seconds (the job's
    TranscodeResult.poster_seconds), or, for a video processed before those were kept, the one
    a search from its first frame finds.

    Pillow decodes an image, whatever strategy the upload's job took: that job's display and
    shared decode are not needed for a smaller variant, whose resize differs by rounding at
    most. Its bytes may differ more (the planes and lossless strategies encode otherwise), so a
    format is left out when it is no smaller than the stored primary, whose size `primary_bytes`
    gives by variant name (formats.alternates). Raises PermanentImagingError when the input is
    refused, as `transcode` does.
    """
    mime = _sniff_file(path, content_type)
    kind = content_types.kind_of(mime)
    specs = [spec for spec in (variants.video if kind == "video" else variants.image) if spec.name in requested]
    if not specs:
        return []
    if kind == "video":
        still: Still = decode_poster(path, mime, limits, at_seconds=poster_seconds)
    else:
        still = decode_with_pillow(open_image(path.read_bytes(), mime, limits), specs)
    made = make_variants(still.image, still.width, still.height, specs, requested, primary_bytes)
    return [alternate for variant in made for alternate in variant.alternates]


def _sniff_file(path: Path, content_type: str) -> str:
    with open(path, "rb") as file:
        return sniff(file.read(content_types.SNIFF_BYTES), content_type)
