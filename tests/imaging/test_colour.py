"""Display P3 sources keep their gamut, tagged with our compact profile; sRGB stays untagged."""

from __future__ import annotations

import io
import itertools
import random
import struct
from collections.abc import Callable

import pillow_heif
import pytest
from PIL import Image, ImageChops, ImageCms

from mediavault.imaging import DEFAULT_LIMITS, DEFAULT_VARIANTS, formats, transcode
from mediavault.imaging.colour import D65, DISPLAY_P3, SRGB_PRIMARIES, is_display_p3, matrix_profile
from mediavault.imaging.decode import decode_with_pillow, open_image
from mediavault.imaging.strategies import LosslessJpeg, PillowPipeline, choose
from tests.imaging.helpers import (
    assert_no_metadata,
    check_variants,
    corpus,
    mean_difference,
    open_variant,
    power_law_profile,
    transcoded,
)
from tests.imaging.test_png import bt2020_in_srgb, hlg_nits, pq_nits, srgb_level

IMAGE_VARIANTS = {spec.name for spec in DEFAULT_VARIANTS.image}
# The iPhone's own Display P3 profile, as its HEIC carries it.
APPLE_P3 = Image.open(corpus("images/heic/IMG_5195.HEIC")).info["icc_profile"]
# Linear Display P3 to linear sRGB (both D65).
P3_TO_SRGB = ((1.2249, -0.2247, 0.0), (-0.0420, 1.0419, 0.0), (-0.0197, -0.0786, 1.0979))


def linear(level: int) -> float:
    value = level / 255
    return value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4


def in_linear_srgb(p3_pixel: tuple[int, ...]) -> tuple[float, ...]:
    rgb = [linear(v) for v in p3_pixel[:3]]
    return tuple(sum(row[i] * rgb[i] for i in range(3)) for row in P3_TO_SRGB)


