"""JPEGs made into variants in their own YCbCr planes: which ones, and that the pixels come out right."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import pytest
from PIL import Image, ImageChops, ImageOps, ImageStat

from mediavault.imaging import (
    DEFAULT_LIMITS,
    DEFAULT_VARIANTS,
    PermanentImagingError,
    VariantSet,
    VariantSpec,
    transcode,
    turbojpeg,
)
from mediavault.imaging.decode import open_image
from mediavault.imaging.planar import Planes, covers
from mediavault.imaging.spec import DISPLAY, PREVIEW, THUMBNAIL, fit
from mediavault.imaging.strategies import PlanarJpeg, choose
from tests.imaging.helpers import check_variants, corpus, open_variant

IMAGE_VARIANTS = {spec.name for spec in DEFAULT_VARIANTS.image}
QUADRANTS = ((220, 30, 40), (30, 180, 60), (40, 60, 210), (240, 220, 40))


def quadrants(size: tuple[int, int]) -> Image.Image:
    """Four flat colours, one per quadrant: any turn, flip or chroma shift moves them."""
    width, height = size
    image = Image.new("RGB", size)
    half_w, half_h = width // 2, height // 2
    for colour, box in zip(QUADRANTS, ((0, 0, half_w, half_h), (half_w, 0, width, half_h),
                                       (0, half_h, half_w, height), (half_w, half_h, width, height)), strict=True):
        image.paste(colour, box)
    return image


def jpeg(image: Image.Image, subsampling: str, orientation: int = 1, **params: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    if subsampling == "4:4:0":
        # Pillow cannot write 4:4:0, which 28-hex_value.jpg and some phones use:
        # TurboJPEG writes it, and the EXIF segment goes in after the SOI marker.
        payload = exif.tobytes()
        segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
        data = turbojpeg.compress_planes(planes_440(image), *image.size, turbojpeg.SAMP_440, 95)
        return data[:2] + segment + data[2:]
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, subsampling=subsampling, exif=exif, **params)
    return buffer.getvalue()


def planes_440(image: Image.Image) -> list[bytes]:
    """Y at full size, Cb and Cr at half height, each padded to the size TurboJPEG reads."""
    y, cb, cr = image.convert("YCbCr").split()
    planes = []
    for component, plane in enumerate((y, cb.reduce((1, 2)), cr.reduce((1, 2)))):
        padded = Image.new("L", turbojpeg.plane_size(component, *image.size, turbojpeg.SAMP_440))
        padded.paste(plane, (0, 0))
        padded.paste(plane.crop((0, plane.height - 1, plane.width, plane.height)), (0, plane.height))
        planes.append(padded.tobytes())
    return planes


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference over the channels of two RGB pictures, compared at a common small size."""
    size = (64, round(64 * a.height / a.width))
    a = a.convert("RGB").resize(size, Image.Resampling.BOX)
    b = b.convert("RGB").resize(size, Image.Resampling.BOX)
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def decoded(data: bytes, specs: Sequence[VariantSpec] = DEFAULT_VARIANTS.image) -> Image.Image | Planes:
    """What the strategy chosen for the JPEG decodes it to, the lossless display left out
    (test_lossless has it): its planes, or a Pillow picture."""
    strategy = choose(open_image(data, "image/jpeg", DEFAULT_LIMITS), data, specs, lossless_display=False)
    if isinstance(strategy, PlanarJpeg):
        return strategy.decode(specs)
    return strategy.decode(specs).image


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("subsampling", ["4:2:0", "4:2:2", "4:4:4", "4:4:0"])
def test_every_orientation_and_subsampling_comes_out_upright_in_its_colours(subsampling: str, orientation: int) -> None:
    # Odd sizes: the luma is padded for the encoder and the chroma rounded up.
    source = quadrants((1601, 1203))
    data = jpeg(source, subsampling, orientation)
    assert isinstance(decoded(data), Planes)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    result = transcode(data, "image/jpeg", lossless_display=False)
    assert (result.width, result.height) == upright.size
    for name, variant in check_variants(result, IMAGE_VARIANTS).items():
        assert mean_difference(variant, upright) < 2.0, name


