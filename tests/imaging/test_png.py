"""PNG chunks Pillow's reader gets wrong, in PNGs written here chunk by chunk: each variant shows what a browser shows."""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import zlib
from collections.abc import Callable

import av
import pytest
from PIL import Image, ImageCms

from mediavault.imaging import DEFAULT_LIMITS, DEFAULT_VARIANTS, transcode
from mediavault.imaging.animation import ANIMATION, GIFV
from mediavault.imaging.colour import DISPLAY_P3
from mediavault.imaging.decode import decode_with_pillow, open_image
from mediavault.imaging.formats import AVIF
from tests.imaging.helpers import check_variants, corpus, open_variant, power_law_profile
from tests.imaging.test_animation import NONE, SOURCE, drawn_apng

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
GREY, RGB, GREY_ALPHA, RGBA = 0, 2, 4, 6


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_file(
    width: int,
    height: int,
    bit_depth: int,
    colour_type: int,
    rows: list[bytes],
    before_pixels: bytes = b"",
    after_pixels: bytes = b"",
) -> bytes:
    """A PNG of unfiltered rows, with `before_pixels` (whole chunks) between its IHDR and its IDAT
    and `after_pixels` between its IDAT and its IEND."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + before_pixels
        + chunk(b"IDAT", pixels)
        + after_pixels
        + chunk(b"IEND", b"")
    )


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
        "display": [],
        "preview": [AVIF],
        "thumbnail": [AVIF],
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


@pytest.mark.parametrize(
    ("bit_depth", "transparent", "level"),
    [
        (2, 3, 255),
        (2, 1, 85),
        (4, 5, 85),
        (4, 15, 255),
        # Past the bit depth: masked to it, as libpng masks it.
        (2, 6, 170),
    ],
)
def test_a_grey_png_of_few_bits_keeps_its_transparent_level(bit_depth: int, transparent: int, level: int) -> None:
    # A stripe of each level the bit depth has, 16 pixels wide: whole bytes of pixels of that level.
    levels = range(1 << bit_depth)
    per_byte = 8 // bit_depth
    row = b"".join(bytes([sum(value << bit_depth * i for i in range(per_byte))]) * (16 // per_byte) for value in levels)
    width = 16 * len(levels)
    data = png_file(width, 16, bit_depth, GREY, [row] * 16, chunk(b"tRNS", struct.pack(">H", transparent)))
    display = open_variant(transcode(data, "image/png").variants[0].data)
    assert display.mode == "RGBA"
    scale = 255 // ((1 << bit_depth) - 1)
    for value in levels:
        red, _, _, alpha = display.getpixel((16 * value + 8, 8))
        assert abs(red - value * scale) <= 3, (value, red)
        assert (alpha < 8) if value * scale == level else (alpha > 247), (value, alpha)


# Stripes of these levels, each STRIPE pixels wide: a pixel of a stripe is (level, 255 - level,
# level // 2) in colour, the level in grey.
LEVELS = (16, 48, 96, 128, 160, 224)
STRIPE = 40
PALETTE = 3


def stripe_colours(colour_type: int) -> list[tuple[int, ...]]:
    return [(level,) if colour_type == GREY else (level, 255 - level, level // 2) for level in LEVELS]


def stripes(colour_type: int, bit_depth: int = 8, before_pixels: bytes = b"", after_pixels: bytes = b"") -> bytes:
    """A 240x64 PNG of LEVELS' stripes in grey, RGB or a palette, with those chunks around its IDAT."""
    colours = stripe_colours(colour_type)
    if colour_type == PALETTE:
        before_pixels += chunk(b"PLTE", b"".join(bytes(colour) for colour in colours))
        pixels = [bytes((index,)) for index in range(len(LEVELS))]
    else:
        sample = ">H" if bit_depth == 16 else ">B"
        pixels = [
            b"".join(struct.pack(sample, level * 257 if bit_depth == 16 else level) for level in colour) for colour in colours
        ]
    row = b"".join(pixel * STRIPE for pixel in pixels)
    return png_file(STRIPE * len(LEVELS), 64, bit_depth, colour_type, [row] * 64, before_pixels, after_pixels)


def gama(gamma: int) -> bytes:
    return chunk(b"gAMA", struct.pack(">I", gamma))


