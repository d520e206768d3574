"""Every corpus image and video ends as the corpus README says."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageChops, ImageCms, ImageStat

from mediavault.imaging import DEFAULT_VARIANTS, PermanentImagingError, transcode
from tests.imaging.helpers import check_variants, content_type, corpus, transcoded

IMAGE_VARIANTS = {spec.name for spec in DEFAULT_VARIANTS.image}
VIDEO_VARIANTS = {DEFAULT_VARIANTS.poster.name, *(spec.name for spec in DEFAULT_VARIANTS.video)}

ORIENTATION = [f"images/orientation/{kind}_{n}.jpg" for kind in ("Landscape", "Portrait") for n in range(9)]
CAMERA = [
    "images/camera/28-hex_value.jpg",
    "images/camera/Canon_40D.jpg",
    "images/camera/DSCN0010.jpg",
    "images/camera/iphone_hdr_NO.jpg",
    "images/camera/jolla.jpg",
]
ALPHA = [
    "images/formats/transparent.png",
    "images/formats/transparent.webp",
    "images/formats/p_trns_single.png",
    "images/formats/l_trns.png",
    "images/formats/dispose_bgnd_rgba.gif",
]
OPAQUE = [
    "images/formats/hopper.avif",
    "images/formats/hopper.gif",
    "images/formats/hopper.jpg",
    "images/formats/hopper.png",
    "images/formats/hopper.webp",
    "images/formats/hopper_16bit_qtables.jpg",
    "images/formats/icc_profile_big.jpg",
    "images/formats/newtonscradle.gif",
    "images/formats/pil_sample_cmyk.jpg",
    "images/formats/rommel.jpg",
    "images/heic/IMG_5195.HEIC",
    "images/heic/samplefilehub.heif",
]
BAD = {
    "images/bad/broken.png": "corrupt image",
    "images/bad/truncated_jpeg.jpg": "corrupt image",
    "images/bad/zero_width.gif": "corrupt image",
    "images/bad/decompression_bomb.gif": "image too large",
}
VIDEOS = {"video/realshort.mp4": (320, 240), "video/test.webm": (640, 480)}


def test_every_corpus_file_is_covered() -> None:
    listed = set(ORIENTATION) | set(CAMERA) | set(ALPHA) | set(OPAQUE) | set(BAD) | set(VIDEOS)
    on_disk = {
        str(path.relative_to(corpus(""))) for folder in ("images", "video")
        for path in corpus(folder).rglob("*") if path.is_file() and path.name != "LICENSE"
    }
    assert on_disk == listed


@pytest.mark.parametrize("relative", ORIENTATION)
def test_orientation_cases_come_out_upright(relative: str) -> None:
    result = transcoded(relative)
    assert result.kind == "image"
    landscape = "Landscape" in relative
    assert (result.width > result.height) is landscape
    for name, image in check_variants(result, IMAGE_VARIANTS).items():
        assert (image.width > image.height) is landscape, name
    assert (result.width, result.height) == ((1800, 1200) if landscape else (1200, 1800))


def test_orientation_is_applied_to_the_pixels_not_just_the_size() -> None:
    # Orientation 3 (rotated 180) keeps the size, so only the pixels tell whether it was applied.
    reference = transcoded("images/orientation/Landscape_1.jpg").variants[0]
    for n in range(2, 9):
        variant = transcoded(f"images/orientation/Landscape_{n}.jpg").variants[0]
        assert mean_difference(variant.data, reference.data) < 4, n


@pytest.mark.parametrize("relative", CAMERA)
def test_camera_photos_lose_all_metadata(relative: str) -> None:
    result = transcoded(relative)
    source = Image.open(corpus(relative))
    assert (result.width, result.height) == source.size
    decoded = check_variants(result, IMAGE_VARIANTS)
    assert all(v.content_type == "image/jpeg" for v in result.variants)
    assert decoded["display"].size == source.size


def test_gps_exif_is_in_the_source_and_in_no_variant() -> None:
    source = Image.open(corpus("images/camera/DSCN0010.jpg"))
    assert source.getexif().get_ifd(0x8825)
    for variant in transcoded("images/camera/DSCN0010.jpg").variants:
        assert not Image.open(io.BytesIO(variant.data)).getexif().get_ifd(0x8825)


@pytest.mark.parametrize("relative", ALPHA)
def test_transparency_is_kept_in_webp(relative: str) -> None:
    result = transcoded(relative)
    for name, image in check_variants(result, IMAGE_VARIANTS).items():
        assert image.format == "WEBP", name
        assert image.mode == "RGBA", name
        assert image.getchannel("A").getextrema()[0] < 255, f"{name} lost its transparency"


@pytest.mark.parametrize("relative", OPAQUE)
def test_other_formats_make_jpeg_variants(relative: str) -> None:
    result = transcoded(relative)
    assert result.kind == "image"
    for name, image in check_variants(result, IMAGE_VARIANTS).items():
        assert image.format == "JPEG", name
        assert image.mode == "RGB", name


def test_small_images_are_never_upscaled() -> None:
    result = transcoded("images/formats/hopper.png")
    assert {(v.width, v.height) for v in result.variants} == {(128, 128)}


def test_exif_rotated_photo_is_upright() -> None:
    result = transcoded("images/formats/rommel.jpg")
    assert (result.width, result.height) == (2304, 3072)
    assert all(v.height > v.width for v in result.variants)


def test_cmyk_becomes_rgb_with_the_same_colours() -> None:
    source = Image.open(corpus("images/formats/pil_sample_cmyk.jpg"))
    assert source.mode == "CMYK"
    display = transcoded("images/formats/pil_sample_cmyk.jpg").variants[0]
    assert mean_difference(display.data, as_jpeg(source.convert("RGB"))) < 4


def test_icc_profile_is_converted_to_srgb() -> None:
    source = Image.open(corpus("images/formats/icc_profile_big.jpg"))
    profile = ImageCms.ImageCmsProfile(io.BytesIO(source.info["icc_profile"]))
    expected = ImageCms.profileToProfile(source, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    display = transcoded("images/formats/icc_profile_big.jpg").variants[0]
    untouched = mean_difference(display.data, as_jpeg(source))
    converted = mean_difference(display.data, as_jpeg(expected))
    assert converted < 3 < untouched


def test_heic_from_an_iphone_is_decoded_upright() -> None:
    result = transcoded("images/heic/IMG_5195.HEIC")
    assert (result.width, result.height) == (2566, 3313)
    decoded = check_variants(result, IMAGE_VARIANTS)
    assert decoded["display"].size == (2566, 3313)
    assert decoded["thumbnail"].size == (232, 300)


def test_avif_is_decoded() -> None:
    result = transcoded("images/formats/hopper.avif")
    reference = transcoded("images/formats/hopper.png")
    assert mean_difference(result.variants[0].data, reference.variants[0].data) < 8


def test_animated_gif_gives_a_still_of_its_first_frame() -> None:
    source = Image.open(corpus("images/formats/newtonscradle.gif"))
    assert source.n_frames == 36
    first = as_jpeg(source.convert("RGB"))
    # The swing repeats every 18 frames; frame 9 is the far end of it.
    source.seek(9)
    middle = as_jpeg(source.convert("RGB"))
    display = transcoded("images/formats/newtonscradle.gif").variants[0]
    assert getattr(Image.open(io.BytesIO(display.data)), "n_frames", 1) == 1
    assert mean_difference(display.data, first) < mean_difference(display.data, middle)


@pytest.mark.parametrize("relative", sorted(VIDEOS))
def test_video_gives_a_poster_and_its_variants(relative: str) -> None:
    result = transcoded(relative)
    assert result.kind == "video"
    assert (result.width, result.height) == VIDEOS[relative]
    decoded = check_variants(result, VIDEO_VARIANTS)
    assert "display" not in decoded
    assert all(image.format == "JPEG" for image in decoded.values())
    poster = decoded["poster"]
    assert poster.size == (min(600, result.width), min(600, result.width) * result.height // result.width)


@pytest.mark.parametrize("relative", sorted(BAD))
def test_bad_files_are_rejected_with_a_specific_reason(relative: str) -> None:
    path = corpus(relative)
    with pytest.raises(PermanentImagingError) as caught:
        transcode(path.read_bytes(), content_type(path))
    assert caught.value.message == BAD[relative]
    assert str(caught.value) == BAD[relative]


def as_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def mean_difference(a: bytes, b: bytes) -> float:
    """Mean absolute difference per channel, after scaling b to a's size."""
    first = Image.open(io.BytesIO(a)).convert("RGB")
    second = Image.open(io.BytesIO(b)).convert("RGB").resize(first.size, Image.Resampling.LANCZOS)
    return sum(ImageStat.Stat(ImageChops.difference(first, second)).mean) / 3