@pytest.mark.parametrize(
    ("size", "subsampling", "orientation"),
    [
        ((4032, 3024), "4:2:0", 1),
        ((4032, 3024), "4:2:2", 6),
        ((4101, 2999), "4:2:0", 8),
        ((4101, 2999), "4:4:4", 3),
        # Decoded at half scale (4050x3025), then resized to 4000x2988.
        ((8100, 6049), "4:2:0", 6),
    ],
)
def test_photos_larger_than_the_display_box_are_resized_in_their_planes(
    size: tuple[int, int], subsampling: str, orientation: int
) -> None:
    source = quadrants(size)
    data = jpeg(source, subsampling, orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    planes = decoded(data)
    assert isinstance(planes, Planes)
    result = transcode(data, "image/jpeg", lossless_display=False)
    assert (result.width, result.height) == upright.size
    variants = check_variants(result, IMAGE_VARIANTS)
    display = variants["display"]
    assert display.size == (planes.width, planes.height)
    assert max(display.size) == 4000
    for name, variant in variants.items():
        assert mean_difference(variant, upright) < 2.0, name


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("box", [999, 1002, 1003])
def test_odd_and_unaligned_display_sizes_keep_their_pixels(box: int, orientation: int) -> None:
    # 999x749: a luma row repeated at the bottom; 1002x752: rows of 1004 bytes, wider
    # than the 1002 the encoder reads; 1003x752: an odd width padded for the encoder.
    source = quadrants((1600, 1200))
    display = VariantSpec("display", box=box, quality=90, max_bytes=2_000_000, optimize=False)
    variants = VariantSet(image=(THUMBNAIL, display), poster=DEFAULT_VARIANTS.poster, video=DEFAULT_VARIANTS.video)
    data = jpeg(source, "4:2:0", orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert isinstance(decoded(data, variants.image), Planes)
    made = {v.name: v for v in transcode(data, "image/jpeg", lossless_display=False, variants=variants).variants}
    picture = open_variant(made["display"].data)
    assert picture.size == fit(*upright.size, box)
    assert mean_difference(picture, upright) < 2.0


def test_a_resized_plane_is_pillows_lanczos_resize_to_the_sample() -> None:
    from mediavault.imaging.planar import _resize

    plane = Image.frombytes("L", (203, 117), os.urandom(203 * 117))
    stride = 205
    rows = b"".join(plane.tobytes()[y * 203 : (y + 1) * 203] + b"\0\0" for y in range(117))
    buffer, width, height, out_stride = _resize((rows, 203, 117, stride), (150, 61))
    resized = b"".join(buffer[y * out_stride : y * out_stride + width] for y in range(height))
    assert (width, height) == (150, 61)
    assert resized == plane.resize((150, 61), Image.Resampling.LANCZOS).tobytes()


@pytest.mark.parametrize(
    "relative", ["images/camera/jolla.jpg", "images/camera/28-hex_value.jpg", "images/formats/rommel.jpg"]
)
def test_phone_photos_keep_their_pixels(relative: str) -> None:
    data = corpus(relative).read_bytes()
    assert isinstance(decoded(data), Planes)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    display = open_variant(next(v for v in transcode(data, "image/jpeg", lossless_display=False).variants if v.name == "display").data)
    assert display.size == upright.size
    # Pixel for pixel, not only on average: a chroma plane shifted by one sample or a
    # luma plane off by a row shows here.
    difference = ImageStat.Stat(ImageChops.difference(display.convert("RGB"), upright))
    assert max(difference.mean) < 2.5, difference.mean


def test_jpegs_the_planes_cannot_serve_go_through_rgb() -> None:
    photo = quadrants((2000, 1500))
    cmyk = io.BytesIO()
    photo.convert("CMYK").save(cmyk, "JPEG", quality=90)
    grey = io.BytesIO()
    photo.convert("L").save(grey, "JPEG", quality=90)
    foreign_profile = Image.open(corpus("images/formats/icc_profile_big.jpg")).info["icc_profile"]
    for data in (
        cmyk.getvalue(),
        grey.getvalue(),
        jpeg(photo, "4:2:0", icc_profile=foreign_profile),
        jpeg(quadrants((900, 700)), "4:2:0"),
    ):
        picture = decoded(data)
        assert isinstance(picture, Image.Image)
        assert picture.mode == "RGB"
        check_variants(transcode(data, "image/jpeg", lossless_display=False), IMAGE_VARIANTS)


def test_an_srgb_profile_needs_no_conversion_and_keeps_the_planes() -> None:
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert isinstance(decoded(jpeg(quadrants((2000, 1500)), "4:2:0", icc_profile=srgb)), Planes)


def test_which_variant_sets_planes_cover() -> None:
    assert covers(3264, 2448, DEFAULT_VARIANTS.image)
    assert covers(4000, 3000, DEFAULT_VARIANTS.image)
    # The display is resized from the planes.
    assert covers(4032, 3024, DEFAULT_VARIANTS.image)
    assert covers(12000, 9000, DEFAULT_VARIANTS.image)
    # The preview is more than half the picture.
    assert not covers(1100, 800, DEFAULT_VARIANTS.image)
    optimised = VariantSpec("display", box=4000, quality=90, max_bytes=2_000_000, optimize=True)
    assert not covers(3264, 2448, (THUMBNAIL, PREVIEW, optimised))
    assert covers(3264, 2448, (DISPLAY,))


@pytest.mark.parametrize("box", [4000, 999, 1002])
def test_display_over_budget_at_the_quality_floor_shrinks_through_rgb(box: int) -> None:
    # 999 and 1002: the planes are resized first, to an odd height (999x749) or to rows
    # padded past what the encoder reads (1002: 1004 bytes a row).
    noise = Image.merge("RGB", [Image.effect_noise((1600, 1200), 90) for _ in range(3)])
    photo = Image.blend(quadrants((1600, 1200)), noise, 0.5)
    data = jpeg(photo, "4:2:0")
    tight = VariantSpec("display", box=box, quality=90, max_bytes=60_000, optimize=False)
    variants = VariantSet(image=(THUMBNAIL, tight), poster=DEFAULT_VARIANTS.poster, video=DEFAULT_VARIANTS.video)
    planes = decoded(data, variants.image)
    assert isinstance(planes, Planes)
    assert (planes.width, planes.height) == fit(1600, 1200, box)
    display = next(v for v in transcode(data, "image/jpeg", lossless_display=False, variants=variants).variants if v.name == "display")
    assert len(display.data) <= tight.max_bytes
    assert display.width < planes.width
    assert open_variant(display.data).size == (display.width, display.height)
    # The RGB picture it shrank was the planes' own, colours and all.
    assert mean_difference(open_variant(display.data), photo) < 3.0


def test_truncated_photo_is_refused_not_decoded_grey() -> None:
    data = corpus("images/camera/jolla.jpg").read_bytes()
    truncated = data[: len(data) * 2 // 3]
    header = turbojpeg.read_header(truncated)
    with pytest.raises(turbojpeg.TurboJPEGError):
        turbojpeg.decompress_to_planes(truncated, header)
    with pytest.raises(PermanentImagingError, match="corrupt image"):
        transcode(truncated, "image/jpeg")


def test_turbojpeg_refuses_what_is_not_a_jpeg() -> None:
    with pytest.raises(turbojpeg.TurboJPEGError):
        turbojpeg.read_header(b"\x89PNG\r\n\x1a\n" + bytes(64))


def test_progressive_and_multi_picture_jpegs_take_the_planes() -> None:
    photo = quadrants((2000, 1500))
    progressive = jpeg(photo, "4:2:0", progressive=True)
    # iPhones write MPO: the primary picture first, then others (depth, a second frame).
    mpo = io.BytesIO()
    photo.save(mpo, "MPO", save_all=True, append_images=[quadrants((800, 600)).rotate(180)], quality=95)
    assert Image.open(mpo).format == "MPO"
    for data in (progressive, mpo.getvalue()):
        assert isinstance(decoded(data), Planes)
        result = transcode(data, "image/jpeg", lossless_display=False)
        assert (result.width, result.height) == photo.size
        for name, variant in check_variants(result, IMAGE_VARIANTS).items():
            assert mean_difference(variant, photo) < 2.0, name
