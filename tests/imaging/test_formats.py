"""The alternates: the thumbnail and the preview in AVIF beside the primary, from the same pixels, and in WebP on request."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mediavault.imaging import DEFAULT_VARIANTS, PermanentImagingError, transcode
from mediavault.imaging.formats import AVIF, WEBP, encode
from mediavault.imaging.pipeline import made_on_request, transcode_poster
from mediavault.imaging.spec import Alternate, VariantSet, VariantSpec, on_request
from tests.conftest import CORPUS
from tests.imaging.helpers import SPECS, assert_no_metadata, mean_difference, open_variant, transcoded

FORMATS = {AVIF: "AVIF", WEBP: "WEBP"}


PHOTOS = ["images/camera/jolla.jpg", "images/formats/rommel.jpg", "images/heic/IMG_5195.HEIC"]
# What a stored primary is at most: tests that look at what is made, not at its size, pass these.
BUDGETS = {spec.name: spec.max_bytes for spec in (*DEFAULT_VARIANTS.image, DEFAULT_VARIANTS.poster)}


@pytest.mark.parametrize("relative", PHOTOS)
def test_thumbnail_and_preview_come_in_avif_with_the_same_picture_in_fewer_bytes(relative):
    result = transcoded(relative)
    by_name = {v.name: v for v in result.variants}
    assert by_name["display"].alternates == ()
    for name in ("thumbnail", "preview"):
        primary = by_name[name]
        assert primary.content_type == "image/jpeg"
        # Made only when smaller than the JPEG, which on these photos AVIF is.
        assert [a.content_type for a in primary.alternates] == [AVIF]
        reference = open_variant(primary.data)
        for alternate in primary.alternates:
            picture = open_variant(alternate.data)
            assert picture.format == FORMATS[alternate.content_type]
            assert picture.size == reference.size == (alternate.width, alternate.height)
            assert alternate.name == name
            assert len(alternate.data) < len(primary.data) <= SPECS[name].max_bytes
            # Both are lossy encodes of the same resize: they differ by a few levels, not by content.
            assert mean_difference(picture, reference) < 6, (name, alternate.content_type)


def test_avif_alternates_stay_in_the_av1_main_profile_that_every_avif_decoder_takes():
    for variant in transcoded("images/camera/jolla.jpg").variants:
        for alternate in variant.alternates:
            data = alternate.data
            # The av1C property: marker and version, then seq_profile (3 bits) and level, then
            # tier, high bit depth, 12 bit, monochrome, chroma subsampling x and y, sample position.
            at = data.index(b"av1C") + 4
            marker, profile_level, flags = data[at], data[at + 1], data[at + 2]
            assert marker == 0x81
            assert profile_level >> 5 == 0, "Main profile"
            assert (flags >> 6) & 1 == 0, "8 bits"
            assert (flags >> 4) & 1 == 0, "colour"
            assert (flags >> 2) & 0b11 == 0b11, "4:2:0"


@pytest.mark.parametrize("relative", ["images/camera/DSCN0010.jpg", "images/formats/icc_profile_big.jpg"])
def test_alternates_carry_no_metadata(relative):
    # DSCN0010 carries GPS EXIF, icc_profile_big.jpg a large profile its colours are converted
    # from; none of it may reach any format.
    for variant in transcoded(relative).variants:
        for alternate in variant.alternates:
            picture = open_variant(alternate.data)
            assert not picture.getexif()
            for key in ("exif", "xmp", "icc_profile"):
                assert not picture.info.get(key), (alternate.content_type, key)
            if alternate.content_type == WEBP:
                assert_no_metadata(picture, alternate.data)


def test_a_picture_with_alpha_keeps_it_in_its_webp_primary_and_its_avif_alternate():
    result = transcoded("images/formats/transparent.png")
    thumbnail = next(v for v in result.variants if v.name == "thumbnail")
    assert thumbnail.content_type == WEBP
    assert [a.content_type for a in thumbnail.alternates] == [AVIF]
    primary = open_variant(thumbnail.data)
    avif = open_variant(thumbnail.alternates[0].data)
    assert avif.mode == "RGBA"
    assert avif.getchannel("A").getextrema()[0] < 16, "transparent pixels stay transparent"
    assert mean_difference(avif.getchannel("A"), primary.getchannel("A")) < 4


def test_video_thumbnail_and_preview_get_alternates_and_the_poster_none():
    result = transcoded("video/realshort.mp4")
    by_name = {v.name: v for v in result.variants}
    assert by_name["poster"].alternates == ()
    assert [a.content_type for a in by_name["thumbnail"].alternates] == [AVIF]


def test_an_alternate_no_smaller_than_the_primary_is_left_out():
    noise = Image.effect_noise((300, 300), 120).convert("RGB")
    data = io.BytesIO()
    noise.save(data, "PNG")
    spec = VariantSpec(
        "thumbnail", box=300, quality=60, max_bytes=200_000,
        alternates=(Alternate(AVIF, quality=30), Alternate(WEBP, quality=100)),
    )
    variants = VariantSet(image=(spec,), poster=DEFAULT_VARIANTS.poster, video=DEFAULT_VARIANTS.video)
    (thumbnail,) = transcode(data.getvalue(), "image/png", variants=variants).variants
    assert len(encode(noise, WEBP, 100)) > len(thumbnail.data)
    assert [a.content_type for a in thumbnail.alternates] == [AVIF]
    assert len(thumbnail.alternates[0].data) < len(thumbnail.data)


def test_encode_refuses_a_format_it_has_no_encoder_for():
    with pytest.raises(ValueError, match="image/png"):
        encode(Image.new("RGB", (4, 4)), "image/png", 80)


def test_webp_is_made_on_request_and_never_by_the_upload_job():
    assert on_request(DEFAULT_VARIANTS) == {
        "image": {"thumbnail": (WEBP,), "preview": (WEBP,)},
        "video": {"thumbnail": (WEBP,), "preview": (WEBP,)},
    }
    for relative in PHOTOS:
        assert not [a for v in transcoded(relative).variants for a in v.alternates if a.content_type == WEBP]


# Landscape_6's preview JPEG comes from the planes strategy, smaller than the one Pillow makes
# of it again, with a WebP of a size between the two.
@pytest.mark.parametrize("relative", [*PHOTOS, "images/orientation/Landscape_6.jpg", "video/realshort.mp4"])
def test_a_format_made_on_request_is_the_variant_in_fewer_bytes(relative):
    path = CORPUS / relative
    mime = {".jpg": "image/jpeg", ".HEIC": "image/heic", ".mp4": "video/mp4"}[path.suffix]
    result = transcode_poster(path, mime) if mime == "video/mp4" else transcode(path.read_bytes(), mime)
    primaries = {v.name: v for v in result.variants}
    stored = {name: len(primary.data) for name, primary in primaries.items()}
    made = made_on_request(path, mime, {"thumbnail": (WEBP,), "preview": (WEBP,)}, stored)
    assert {(v.name, v.content_type) for v in made} <= {("thumbnail", WEBP), ("preview", WEBP)}
    assert ("thumbnail", WEBP) in {(v.name, v.content_type) for v in made}
    for variant in made:
        primary = primaries[variant.name]
        picture = open_variant(variant.data)
        assert picture.format == "WEBP"
        assert picture.size == (variant.width, variant.height) == (primary.width, primary.height)
        assert len(variant.data) < len(primary.data)
        assert variant.alternates == ()
        assert_no_metadata(picture, variant.data)
        # Made from the original (a video's poster frame) decoded again, not from the JPEG: the
        # same picture within encoding noise.
        assert mean_difference(picture, open_variant(primary.data)) < 6, variant.name


def test_on_request_makes_only_what_is_asked_and_nothing_for_a_display_poster_or_webp_primary():
    jolla = CORPUS / "images/camera/jolla.jpg"
    assert [(v.name, v.content_type) for v in made_on_request(jolla, "image/jpeg", {"thumbnail": (WEBP,)}, BUDGETS)] == [
        ("thumbnail", WEBP),
    ]
    assert made_on_request(jolla, "image/jpeg", {"display": (WEBP,)}, BUDGETS) == [], "the display has no WebP to make"
    video = CORPUS / "video/realshort.mp4"
    assert made_on_request(video, "video/mp4", {"poster": (WEBP,)}, BUDGETS) == [], "the poster has no WebP to make"
    transparent = CORPUS / "images/formats/transparent.png"
    assert made_on_request(transparent, "image/png", {"thumbnail": (WEBP,), "preview": (WEBP,)}, BUDGETS) == []


def test_a_refused_original_is_refused_on_request_too():
    truncated = CORPUS / "images/bad/truncated_jpeg.jpg"
    with pytest.raises(PermanentImagingError):
        made_on_request(truncated, "image/jpeg", {"thumbnail": (WEBP,)}, BUDGETS)
