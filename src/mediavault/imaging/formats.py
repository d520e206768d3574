"""The formats a variant is encoded in besides its primary one: AVIF for the feed's images.

Every variant has a primary format, JPEG (WebP for pictures with alpha), which every client
decodes. A spec's `alternates` (spec.Alternate) are made from the same resized pixels in
the same job, so a client that decodes them (MediaService's `accept`) gets the same picture
in fewer bytes. The choices, per variant and format, follow from bench/delivery.py's
figures (bench/README.md, delivery), each format at the quality that scores at least as
well as the JPEG (SSIMULACRA2 against the unencoded resize):

- AVIF for the thumbnail and the preview, made eagerly: they are what a feed page is made
  of, AVIF takes about a fifth fewer bytes than the JPEG at that quality, and every current
  major browser and phone decodes it, so nearly every view is an AVIF view, the first one
  included. At libaom's fastest speed the two encodes cost about two fifths of the job.
- WebP for the thumbnail and the preview, made on request (`spec.Alternate.eager` False):
  a WebP that scores as well is only about an eighth smaller than the JPEG, it is served
  only to clients that decode WebP but not AVIF, and at its smallest setting it costs
  about three times the AVIF's encoding time, which made eagerly would slow every upload's
  job for the few views it serves. The first such client asks for it (MediaService's
  `accept`), gets the JPEG meanwhile, and the `make_formats` job (workers/formats.py)
  makes it from the original (a video's from its poster frame); the next views get the
  WebP. Pictures with alpha have WebP as their primary, and AVIF beside it.
- The display variant keeps its primary alone: it is opened one at a time, and an AVIF of
  its size costs many times the whole JPEG job.
- Per picture, an alternate no smaller than its primary is left out (`alternates`); one made
  on request is compared with the primary the upload's job stored.

AVIF comes from libavif through pillow-avif-plugin (the wheel bundles libaom to encode
and dav1d to decode; pillow-heif's libheif is built without an AV1 encoder). Alpha is kept.
"""

from __future__ import annotations

import io
from collections.abc import Collection

import pillow_avif  # noqa: F401  registers the AVIF encoder with Pillow
from PIL import Image

from mediavault.imaging.spec import VariantSpec

AVIF = "image/avif"
WEBP = "image/webp"
JPEG = "image/jpeg"

# libaom's fastest all-intra speed. Speed 8 makes the AVIF about a twelfth smaller at a
# matched quality, but its encodes take a few times as long, which more than doubles the
# multi-format job and takes it far below the goal of three times stock Pillow's JPEG-only
# throughput; 7 and 6 cost more time still (bench/README.md, delivery). One thread: a pool
# runs one worker per core.
_AVIF_SPEED = 9
# 4:2:0 keeps the AVIF in AV1's Main profile, which AVIF's Baseline profile requires and
# so every AVIF decoder takes; 4:4:4 would need the High profile (AVIF's Advanced) for
# about 4% fewer bytes. libavif already picks libaom's image tuning (tune=iq)
# for a still; the other tunings and the delta-q and sharpness options measured larger.
_AVIF_SUBSAMPLING = "4:2:0"
# libwebp's slowest, smallest effort, which is how bench/delivery.py weighs WebP (not made
# beside a JPEG, see above): about 4% fewer bytes than the default 4 at a matched quality.
# Sharp YUV (cwebp's -sharp_yuv; Pillow has no option for it) measured larger.
_WEBP_METHOD = 6


def encode(picture: Image.Image, content_type: str, quality: int) -> bytes:
    """The picture (RGB or RGBA, or YCbCr as the planes strategy resizes) in AVIF or WebP, with no
    metadata but a wide-colour picture's profile."""
    # Set on Display P3 pictures only (decode._to_srgb), as on their JPEG: without it a
    # decoder reads the P3 levels as sRGB and the colours lose their gamut. An ICC colour
    # box is how pillow-avif-plugin tags an AVIF (it has no nclx option); sRGB goes untagged.
    icc = picture.info.get("icc_profile") or b""
    if picture.mode not in ("RGB", "RGBA"):
        picture = picture.convert("RGB")
    elif getattr(picture, "n_frames", 1) > 1:
        # A still no resize or conversion copied is the opened file itself (decode._to_srgb), and
        # pillow-avif-plugin decodes every frame of a file to see whether all are grey, then
        # encodes frame 0, which is not the still of an APNG whose default image is left out of
        # its animation (decode.first_frame): it gets the still's pixels alone.
        picture = picture.copy()
    buffer = io.BytesIO()
    if content_type == AVIF:
        picture.save(buffer, "AVIF", quality=quality, speed=_AVIF_SPEED, max_threads=1, codec="aom",
                     subsampling=_AVIF_SUBSAMPLING, exif=b"", xmp=b"", icc_profile=icc)
    elif content_type == WEBP:
        picture.save(buffer, "WEBP", quality=quality, method=_WEBP_METHOD, exif=b"", xmp=b"", icc_profile=icc)
    else:
        raise ValueError(f"no alternate encoder for {content_type}")
    return buffer.getvalue()


def alternates(
    picture: Image.Image, spec: VariantSpec, primary: str, primary_bytes: int, requested: Collection[str] | None = None
) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each of the spec's eager alternates (or of those `requested`)
    but the primary's format that is smaller than the primary.

    An alternate at least as large as the primary is left out: at its quality it looks no
    better (the qualities are matched), so a client that prefers its format is better
    served by the primary. That also keeps every alternate within the variant's budget.
    """
    made = []
    for alternate in spec.alternates:
        wanted = alternate.eager if requested is None else alternate.content_type in requested
        if not wanted or alternate.content_type == primary:
            continue
        data = encode(picture, alternate.content_type, alternate.quality)
        if len(data) < primary_bytes:
            made.append((alternate.content_type, data))
    return made
