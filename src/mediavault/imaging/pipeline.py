"""The synchronous pipeline one worker process runs: bytes and a declared type in, variants out."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

from PIL import Image, ImageFile

from mediavault.domain import content_types
from mediavault.imaging.decode import decode_image, decode_poster, sniff
from mediavault.imaging.spec import DEFAULT_LIMITS, DEFAULT_VARIANTS, Limits, VariantSet
from mediavault.imaging.variants import Variant, make_variants

# Pillow returns each freed 16 MB image block to the OS and page-faults it back in on
# the next job; keeping up to eight (a 12 MP photo and its rotated copy use six) saves
# about 8 ms per phone photo, at the price of that much resident memory while idle.
Image.core.set_blocks_max(8)
# tobytes() and the encoders hand out their output in chunks of MAXBLOCK bytes, and
# Pillow's raw encoder slows down with many small chunks: an 8 MP luma plane took
# 8.6 ms at the default 64 KiB, 0.5 ms at 4 MiB.
ImageFile.MAXBLOCK = 4 * 1024 * 1024


def _keep_freed_memory() -> None:
    # The same for glibc's malloc, which holds the planes, encoded bytes and libjpeg's
    # buffers: by default it maps each large buffer afresh and unmaps it on free, and
    # on this VM the page faults of the next job cost about 5 ms per phone photo.
    # Serving buffers up to 32 MB from the heap and keeping 64 MB of freed heap
    # removes three quarters of those faults. (Not glibc: nothing to tune.)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_keep_freed_memory()


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
    still = decode_image(data, mime, limits, variants.image)
    made = make_variants(still.image, still.width, still.height, variants.image)
    return TranscodeResult("image", still.width, still.height, made)