def chrm(white: tuple[float, float], *primaries: tuple[float, float]) -> bytes:
    return chunk(b"cHRM", struct.pack(">8I", *(round(value * 100_000) for xy in (white, *primaries) for value in xy)))


SRGB_WHITE = (0.3127, 0.3290)
SRGB_PRIMARIES = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06))


def srgb_level(light: float) -> float:
    """The sRGB level (0-255) of a light (0-1), by IEC 61966-2-1's encoding."""
    return 255 * (12.92 * light if light <= 0.0031308 else 1.055 * light ** (1 / 2.4) - 0.055)


def shown(data: bytes) -> list[tuple[int, ...]]:
    """The colour at the centre of each stripe of the display variant, in RGB."""
    display = open_variant(next(v for v in transcode(data, "image/png").variants if v.name == "display").data)
    assert "icc_profile" not in display.info
    rgb = display.convert("RGB")
    return [rgb.getpixel((STRIPE * index + STRIPE // 2, 32)) for index in range(len(LEVELS))]


def assert_within(got: list[tuple[int, ...]], expected: list[tuple[float, ...]], levels: float) -> None:
    for pixel, colour in zip(got, expected, strict=True):
        assert max(abs(a - b) for a, b in zip(pixel, colour, strict=True)) <= levels, (got, expected)


@pytest.mark.parametrize(
    ("colour_type", "bit_depth"),
    [(GREY, 8), (GREY, 16), (RGB, 8), (RGB, 16), (PALETTE, 8)],
    ids=["grey", "grey-16", "rgb", "rgb-16", "palette"],
)
@pytest.mark.parametrize(
    "gamma",
    [
        # Linear levels: brighter than the same levels in sRGB (128 shows as 188).
        100_000,
        # 1/1.8, as older Macs wrote: brighter too.
        55_556,
        # 1/2.6: darker.
        38_462,
    ],
)
def test_a_png_with_gama_and_no_profile_is_shown_in_its_tone_curve_as_browsers_show_it(
    colour_type: int, bit_depth: int, gamma: int
) -> None:
    got = shown(stripes(colour_type, bit_depth, gama(gamma)))
    exponent = 100_000 / gamma
    expected = [tuple(srgb_level((value / 255) ** exponent) for value in colour) for colour in stripe_colours(colour_type)]
    assert_within(got, [colour * 3 if len(colour) == 1 else colour for colour in expected], 3)


@pytest.mark.parametrize(
    "colour_type",
    [GREY, RGB, GREY_ALPHA, RGBA],
    ids=["grey", "rgb", "grey-alpha", "rgba"],
)
@pytest.mark.parametrize("gamma", [100_000, 55_556])
def test_a_sixteen_bit_png_with_gama_takes_each_level_to_srgbs_curve_from_all_sixteen_bits(colour_type: int, gamma: int) -> None:
    # The darkest 16-bit levels, one every 16 across the picture: their top 8 bits (0 to 15) have
    # 16 levels to show what sRGB's curve shows in 72 (0 to 71 in a linear curve), the first 16
    # samples (0 to 12 in a linear curve) all as black.
    samples = [16 * x for x in range(256)]
    colours = {GREY: 1, RGB: 3, GREY_ALPHA: 1, RGBA: 3}[colour_type]
    alpha = [0xC0FF] if colour_type in (GREY_ALPHA, RGBA) else []
    pixels = [[sample * (1 + band) for band in range(colours)] + alpha for sample in samples]
    row = b"".join(struct.pack(f">{len(pixel)}H", *pixel) for pixel in pixels)
    data = png_file(256, 4, 16, colour_type, [row] * 4, gama(gamma))
    still = decode_with_pillow(open_image(data, "image/png", DEFAULT_LIMITS), DEFAULT_VARIANTS.image).image
    exponent = 100_000 / gamma
    for x, sample in enumerate(samples):
        pixel = still.getpixel((x, 2))
        assert isinstance(pixel, tuple)
        expected = [srgb_level((sample * (1 + band) / 65535) ** exponent) for band in range(colours)] * (3 // colours)
        assert max(abs(a - b) for a, b in zip(pixel[:3], expected, strict=True)) <= 1, (sample, pixel, expected)
        # The alpha keeps its top 8 bits.
        assert pixel[3:] == tuple(level >> 8 for level in alpha)


def iccp(profile: bytes) -> bytes:
    return chunk(b"iCCP", b"sRGB profile\0\0" + zlib.compress(profile))


SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize(
    ("before_pixels", "after_pixels"),
    [
        # The chunks that name the colours outright take precedence over gAMA.
        pytest.param(chunk(b"sRGB", b"\0") + gama(100_000), b"", id="srgb"),
        pytest.param(gama(100_000) + iccp(SRGB_ICC), b"", id="iccp"),
        # BT.709 primaries, sRGB's transfer, RGB, full range.
        pytest.param(chunk(b"cICP", bytes((1, 13, 0, 1))) + gama(100_000), b"", id="cicp"),
        # 1/2.2 with no cHRM is what writers put beside sRGB levels; within 5% of it, as Chrome and libpng.
        pytest.param(gama(45_455), b"", id="gama-45455"),
        pytest.param(gama(47_000), b"", id="gama-within-5-percent"),
        # Out of libpng's bounds (16 to 625,000,000): ignored.
        pytest.param(gama(0), b"", id="gama-0"),
        pytest.param(gama(15), b"", id="gama-15"),
        pytest.param(gama(625_000_001), b"", id="gama-huge"),
        pytest.param(gama(0xFFFF_FFFF), b"", id="gama-largest"),
        pytest.param(chunk(b"gAMA", b"\0\1\x86\xa0\0"), b"", id="gama-too-long"),
        # cHRM says nothing without a gAMA.
        pytest.param(chrm(SRGB_WHITE, (0.30, 0.60), (0.64, 0.33), (0.15, 0.06)), b"", id="chrm-alone"),
        # After the pixels a gAMA is out of place; Pillow reads it there, libpng does not.
        pytest.param(b"", gama(100_000), id="gama-after-idat"),
    ],
)
def test_gama_is_ignored_where_browsers_ignore_it(before_pixels: bytes, after_pixels: bytes) -> None:
    assert_within(shown(stripes(RGB, 8, before_pixels, after_pixels)), stripe_colours(RGB), 3)


LINEAR_ICC = power_law_profile(SRGB_PRIMARIES, SRGB_WHITE, 1.0, "Linear sRGB")


@pytest.mark.parametrize(
    ("before_pixels", "exponent"),
    [
        pytest.param(b"", None, id="alone"),
        # The gAMA before the pixels counts, as if the iCCP were not there.
        pytest.param(gama(55_556), 1.8, id="after-a-gama"),
    ],
)
def test_an_iccp_after_the_pixels_is_ignored_as_browsers_ignore_it(before_pixels: bytes, exponent: float | None) -> None:
    # Pillow reads it as it loads the pixels; libpng, and so browsers, ignore it there.
    got = shown(stripes(RGB, 8, before_pixels, iccp(LINEAR_ICC)))
    colours = stripe_colours(RGB)
    expected = colours if exponent is None else [tuple(srgb_level((v / 255) ** exponent) for v in c) for c in colours]
    assert_within(got, expected, 3)


def test_an_iccp_after_the_pixels_leaves_the_chrm_before_them_converted() -> None:
    # sRGB's red and green swapped: a stripe of full red and no green shows as green.
    primaries = chrm(SRGB_WHITE, (0.30, 0.60), (0.64, 0.33), (0.15, 0.06))
    red = png_file(240, 64, 8, RGB, [bytes((255, 0, 0)) * 240] * 64, gama(45_455) + primaries, iccp(LINEAR_ICC))
    display = open_variant(transcode(red, "image/png").variants[0].data).convert("RGB")
    assert_within([display.getpixel((120, 32))], [(0, 255, 0)], 4)


def test_the_animation_of_a_png_ignores_an_iccp_after_its_pixels() -> None:
    frames = [Image.new("L", (64, 48), level) for level in (64, 128)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=100)
    data = buffer.getvalue()
    idat = data.index(b"IDAT") - 4
    after_idat = idat + 12 + struct.unpack(">I", data[idat : idat + 4])[0]
    late = data[:after_idat] + iccp(LINEAR_ICC) + data[after_idat:]
    made = {variant.name: variant.data for variant in transcode(late, "image/png").animation.variants}
    # Converted from the linear profile, 64 would show as 137.
    assert abs(Image.open(io.BytesIO(made[ANIMATION])).convert("L").getpixel((32, 24)) - 64) <= 4


@pytest.mark.parametrize(
    ("first", "second", "exponent"),
    [
        pytest.param(LINEAR_ICC, SRGB_ICC, 1.0, id="linear-first"),
        pytest.param(SRGB_ICC, LINEAR_ICC, None, id="srgb-first"),
    ],
)
def test_of_two_iccps_the_first_counts_as_libpng_keeps_it(first: bytes, second: bytes, exponent: float | None) -> None:
    # Pillow keeps the last; libpng, and so browsers, the first.
    got = shown(stripes(RGB, 8, iccp(first) + iccp(second)))
    colours = stripe_colours(RGB)
    expected = colours if exponent is None else [tuple(srgb_level((v / 255) ** exponent) for v in c) for c in colours]
    assert_within(got, expected, 3)


def test_the_animation_of_a_png_with_two_iccps_is_converted_from_the_first() -> None:
    frames = [Image.new("RGB", (64, 48), (level,) * 3) for level in (64, 128)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=100)
    data = buffer.getvalue()
    # After the signature and the IHDR chunk.
    two = data[:33] + iccp(LINEAR_ICC) + iccp(SRGB_ICC) + data[33:]
    made = {variant.name: variant.data for variant in transcode(two, "image/png").animation.variants}
    # Linear light 64 is sRGB's 137.
    assert abs(Image.open(io.BytesIO(made[ANIMATION])).convert("L").getpixel((32, 24)) - 137) <= 4


@pytest.mark.parametrize(
    ("colour_type", "broken"),
    [
        pytest.param(RGB, chunk(b"iCCP", b"profile\0\0" + b"not deflate data"), id="not-inflatable"),
        pytest.param(RGB, iccp(b"not a profile" * 20), id="not-a-profile"),
        pytest.param(RGB, iccp(SRGB_ICC[:200]), id="truncated"),
        # Of other colours than the pixels': libpng drops an RGB profile in a grey PNG.
        pytest.param(GREY, iccp(SRGB_ICC), id="rgb-profile-in-grey"),
    ],
)
def test_a_png_whose_iccp_cannot_be_used_is_shown_by_its_gama_as_browsers_show_it(colour_type: int, broken: bytes) -> None:
    got = shown(stripes(colour_type, 8, gama(100_000) + broken))
    expected = [tuple(srgb_level(value / 255) for value in colour) for colour in stripe_colours(colour_type)]
    assert_within(got, [colour * 3 if len(colour) == 1 else colour for colour in expected], 3)


def test_a_png_whose_iccp_cannot_be_used_has_its_chrm_primaries_converted() -> None:
    # sRGB's red and green swapped: a stripe of full red and no green shows as green.
    primaries = chrm(SRGB_WHITE, (0.30, 0.60), (0.64, 0.33), (0.15, 0.06))
    broken = iccp(b"not a profile" * 20)
    red = png_file(240, 64, 8, RGB, [bytes((255, 0, 0)) * 240] * 64, broken + gama(45_455) + primaries)
    display = open_variant(transcode(red, "image/png").variants[0].data).convert("RGB")
    assert_within([display.getpixel((120, 32))], [(0, 255, 0)], 4)


def test_a_png_whose_iccp_cannot_be_used_is_still_srgb_by_its_srgb_chunk() -> None:
    # The sRGB chunk comes before gAMA in the precedence, an iCCP libpng drops or not.
    got = shown(stripes(RGB, 8, iccp(b"not a profile" * 20) + chunk(b"sRGB", b"\0") + gama(100_000)))
    assert_within(got, stripe_colours(RGB), 3)


def test_chrm_primaries_are_converted_to_srgb() -> None:
    # sRGB's red and green swapped: a stripe of full red and no green shows as green.
    primaries = chrm(SRGB_WHITE, (0.30, 0.60), (0.64, 0.33), (0.15, 0.06))
    red = png_file(240, 64, 8, RGB, [bytes((255, 0, 0)) * 240] * 64, gama(45_455) + primaries)
    display = open_variant(transcode(red, "image/png").variants[0].data).convert("RGB")
    assert "icc_profile" not in display.info
    assert_within([display.getpixel((120, 32))], [(0, 255, 0)], 4)


BT2020_PRIMARIES = ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046))


@pytest.mark.parametrize("gamma", [100_000, 45_455], ids=["linear", "gamma-2.2"])
def test_saturated_colours_of_wide_chrm_primaries_are_converted_from_their_own_tone_curve(gamma: int) -> None:
    """Every colour of a grid through the RGB cube, its faces included, where BT.2020's primaries clip
    to sRGB's: taken to 8-bit levels in sRGB's tone curve before their primaries were converted,
    saturated colours came out up to 14 levels off."""
    steps = range(0, 256, 8)
    colours = [(red, green, blue) for red in steps for green in steps for blue in steps]
    rows = [b"".join(bytes(colour) for colour in colours[y * 256 : (y + 1) * 256]) for y in range(len(colours) // 256)]
    data = png_file(256, len(rows), 8, RGB, rows, gama(gamma) + chrm(SRGB_WHITE, *BT2020_PRIMARIES))
    still = decode_with_pillow(open_image(data, "image/png", DEFAULT_LIMITS), DEFAULT_VARIANTS.image).image
    got = still.tobytes()
    exponent = 100_000 / gamma
    worst = max(
        abs(got[3 * index + band] - level)
        for index, colour in enumerate(colours)
        for band, level in enumerate(bt2020_in_srgb([(value / 255) ** exponent for value in colour]))
    )
    assert worst <= 1


def test_a_gama_beside_srgbs_own_chrm_still_sets_the_tone_curve() -> None:
    # Browsers build a profile of a gAMA beside any cHRM: 1/2.2 is a plain power law, not sRGB's curve.
    got = shown(stripes(RGB, 8, gama(45_455) + chrm(SRGB_WHITE, *SRGB_PRIMARIES)))
    expected = [tuple(srgb_level((value / 255) ** 2.2) for value in colour) for colour in stripe_colours(RGB)]
    assert_within(got, expected, 3)


def test_a_chrm_that_describes_no_colour_space_is_ignored_and_its_gama_still_counts() -> None:
    # The white outside the primaries' triangle.
    outside = chrm((0.05, 0.05), (0.30, 0.60), (0.64, 0.33), (0.15, 0.06))
    got = shown(stripes(RGB, 8, gama(100_000) + outside))
    expected = [tuple(srgb_level(value / 255) for value in colour) for colour in stripe_colours(RGB)]
    assert_within(got, expected, 3)


def test_a_png_whose_chrm_is_display_p3_keeps_its_gamut_tagged_display_p3() -> None:
    p3 = chrm(SRGB_WHITE, (0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
    red = png_file(240, 64, 8, RGB, [bytes((255, 0, 0)) * 240] * 64, gama(45_455) + p3)
    for name, variant in check_variants(transcode(red, "image/png"), IMAGE_VARIANTS).items():
        assert variant.info.get("icc_profile") == DISPLAY_P3, name
        assert_within([variant.convert("RGB").getpixel((variant.width // 2, variant.height // 2))], [(255, 0, 0)], 4)


def test_the_animation_of_a_png_with_gama_is_shown_in_its_tone_curve_as_its_stills() -> None:
    frames = [Image.new("L", (64, 48), level) for level in (128, 64)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=100)
    data = buffer.getvalue()
    # After the signature and the IHDR chunk.
    linear = data[:33] + gama(100_000) + data[33:]
    made = {variant.name: variant.data for variant in transcode(linear, "image/png").animation.variants}
    webp = Image.open(io.BytesIO(made[ANIMATION])).convert("L")
    with av.open(io.BytesIO(made[GIFV])) as container:
        mp4 = next(container.decode(video=0)).to_image().convert("L")
    for picture, tolerance in ((webp, 4), (mp4, 8)):
        assert abs(picture.getpixel((32, 24)) - round(srgb_level(128 / 255))) <= tolerance, picture.format


def cicp(primaries: int, transfer: int, matrix: int = 0, full_range: int = 1) -> bytes:
    return chunk(b"cICP", bytes((primaries, transfer, matrix, full_range)))


def test_a_png_whose_cicp_is_display_p3_keeps_its_gamut_tagged_display_p3() -> None:
    # Its iCCP, of other colours, comes after the cICP in the precedence.
    red = png_file(240, 64, 8, RGB, [bytes((255, 0, 0)) * 240] * 64, cicp(12, 13) + iccp(LINEAR_ICC))
    for name, variant in check_variants(transcode(red, "image/png"), IMAGE_VARIANTS).items():
        assert variant.info.get("icc_profile") == DISPLAY_P3, name
        assert_within([variant.convert("RGB").getpixel((variant.width // 2, variant.height // 2))], [(255, 0, 0)], 4)


def test_a_png_whose_cicp_is_srgb_is_shown_as_srgb_whatever_its_iccp() -> None:
    assert_within(shown(stripes(RGB, 8, cicp(1, 13) + iccp(LINEAR_ICC))), stripe_colours(RGB), 3)


@pytest.mark.parametrize(
    "ignored",
    [
        # Chrome reads only RGB as it is (matrix 0) in full range; the rest are codes we do not read.
        pytest.param(cicp(12, 13, matrix=1), id="ycbcr-matrix"),
        pytest.param(cicp(12, 13, full_range=0), id="limited-range"),
        pytest.param(cicp(1, 1), id="bt709-transfer"),
        pytest.param(cicp(99, 13), id="no-such-primaries"),
        pytest.param(chunk(b"cICP", bytes((12, 13, 0))), id="too-short"),
    ],
)
def test_a_cicp_browsers_ignore_leaves_the_png_to_its_iccp(ignored: bytes) -> None:
    got = shown(stripes(RGB, 8, ignored + iccp(LINEAR_ICC)))
    assert_within(got, [tuple(srgb_level(v / 255) for v in colour) for colour in stripe_colours(RGB)], 3)


def pq_nits(level: int) -> float:
    """SMPTE ST 2084's light, in cd/m2, of an 8-bit PQ level."""
    m1, m2, c1, c2, c3 = 0.1593017578125, 78.84375, 0.8359375, 18.8515625, 18.6875
    power = (level / 255) ** (1 / m2)
    return 10_000 * (max(power - c1, 0) / (c2 - c3 * power)) ** (1 / m1)


def hlg_nits(level: int) -> float:
    """BT.2100 HLG's light, in cd/m2, of an 8-bit grey level on a 1000 cd/m2 display (system gamma 1.2)."""
    signal = level / 255
    scene = signal**2 / 3 if signal <= 0.5 else (math.exp((signal - 0.55991073) / 0.17883277) + 0.28466892) / 12
    return 1000 * scene**1.2


# Linear BT.2020 to linear BT.709 (sRGB's primaries), both D65 (BT.2087).
BT2020_TO_BT709 = ((1.6605, -0.5876, -0.0728), (-0.1246, 1.1329, -0.0083), (-0.0182, -0.1006, 1.1187))


@pytest.mark.parametrize(("transfer", "nits"), [(16, pq_nits), (18, hlg_nits)], ids=["pq", "hlg"])
def test_a_png_whose_cicp_is_hdr_shows_its_sdr_range_as_an_sdr_screen_does(
    transfer: int, nits: Callable[[int], float]
) -> None:
    """BT.2100's reference white (203 cd/m2) is SDR's white, brighter light clipped to it; BT.2020's
    colours are converted to sRGB's."""
    got = shown(stripes(RGB, 8, cicp(9, transfer) + iccp(LINEAR_ICC)))
    expected = []
    for colour in stripe_colours(RGB):
        light = [min(nits(level) / 203, 1) for level in colour]
        in_bt709 = (sum(m * v for m, v in zip(row, light, strict=True)) for row in BT2020_TO_BT709)
        expected.append(tuple(srgb_level(min(max(value, 0), 1)) for value in in_bt709))
    assert_within(got, expected, 3)


@pytest.mark.parametrize(
    ("colour_type", "bit_depth"),
    [(GREY, 8), (GREY, 16), (GREY_ALPHA, 8), (GREY_ALPHA, 16)],
    ids=["grey", "grey-16", "grey-alpha", "grey-alpha-16"],
)
@pytest.mark.parametrize(("transfer", "nits"), [(16, pq_nits), (18, hlg_nits)], ids=["pq", "hlg"])
def test_a_grey_png_whose_cicp_is_hdr_is_shown_as_an_sdr_screen_shows_it(
    colour_type: int, bit_depth: int, transfer: int, nits: Callable[[int], float]
) -> None:
    """As an RGB one is (above): a grey's levels are its white, whatever the primaries."""
    sample, scale = ("H", 257) if bit_depth == 16 else ("B", 1)
    alpha = [255 * scale] if colour_type == GREY_ALPHA else []
    pixels = [struct.pack(f">{1 + len(alpha)}{sample}", level * scale, *alpha) for level in LEVELS]
    row = b"".join(pixel * STRIPE for pixel in pixels)
    data = png_file(STRIPE * len(LEVELS), 64, bit_depth, colour_type, [row] * 64, cicp(9, transfer))
    assert_within(shown(data), [(srgb_level(min(nits(level) / 203, 1)),) * 3 for level in LEVELS], 2)


def bt2020_in_srgb(light: list[float]) -> list[float]:
    """The sRGB levels of a colour's light in BT.2020's primaries, clipped to sRGB's gamut."""
    return [srgb_level(min(max(sum(m * v for m, v in zip(row, light, strict=True)), 0), 1)) for row in BT2020_TO_BT709]


@pytest.mark.parametrize("colour_type", [GREY, RGB, GREY_ALPHA, RGBA], ids=["grey", "rgb", "grey-alpha", "rgba"])
@pytest.mark.parametrize("transfer", [16, 18], ids=["pq", "hlg"])
def test_a_sixteen_bit_hdr_png_takes_each_level_to_srgb_from_all_sixteen_bits(colour_type: int, transfer: int) -> None:
    # 16-bit levels from black to past the reference white, one every 160: from their top 8 bits,
    # levels 256 apart showed as one (PQ's bands of 3 levels in sRGB near its reference white). A
    # colour's primaries are converted after, from 8 bits in sRGB's tone curve: within 2 levels.
    samples = [160 * x for x in range(256)]
    colours = {GREY: 1, RGB: 3, GREY_ALPHA: 1, RGBA: 3}[colour_type]
    alpha = [0xC0FF] if colour_type in (GREY_ALPHA, RGBA) else []
    # A colour a little warmer than grey, within sRGB's gamut once converted from BT.2020's primaries.
    pixels = [[sample * (16 - band) // 16 for band in range(colours)] + alpha for sample in samples]
    row = b"".join(struct.pack(f">{len(pixel)}H", *pixel) for pixel in pixels)
    data = png_file(256, 4, 16, colour_type, [row] * 4, cicp(9, transfer))
    still = decode_with_pillow(open_image(data, "image/png", DEFAULT_LIMITS), DEFAULT_VARIANTS.image).image
    nits = pq_nits if transfer == 16 else hlg_nits
    for x, pixel in enumerate(pixels):
        got = still.getpixel((x, 2))
        assert isinstance(got, tuple)
        # The 8-bit level of the light a 16-bit sample has, as pq_nits and hlg_nits take it.
        light = [min(nits(sample * 255 / 65535) / 203, 1) for sample in pixel[:colours]] * (3 // colours)
        expected = bt2020_in_srgb(light)
        assert max(abs(a - b) for a, b in zip(got[:3], expected, strict=True)) <= (1 if colours == 1 else 2), (pixel, got, expected)
        assert got[3:] == tuple(level >> 8 for level in alpha)


@pytest.mark.parametrize("default_image", [False, True], ids=["default-image-a-frame", "default-image-left-out"])
def test_the_animation_of_a_sixteen_bit_png_with_gama_is_toned_from_all_sixteen_bits(default_image: bool) -> None:
    # A linear 16-bit level below 256, whose top 8 bits are 0: black from those, 13 in sRGB's curve.
    rows = [struct.pack(">H", 255) * 64] * 48
    frames = [((0, 0, 64, 48), rows, NONE, SOURCE)] * 2
    data = drawn_apng((64, 48), 16, GREY, frames, gama(100_000), default=[bytes(128)] * 48 if default_image else None)
    result = transcode(data, "image/png")
    made = {variant.name: variant.data for variant in result.animation.variants}
    webp = Image.open(io.BytesIO(made[ANIMATION])).convert("L")
    with av.open(io.BytesIO(made[GIFV])) as container:
        mp4 = next(container.decode(video=0)).to_image().convert("L")
    display = open_variant(next(v for v in result.variants if v.name == "display").data).convert("L")
    expected = srgb_level(255 / 65535)
    for picture, tolerance in ((display, 1), (webp, 4), (mp4, 6)):
        assert abs(picture.getpixel((32, 24)) - expected) <= tolerance, (picture.format, picture.getpixel((32, 24)), expected)
