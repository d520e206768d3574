"""ThumbHash: a placeholder of about 25 bytes that a client decodes to a blurred picture while the variant loads.

The encoder of Evan Wallace's reference (github.com/evanw/thumbhash, MIT), written out in
C (_pixels.c): the picture's average colour, then the lowest DCT frequencies of its luminance,
two colour-difference channels and (when there is transparency) alpha, quantised to 4
bits each. Unlike BlurHash it keeps the aspect ratio and alpha, and needs no parameters.

The reference encodes any picture up to 100x100; this one reads the smallest variant
box-averaged into 32x32, whose lowest seven frequencies are those of the whole picture,
so that the DCT reads a tenth of the pixels.
"""

from __future__ import annotations

import io

from PIL import Image

from mediavault.imaging import _pixels

# The side the picture is averaged down to; the reference allows up to 100.
_SIDE = 32


def from_variant(data: bytes) -> bytes:
    """The ThumbHash of an encoded variant (one this pipeline made, never an upload)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            # libjpeg scales by 1/8 in the IDCT: a 300-wide thumbnail decodes at 38 wide.
            image.draft("RGB", (_SIDE, _SIDE))
        picture = image.convert("RGBA")
    picture.thumbnail((_SIDE, _SIDE), Image.Resampling.BOX)
    return encode(picture.width, picture.height, picture.tobytes())


def encode(width: int, height: int, rgba: bytes) -> bytes:
    """The ThumbHash of width x height RGBA pixels (at most 100x100), as the reference computes it.

    In C (_pixels.thumbhash): the same bytes as the encoder written out in Python that it
    replaced, which tests/imaging/thumbhash_reference.py keeps to compare against.
    """
    return _pixels.thumbhash(width, height, rgba)
