"""The synchronous pipeline one worker process runs: bytes and a declared type in, variants out."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from mediavault.domain import content_types
from mediavault.imaging.decode import decode_image, decode_poster, sniff
from mediavault.imaging.spec import DEFAULT_LIMITS, DEFAULT_VARIANTS, Limits, VariantSet
from mediavault.imaging.variants import Variant, make_variants

# Pillow returns each freed 16 MB image block to the OS and page-faults it back in on
# the next job; keeping up to eight (a 12 MP photo and its rotated copy use six) saves
# about 8 ms per phone photo, at the price of that much resident memory while idle.
Image.core.set_blocks_max(8)


@dataclass(frozen=True)
class TranscodeResult:
    """What an upload became. width x height is the original's upright size (for video, the frame's)."""

    kind: str
    width: int
    height: int
    variants: list[Variant]


def transcode(
    data: bytes, content_type: str, variants: VariantSet = DEFAULT_VARIANTS, limits: Limits = DEFAULT_LIMITS
) -> TranscodeResult:
    """Decode once and make every variant of the kind the bytes turn out to be.

    Raises PermanentImagingError when the input is refused. CPU-bound: call it from a
    worker process (Transcoder does), never on an event loop.
    """
    mime = sniff(data, content_type)
    if content_types.kind_of(mime) == "video":
        poster = decode_poster(data, mime, limits)
        made = make_variants(poster.image, poster.width, poster.height, (variants.poster, *variants.video))
        return TranscodeResult("video", poster.width, poster.height, made)
    largest = max(spec.box for spec in variants.image)
    still = decode_image(data, mime, limits, largest)
    made = make_variants(still.image, still.width, still.height, variants.image)
    return TranscodeResult("image", still.width, still.height, made)
