"""Budgets, boxes, modes and metadata on images made here to hit each rule."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from mediavault.imaging import DEFAULT_VARIANTS, VariantSet, VariantSpec, transcode
from tests.imaging.helpers import check_variants, open_variant

IMAGE_VARIANTS = {spec.name for spec in DEFAULT_VARIANTS.image}


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(mode: str, size: tuple[int, int]) -> Image.Image:
    return Image.frombytes(mode, size, os.urandom(size[0] * size[1] * len(mode)))


def test_incompressible_photo_meets_every_budget() -> None:
    # Pure noise is the worst case for JPEG: quality alone cannot reach 2 MB at this size.
    data = encoded(noise("RGB", (3000, 2000)), "PNG")
    result = transcode(data, "image/png")
    decoded = check_variants(result, IMAGE_VARIANTS)
    assert decoded["display"].width < 3000


def test_budget_is_met_by_lowering_quality_before_shrinking() -> None:
    spec = VariantSpec("tight", box=400, quality=95, max_bytes=45_000, min_quality=30, quality_step=5)
    image = Image.radial_gradient("L").resize((400, 400)).convert("RGB")
    image.paste(noise("RGB", (400, 120)), (0, 0))
    at_full_quality = len(encoded(image, "JPEG", quality=95))
    assert at_full_quality > spec.max_bytes
    variants = VariantSet(image=(spec,), poster=spec, video=(spec,))
    variant = transcode(encoded(image, "PNG"), "image/png", variants=variants).variants[0]
    assert (variant.width, variant.height) == (400, 400)
    assert len(variant.data) <= spec.max_bytes


def test_alpha_noise_meets_the_budget_in_webp() -> None:
    data = encoded(noise("RGBA", (1200, 900)), "PNG")
    result = transcode(data, "image/png")
    for name, image in check_variants(result, IMAGE_VARIANTS).items():
        assert image.format == "WEBP", name
        assert image.mode == "RGBA", name


def test_fully_opaque_alpha_channel_gives_jpeg() -> None:
    data = encoded(Image.new("RGBA", (64, 48), (10, 200, 30, 255)), "PNG")
    assert {v.content_type for v in transcode(data, "image/png").variants} == {"image/jpeg"}


def test_sixteen_bit_grey_keeps_its_tones() -> None:
    image = Image.new("I;16", (256, 16))
    image.putdata([x * 257 for _ in range(16) for x in range(256)])
    display = open_variant(transcode(encoded(image, "PNG"), "image/png").variants[0].data)
    assert display.mode == "RGB"
    assert abs(display.getpixel((128, 8))[0] - 128) <= 3
    assert display.getpixel((250, 8))[0] > 240


def test_sixteen_bit_grey_with_a_transparent_level_keeps_its_tones_and_only_that_level_transparent() -> None:
    # tRNS names a 16-bit level: 128 * 257 is transparent, 128 * 257 + 1 (the same top 8 bits) is not.
    levels = [x * 257 for x in range(256)]
    levels[129] = 128 * 257 + 1
    image = Image.new("I;16", (256, 16))
    image.putdata(levels * 16)
    display = open_variant(transcode(encoded(image, "PNG", transparency=128 * 257), "image/png").variants[0].data)
    assert display.mode == "RGBA"
    assert [display.getpixel((x, 8))[3] for x in (127, 128, 129)] == [255, 0, 255]
    assert abs(display.getpixel((64, 8))[0] - 64) <= 3
    assert display.getpixel((250, 8))[0] > 240


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_an_upright_picture(orientation: int) -> None:
    # A picture whose top-left quarter is white: after orientation it must be top-left.
    upright = Image.new("RGB", (80, 40), "black")
    upright.paste((255, 255, 255), (0, 0, 40, 20))
    undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(undo[orientation]) if orientation in undo else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    result = transcode(encoded(stored, "JPEG", quality=95, exif=exif), "image/jpeg")
    display = open_variant(result.variants[0].data)
    assert (result.width, result.height) == display.size == (80, 40)
    assert display.getpixel((10, 5))[0] > 200
    assert display.getpixel((70, 35))[0] < 50


def test_metadata_of_every_kind_is_dropped() -> None:
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    source = Image.new("RGB", (700, 500), (90, 120, 150))
    for fmt, content_type in (("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")):
        data = encoded(source, fmt, exif=exif, xmp=xmp, comment=b"secret") if fmt == "JPEG" else encoded(
            source, fmt, exif=exif, xmp=xmp)
        assert b"Camera maker" in data
        result = transcode(data, content_type)
        check_variants(result, IMAGE_VARIANTS)
        for variant in result.variants:
            assert b"Camera maker" not in variant.data
            assert b"secret" not in variant.data


def test_large_photo_is_fitted_to_the_display_box_from_a_reduced_decode() -> None:
    data = encoded(Image.linear_gradient("L").resize((8200, 4100)).convert("RGB"), "JPEG", quality=80)
    result = transcode(data, "image/jpeg")
    decoded = check_variants(result, IMAGE_VARIANTS)
    assert (result.width, result.height) == (8200, 4100)
    assert decoded["display"].size == (4000, 2000)
    assert decoded["preview"].size == (600, 300)
    assert decoded["thumbnail"].size == (300, 150)


def test_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="box and max_bytes must be positive"):
        VariantSpec("x", box=0, quality=80, max_bytes=1000)
    with pytest.raises(ValueError, match="min_quality <= quality"):
        VariantSpec("x", box=10, quality=50, max_bytes=1000, min_quality=60)