def p3_red_photo(fmt: str, size: tuple[int, int] = (1600, 1200), **params: object) -> bytes:
    """Saturated P3 red on the left half, a P3 green on the right, tagged with Apple's profile."""
    picture = Image.new("RGB", size, (255, 0, 0))
    picture.paste((0, 255, 0), (size[0] // 2, 0, size[0], size[1]))
    exif = Image.Exif()
    exif[0x010F] = "Apple"
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)
    buffer = io.BytesIO()
    picture.save(buffer, fmt, icc_profile=APPLE_P3, exif=exif, **params)
    return buffer.getvalue()


def test_the_profile_is_display_p3_and_compact() -> None:
    profile = ImageCms.ImageCmsProfile(io.BytesIO(DISPLAY_P3))
    assert ImageCms.getProfileDescription(profile).strip() == "Display P3"
    assert len(DISPLAY_P3) <= 600
    assert is_display_p3(APPLE_P3)
    assert is_display_p3(DISPLAY_P3)
    assert not is_display_p3(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    assert not is_display_p3(Image.open(corpus("images/formats/icc_profile_big.jpg")).info["icc_profile"])
    assert not is_display_p3(b"not a profile")


@pytest.mark.parametrize(("fmt", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_a_saturated_p3_red_stays_outside_srgb_in_every_variant(fmt: str, mime: str) -> None:
    result = transcode(p3_red_photo(fmt, quality=95) if fmt == "JPEG" else p3_red_photo(fmt), mime)
    for name, picture in check_variants(result, IMAGE_VARIANTS).items():
        assert picture.info["icc_profile"] == DISPLAY_P3, name
        red = picture.convert("RGB").getpixel((picture.width // 4, picture.height // 2))
        assert isinstance(red, tuple)
        srgb = in_linear_srgb(red)
        # Clipped to sRGB, P3 red would come back as sRGB red: green and blue at zero.
        assert srgb[0] > 1.1, (name, red, srgb)
        assert min(srgb[1:]) < -0.02, (name, red, srgb)
        # GPS and the rest of the EXIF are gone all the same (check_variants), only the profile is left.
        assert not picture.getexif()


@pytest.mark.parametrize(("fmt", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_the_avif_alternates_of_a_p3_photo_keep_its_gamut_and_carry_nothing_else(fmt: str, mime: str) -> None:
    result = transcode(p3_red_photo(fmt, quality=95) if fmt == "JPEG" else p3_red_photo(fmt), mime)
    alternates = [alternate for variant in result.variants for alternate in variant.alternates]
    assert {(a.name, a.content_type) for a in alternates} == {("thumbnail", "image/avif"), ("preview", "image/avif")}
    for alternate in alternates:
        picture = open_variant(alternate.data)
        assert picture.info.get("icc_profile") == DISPLAY_P3, alternate.name
        assert not picture.getexif()
        assert not picture.info.get("exif")
        assert not picture.info.get("xmp")
        red = picture.convert("RGB").getpixel((picture.width // 4, picture.height // 2))
        assert isinstance(red, tuple)
        srgb = in_linear_srgb(red)
        assert srgb[0] > 1.1, (alternate.name, red, srgb)
        assert min(srgb[1:]) < -0.02, (alternate.name, red, srgb)


def test_the_webp_of_a_p3_picture_keeps_its_profile() -> None:
    picture = decode_with_pillow(open_image(p3_red_photo("PNG"), "image/png", DEFAULT_LIMITS), DEFAULT_VARIANTS.image).image
    decoded = open_variant(formats.encode(picture.resize((300, 225)), formats.WEBP, 90))
    assert decoded.info.get("icc_profile") == DISPLAY_P3
    assert_no_metadata(decoded, formats.encode(picture.resize((300, 225)), formats.WEBP, 90))


def test_an_upright_p3_jpeg_is_its_own_display_with_our_profile() -> None:
    data = p3_red_photo("JPEG", quality=95)
    strategy = choose(open_image(data, "image/jpeg", DEFAULT_LIMITS), data, DEFAULT_VARIANTS.image)
    assert isinstance(strategy, LosslessJpeg)
    assert "Display P3" in strategy.reason
    display = Image.open(io.BytesIO(strategy.display))
    assert display.info["icc_profile"] == DISPLAY_P3
    assert display.tobytes() == Image.open(io.BytesIO(data)).tobytes()
    # The smaller variants' picture keeps the colours and the profile, as Pillow's decode did.
    largest = max(DEFAULT_VARIANTS.image, key=lambda spec: spec.box)
    smaller = [spec for spec in DEFAULT_VARIANTS.image if spec is not largest]
    expected = decode_with_pillow(open_image(data, "image/jpeg", DEFAULT_LIMITS), smaller).image
    assert strategy.picture is not None
    assert strategy.picture.info == expected.info == {"icc_profile": DISPLAY_P3}
    assert strategy.picture.tobytes() == expected.tobytes()


def test_a_turned_p3_jpeg_keeps_its_colours_through_pillow() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    picture = Image.new("RGB", (1600, 1200), (255, 0, 0))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=95, icc_profile=APPLE_P3, exif=exif)
    data = buffer.getvalue()
    assert isinstance(choose(open_image(data, "image/jpeg", DEFAULT_LIMITS), data, DEFAULT_VARIANTS.image), PillowPipeline)
    for picture in check_variants(transcode(data, "image/jpeg"), IMAGE_VARIANTS).values():
        assert picture.size[1] > picture.size[0]
        assert picture.info["icc_profile"] == DISPLAY_P3


def test_the_iphone_heic_keeps_display_p3() -> None:
    for picture in check_variants(transcoded("images/heic/IMG_5195.HEIC"), IMAGE_VARIANTS).values():
        assert picture.info["icc_profile"] == DISPLAY_P3


@pytest.mark.parametrize("relative", ["images/camera/jolla.jpg", "images/camera/Canon_40D.jpg", "images/formats/hopper.png"])
def test_srgb_sources_stay_untagged(relative: str) -> None:
    for picture in check_variants(transcoded(relative), IMAGE_VARIANTS).values():
        assert "icc_profile" not in picture.info


def gradient(size: tuple[int, int] = (96, 64)) -> Image.Image:
    width, height = size
    picture = Image.new("RGB", size)
    picture.putdata([(x * 255 // (width - 1), y * 255 // (height - 1), 128) for y in range(height) for x in range(width)])
    return picture


def test_a_palette_png_in_display_p3_keeps_its_gamut() -> None:
    picture = Image.new("RGB", (200, 100), (255, 0, 0))
    picture.paste((0, 255, 0), (100, 0, 200, 100))
    buffer = io.BytesIO()
    # No tRNS: Pillow opens it as "P", not "RGBA".
    picture.convert("P").save(buffer, "PNG", icc_profile=APPLE_P3)
    for name, variant in check_variants(transcode(buffer.getvalue(), "image/png"), IMAGE_VARIANTS).items():
        assert variant.info.get("icc_profile") == DISPLAY_P3, name
        red = variant.convert("RGB").getpixel((variant.width // 4, variant.height // 2))
        assert isinstance(red, tuple)
        assert in_linear_srgb(red)[0] > 1.1, (name, red)


def test_a_palette_png_with_another_profile_is_converted_to_srgb() -> None:
    icc = Image.open(corpus("images/formats/icc_profile_big.jpg")).info["icc_profile"]
    buffer = io.BytesIO()
    gradient().convert("P", palette=Image.Palette.ADAPTIVE).save(buffer, "PNG", icc_profile=icc)
    source = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    expected = ImageCms.profileToProfile(source, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"))
    display = check_variants(transcode(buffer.getvalue(), "image/png"), IMAGE_VARIANTS)["display"]
    assert "icc_profile" not in display.info
    assert mean_difference(display, expected) < 3 < 6 < mean_difference(display, source)


def linear_srgb_profile() -> bytes:
    """sRGB's primaries and white with a linear tone curve, described as "Linear sRGB"."""
    return power_law_profile(SRGB_PRIMARIES, D65, 1.0, "Linear sRGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_profile_named_srgb_that_is_not_is_converted(fmt: str) -> None:
    # What a profile does decides, not its name: linear light level 64 shows as sRGB's 137.
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (64, 64, 64)).save(buffer, fmt, icc_profile=linear_srgb_profile(), quality=95)
    display = check_variants(transcode(buffer.getvalue(), f"image/{fmt.lower()}"), IMAGE_VARIANTS)["display"]
    assert "icc_profile" not in display.info
    pixel = display.getpixel((48, 32))
    assert max(abs(level - 137) for level in pixel) <= 2, pixel


P3_PRIMARIES = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
ADOBE_RGB_PRIMARIES = ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06))
PROPHOTO_PRIMARIES = ((0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001))
D50 = (0.3457, 0.3585)


@pytest.mark.parametrize(
    ("icc", "ramp_levels"),
    [
        # Tone curves much steeper than sRGB's in the shadows, which a 3D LUT bends there.
        pytest.param(power_law_profile(SRGB_PRIMARIES, D65, 1.0, "Linear sRGB"), 1, id="linear-srgb"),
        pytest.param(power_law_profile(P3_PRIMARIES, D65, 1.0, "Linear P3"), 1, id="linear-p3"),
        pytest.param(power_law_profile(ADOBE_RGB_PRIMARIES, D65, 563 / 256, "Adobe RGB (1998)"), 1, id="adobe-rgb"),
        # Its darkest greys the LUT lifted by up to 3 levels (1 to 4 showed as 2 to 5).
        pytest.param(power_law_profile(PROPHOTO_PRIMARIES, D50, 1.8, "ProPhoto RGB"), 1, id="prophoto"),
        pytest.param(Image.open(corpus("images/formats/icc_profile_big.jpg")).info["icc_profile"], 1, id="corpus-big"),
    ],
)
def test_a_profile_is_converted_as_lcms_converts_it(icc: bytes, ramp_levels: int) -> None:
    """A grey ramp within `ramp_levels` of lcms's own conversion (no banding in the shadows), and
    random colours within half a level of it on average."""
    greys = Image.frombytes("RGB", (256, 1), bytes(level for level in range(256) for _ in range(3))).resize((256, 16))
    colours = Image.frombytes("RGB", (256, 256), random.Random(7).randbytes(256 * 256 * 3))
    picture = Image.new("RGB", (256, 16 + 256))
    picture.paste(greys, (0, 0))
    picture.paste(colours, (0, 16))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", icc_profile=icc)
    still = decode_with_pillow(open_image(buffer.getvalue(), "image/png", DEFAULT_LIMITS), DEFAULT_VARIANTS.image).image
    expected = ImageCms.profileToProfile(picture, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"))
    ramp = ImageChops.difference(still.crop((0, 0, 256, 16)), expected.crop((0, 0, 256, 16)))
    assert max(highest for _, highest in ramp.getextrema()) <= ramp_levels
    assert mean_difference(still.crop((0, 16, 256, 272)), expected.crop((0, 16, 256, 272))) < 0.5


@pytest.mark.parametrize(
    "icc",
    [
        pytest.param(power_law_profile(ADOBE_RGB_PRIMARIES, D65, 563 / 256, "Adobe RGB (1998)"), id="adobe-rgb"),
        # A camera's wide gamut with sRGB's tone curve, whose grey ramp comes within a level of lcms's.
        pytest.param(matrix_profile(PROPHOTO_PRIMARIES, D50, "Wide gamut camera RGB"), id="wide-camera"),
    ],
)
def test_saturated_colours_of_a_wider_gamut_are_converted_as_lcms_converts_them(icc: bytes) -> None:
    """Every colour of a grid through the RGB cube, its faces included, where a wider gamut than
    sRGB's clips: a 3D LUT sampled from lcms showed them up to 20 and 29 levels off."""
    steps = range(0, 256, 4)
    picture = Image.frombytes("RGB", (512, 512), bytes(v for r in steps for g in steps for b in steps for v in (r, g, b)))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", icc_profile=icc)
    still = decode_with_pillow(open_image(buffer.getvalue(), "image/png", DEFAULT_LIMITS), DEFAULT_VARIANTS.image).image
    expected = ImageCms.profileToProfile(picture, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"))
    assert max(ImageChops.difference(still, expected).tobytes()) <= 1


def grey_profile(gamma: float) -> bytes:
    """A grey ICC v4 profile whose tone curve is a plain gamma."""
    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    d50 = (0.9642, 1.0, 0.8249)
    description = "Grey".encode("utf-16-be")
    tags = [
        (b"desc", b"mluc\0\0\0\0" + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(description), 28) + description),
        (b"wtpt", b"XYZ \0\0\0\0" + b"".join(s15(v) for v in d50)),
        (b"kTRC", b"para\0\0\0\0" + struct.pack(">HH", 0, 0) + s15(gamma)),
    ]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    size = offset + len(data)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"\0\0\0\0", 0x04300000, b"mntr", b"GRAY", b"XYZ ")
        + bytes(12) + b"acsp" + bytes(28) + b"".join(s15(v) for v in d50) + bytes(48)
    )
    return header + struct.pack(">I", len(tags)) + table + data


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey_with_a_grey_profile_is_converted_with_or_without_alpha(mode: str) -> None:
    icc = grey_profile(1.8)
    grey = Image.linear_gradient("L").resize((128, 64))
    picture = grey.convert(mode)
    if mode == "LA":
        picture.putalpha(Image.linear_gradient("L").rotate(90).resize((128, 64)).point(lambda v: 64 + v // 2))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", icc_profile=icc)
    expected = ImageCms.profileToProfile(grey, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"), outputMode="RGB")
    assert mean_difference(grey, expected) > 10
    display = check_variants(transcode(buffer.getvalue(), "image/png"), IMAGE_VARIANTS)["display"]
    assert display.mode == ("RGBA" if mode == "LA" else "RGB")
    assert mean_difference(display, expected) < 2


@pytest.mark.parametrize(("primaries", "wide"), [(12, True), (1, False)])
def test_a_heif_whose_colour_box_says_display_p3_keeps_its_gamut(primaries: int, wide: bool) -> None:
    """libheif's encoders (and some phones) describe the colours with an nclx box, not an ICC
    profile: H.273 primaries 12 with transfer 13 are Display P3, 1 with 13 are sRGB."""
    picture = Image.new("RGB", (200, 100), (255, 0, 0))
    buffer = io.BytesIO()
    picture.save(buffer, "HEIF", quality=95, color_primaries=primaries, transfer_characteristics=13, matrix_coefficients=6)
    assert "icc_profile" not in Image.open(io.BytesIO(buffer.getvalue())).info
    result = transcode(buffer.getvalue(), "image/heif")
    for name, variant in check_variants(result, IMAGE_VARIANTS).items():
        # Untagged, a variant's levels are read as sRGB's: the P3 red's would be clipped to sRGB red.
        assert variant.info.get("icc_profile") == (DISPLAY_P3 if wide else None), name
        assert variant.convert("RGB").getpixel((variant.width // 2, variant.height // 2))[0] > 250, name


@pytest.mark.parametrize(("primaries", "wide"), [(12, True), (1, False)])
def test_an_avif_whose_colour_box_says_display_p3_keeps_its_gamut(primaries: int, wide: bool) -> None:
    """As a HEIF's (above), for an AVIF: libavif reads the nclx box but Pillow's AVIF plugin
    passes on only an ICC profile."""
    buffer = io.BytesIO()
    Image.new("RGB", (200, 100), (255, 0, 0)).save(buffer, "AVIF", quality=95, speed=10)
    data = bytearray(buffer.getvalue())
    # libavif writes an nclx box when there is no ICC profile: primaries 1, transfer 13.
    colr = data.index(b"colrnclx") + 8
    assert struct.unpack(">HH", data[colr : colr + 4]) == (1, 13)
    struct.pack_into(">H", data, colr, primaries)
    assert "icc_profile" not in Image.open(io.BytesIO(bytes(data))).info
    result = transcode(bytes(data), "image/avif")
    for name, variant in check_variants(result, IMAGE_VARIANTS).items():
        assert variant.info.get("icc_profile") == (DISPLAY_P3 if wide else None), name
        assert variant.convert("RGB").getpixel((variant.width // 2, variant.height // 2))[0] > 250, name


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_a_picture_whose_colour_box_says_pq_is_shown_as_an_sdr_screen_shows_it(fmt: str) -> None:
    """The nclx box is read as a PNG's cICP is (tests/imaging/test_png.py): PQ's level 128 is 92
    cd/m2, 0.45 of its reference white, sRGB's 179."""
    buffer = io.BytesIO()
    grey = Image.new("RGB", (200, 100), (128, 128, 128))
    if fmt == "HEIF":
        grey.save(buffer, fmt, quality=95, color_primaries=9, transfer_characteristics=16, matrix_coefficients=9)
    else:
        grey.save(buffer, fmt, quality=95, speed=10)
    data = bytearray(buffer.getvalue())
    if fmt == "AVIF":
        colr = data.index(b"colrnclx") + 8
        struct.pack_into(">HH", data, colr, 9, 16)
    display = check_variants(transcode(bytes(data), f"image/{fmt.lower()}"), IMAGE_VARIANTS)["display"]
    assert "icc_profile" not in display.info
    assert max(abs(level - 179) for level in display.convert("RGB").getpixel((100, 50))) <= 4


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize(("transfer", "nits"), [(16, pq_nits), (18, hlg_nits)], ids=["pq", "hlg"])
def test_a_grey_picture_whose_colour_box_is_hdr_is_shown_as_an_sdr_screen_shows_it(
    fmt: str, transfer: int, nits: Callable[[int], float]
) -> None:
    """As a grey PNG's cICP is (tests/imaging/test_png.py): no RGB profile converts grey levels,
    which showed as they are, as sRGB's."""
    levels = (16, 64, 128, 160, 200)
    grey = Image.new("L", (40 * len(levels), 64))
    for i, level in enumerate(levels):
        grey.paste(level, (40 * i, 0, 40 * (i + 1), 64))
    buffer = io.BytesIO()
    if fmt == "HEIF":
        grey.save(buffer, fmt, quality=95, color_primaries=9, transfer_characteristics=transfer, matrix_coefficients=9)
    else:
        grey.save(buffer, fmt, quality=95, speed=10)
    data = bytearray(buffer.getvalue())
    if fmt == "AVIF":
        colr = data.index(b"colrnclx") + 8
        struct.pack_into(">HH", data, colr, 9, transfer)
    image = open_image(bytes(data), f"image/{fmt.lower()}", DEFAULT_LIMITS)
    assert image.mode == "L"
    still = decode_with_pillow(image, DEFAULT_VARIANTS.image).image
    assert "icc_profile" not in still.info
    for i, level in enumerate(levels):
        expected = srgb_level(min(nits(level) / 203, 1))
        got = still.getpixel((40 * i + 20, 32))
        assert isinstance(got, tuple)
        assert max(abs(value - expected) for value in got) <= 2, (level, got, expected)


def ten_bit_heif(samples: list[list[int]], transfer: int) -> bytes:
    """A lossless 10-bit HEIF, one row of 4 of each of these pixels' 10-bit levels (one for grey,
    three for RGB), whose nclx box names BT.2020's primaries with `transfer`."""
    colours = len(samples[0])
    row = b"".join(struct.pack(f"<{colours}H", *(level << 6 for level in pixel)) for pixel in samples) * 4
    size = (len(samples), 4)
    buffer = io.BytesIO()
    params = {"quality": -1, "color_primaries": 9, "transfer_characteristics": transfer, "matrix_coefficients": 0, "full_range_flag": 1}
    if colours == 1:
        Image.frombytes("I;16", size, row).save(buffer, "HEIF", **params)
    else:
        pillow_heif.from_bytes(mode="RGB;16", size=size, data=row).save(buffer, chroma=444, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("colours", [1, 3], ids=["grey", "rgb"])
@pytest.mark.parametrize(("transfer", "nits"), [(16, pq_nits), (18, hlg_nits)], ids=["pq", "hlg"])
def test_a_ten_bit_hdr_heif_takes_each_level_to_srgb_from_all_its_bits(
    colours: int, transfer: int, nits: Callable[[int], float]
) -> None:
    # Every 10-bit level, black to white: from the 8 bits pillow-heif's plugin gives, four levels
    # showed as one (PQ's bands of 5 levels in sRGB near its reference white). A colour's primaries
    # are converted after, from 8 bits in sRGB's tone curve: within 2 levels, as a 16-bit PNG's
    # (tests/imaging/test_png.py).
    levels = range(1024)
    # A colour a little warmer than grey, within sRGB's gamut once converted from BT.2020's primaries.
    samples = [[level * (16 - band) // 16 for band in range(colours)] for level in levels]
    image = open_image(ten_bit_heif(samples, transfer), "image/heif", DEFAULT_LIMITS)
    still = decode_with_pillow(image, DEFAULT_VARIANTS.image).image
    assert "icc_profile" not in still.info
    within = 1 if colours == 1 else 2
    for x, pixel in enumerate(samples):
        got = still.getpixel((x, 2))
        assert isinstance(got, tuple)
        # nits takes an 8-bit level: the 10-bit one's light as a fraction of 255.
        light = [min(nits(level * 255 / 1023) / 203, 1) for level in pixel] * (3 // colours)
        expected = bt2020_in_srgb(light)
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= within, (pixel, got, expected)
    # No bands: each level shown is at most that far from the next.
    reds = sorted(set(still.getchannel("R").tobytes()))
    assert max(b - a for a, b in itertools.pairwise(reds)) <= within
