"""PNG chunks Pillow's reader gets wrong, in PNGs written here chunk by chunk: each variant shows what a browser shows."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import pytest
from PIL import Image

from mediavault.imaging import DEFAULT_VARIANTS, transcode
from mediavault.imaging.formats import AVIF
from tests.imaging.helpers import check_variants, corpus, open_variant

IMAGE_VARIANTS = {spec.name for spec in DEFAULT_VARIANTS.image}
# The default variants with their AVIF at a quality low enough to come out smaller than the WebP
# of a picture with alpha, so that it is made (an alternate no smaller than its primary is not).
SMALL_AVIF = dataclasses.replace(
    DEFAULT_VARIANTS,
    image=tuple(
        dataclasses.replace(spec, alternates=tuple(dataclasses.replace(a, quality=40) for a in spec.alternates))
        for spec in DEFAULT_VARIANTS.image
    ),
)
# IHDR colour types.
GREY, RGB = 0, 2


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_file(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes], before_pixels: bytes = b"") -> bytes:
    """A PNG of unfiltered rows, with `before_pixels` (whole chunks) between its IHDR and its IDAT."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + before_pixels + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def sixteen_bit_photo(patches: list[bytes]) -> list[bytes]:
    """Rows of an 800x600 16-bit RGB photo (a corpus photo's levels, each sample twice) with a
    200x200 square of each patch colour, given as its six bytes, centred at PATCH_CENTRES.
    A photo, not flat colours: of flat colours the WebP is smaller than any AVIF."""
    eight_bit = Image.open(corpus("images/camera/jolla.jpg")).convert("RGB").resize((800, 600)).tobytes()
    rows = [bytearray(sample for level in eight_bit[y * 2400 : (y + 1) * 2400] for sample in (level, level)) for y in range(600)]
    for patch, (x, y) in zip(patches, PATCH_CENTRES, strict=True):
        for row in rows[y - 100 : y + 100]:
            row[6 * (x - 100) : 6 * (x + 100)] = patch * 200
    return [bytes(row) for row in rows]


PATCH_CENTRES = ((200, 150), (600, 150), (200, 450), (600, 450))


@pytest.mark.parametrize(
    "transparent",
    [
        (0x1234, 0x5678, 0x9ABC),
        # Samples below 256, whose top bytes are 0.
        (0x0012, 0x0056, 0x009A),
    ],
)
def test_a_sixteen_bit_rgb_png_keeps_its_transparent_colour_matched_on_all_sixteen_bits(
    transparent: tuple[int, int, int],
) -> None:
    red, green, blue = transparent
    pixels = [
        struct.pack(">3H", red, green, blue),
        # The same top bytes: opaque.
        struct.pack(">3H", red, green, blue ^ 1),
        # Top bytes that are the colour's low bytes, which Pillow matched (the colour's low bytes
        # against the pixels' top bytes): opaque.
        struct.pack(">3H", (red & 0xFF) << 8, (green & 0xFF) << 8, (blue & 0xFF) << 8),
        struct.pack(">3H", 0xFFFF, 0x8000, 0),
    ]
    data = png_file(800, 600, 16, RGB, sixteen_bit_photo(pixels), chunk(b"tRNS", struct.pack(">3H", *transparent)))
    result = transcode(data, "image/png", SMALL_AVIF)
    decoded = check_variants(result, IMAGE_VARIANTS)
    assert {variant.name: [a.content_type for a in variant.alternates] for variant in result.variants} == {
        "display": [], "preview": [AVIF], "thumbnail": [AVIF]
    }
    pictures = [*decoded.values()] + [
        open_variant(alternate.data) for variant in result.variants for alternate in variant.alternates
    ]
    for picture in pictures:
        assert picture.mode == "RGBA", picture.format
        scale = picture.width / 800
        centres = [picture.getpixel((round(x * scale), round(y * scale))) for x, y in PATCH_CENTRES]
        assert centres[0][3] < 8, (picture.format, picture.size, centres)
        assert min(pixel[3] for pixel in centres[1:]) > 247, (picture.format, picture.size, centres)
        # The colours are the samples' top bytes, as without tRNS.
        assert max(abs(a - b) for a, b in zip(centres[3][:3], (255, 128, 0), strict=True)) < 6, centres
