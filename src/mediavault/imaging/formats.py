"""The formats a variant is encoded in besides its primary one: AVIF for the feed's images.

Every variant has a primary format, JPEG (WebP for pictures with alpha), which every client
decodes. A spec's `alternates` (spec.Alternate) are made from the same resized pixels in
the same job, so a client that decodes them (MediaService's `accept`) gets the same picture
in fewer bytes. The choices, per variant and format, follow from bench/delivery.py's
figures (bench/README.md, delivery), each format at the quality that scores at least as
well as the JPEG (SSIMULACRA2 against the unencoded resize):

- AVIF for the thumbnail and the preview, made eagerly: they are what a feed page is made
  of, AVIF takes fewer bytes than the JPEG at that quality, and each encode costs a small
  part of a job that decodes a whole photo. Made on demand instead, the first viewer of each
  item would wait for an encode, and a request would have to write variants.
- No WebP beside a JPEG: at these sizes a WebP that scores as well is about as large as the
  JPEG, so it would cost encoding time and storage for nothing; a client that prefers WebP
  gets the JPEG. Pictures with alpha have WebP as their primary, and AVIF beside it.
- The display variant keeps its primary alone: it is opened one at a time, and an AVIF of
  its size costs many times the whole JPEG job.
- Per picture, an alternate no smaller than its primary is left out (`alternates`).

AVIF comes from libavif through pillow-avif-plugin (the wheel bundles libaom to encode
and dav1d to decode; pillow-heif's libheif is built without an AV1 encoder). Alpha is kept.
"""

from __future__ import annotations

import io

import pillow_avif  # noqa: F401  registers the AVIF encoder with Pillow
from PIL import Image

from mediavault.imaging.spec import VariantSpec

AVIF = "image/avif"
WEBP = "image/webp"
JPEG = "image/jpeg"

# libaom's fastest speed for still images: slower speeds buy a few percent of bytes for
# several times the time (bench/README.md). One thread: a pool runs one worker per core.
_AVIF_SPEED = 9
# libwebp's default effort; method 2 is faster for a few percent more bytes.
_WEBP_METHOD = 4


def encode(picture: Image.Image, content_type: str, quality: int) -> bytes:
    """The picture (RGB or RGBA, or YCbCr as the planes strategy resizes) in AVIF or WebP, with no metadata."""
    if picture.mode not in ("RGB", "RGBA"):
        picture = picture.convert("RGB")
    buffer = io.BytesIO()
    if content_type == AVIF:
        picture.save(buffer, "AVIF", quality=quality, speed=_AVIF_SPEED, max_threads=1, codec="aom",
                     subsampling="4:2:0", exif=b"", xmp=b"", icc_profile=b"")
    elif content_type == WEBP:
        picture.save(buffer, "WEBP", quality=quality, method=_WEBP_METHOD, exif=b"", xmp=b"", icc_profile=b"")
    else:
        raise ValueError(f"no alternate encoder for {content_type}")
    return buffer.getvalue()


def alternates(picture: Image.Image, spec: VariantSpec, primary: str, primary_bytes: int) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each of the spec's alternates but the primary's format that is smaller than the primary.

    An alternate at least as large as the primary is left out: at its quality it looks no
    better (the qualities are matched), so a client that prefers its format is better
    served by the primary. That also keeps every alternate within the variant's budget.
    """
    made = []
    for alternate in spec.alternates:
        if alternate.content_type == primary:
            continue
        data = encode(picture, alternate.content_type, alternate.quality)
        if len(data) < primary_bytes:
            made.append((alternate.content_type, data))
    return made
