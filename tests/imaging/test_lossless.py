"""A JPEG as its own display: which ones, the same pixels, no metadata, never more bytes."""

from __future__ import annotations

import contextlib
import io
import random
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from mediavault.imaging import DEFAULT_LIMITS, DEFAULT_VARIANTS, transcode, turbojpeg
from mediavault.imaging.decode import decode_with_pillow, open_image
from mediavault.imaging.lossless import NotLossless, display, display_and_picture, draft_scale, orients_exactly, strip
from mediavault.imaging.spec import fit
from mediavault.imaging.strategies import LosslessJpeg, PlanarJpeg, choose
from mediavault.imaging.variants import make_variants
from tests.imaging.helpers import check_variants, chroma_440, corpus, jpeg_segments

SPECS = DEFAULT_VARIANTS.image
DISPLAY = max(SPECS, key=lambda spec: spec.box)
IMAGE_VARIANTS = {spec.name for spec in SPECS}
CORPUS_JPEGS = sorted(str(path.relative_to(corpus(""))) for path in corpus("images").rglob("*.jpg") if "bad" not in path.parts)
# YCbCr, sRGB or untagged, within the display's box and budget, upright or flipped top to
# bottom (orientation 4) with a height of whole MCU rows: these must take the path.
EXPECTED = {
    "images/camera/jolla.jpg",
    "images/camera/iphone_hdr_NO.jpg",
    "images/camera/28-hex_value.jpg",
    "images/camera/DSCN0010.jpg",
    "images/camera/Canon_40D.jpg",
    "images/formats/hopper.jpg",
    "images/orientation/Landscape_0.jpg",
    "images/orientation/Landscape_1.jpg",
    "images/orientation/Landscape_4.jpg",
    "images/orientation/Portrait_0.jpg",
    "images/orientation/Portrait_1.jpg",
}
_APPS_AND_COMMENT = {*range(0xE0, 0xF0), 0xFE}


def chosen(data: bytes, lossless_display: bool = True) -> object:
    return choose(open_image(data, "image/jpeg", DEFAULT_LIMITS), data, SPECS, lossless_display=lossless_display)


def metadata_bytes(data: bytes) -> int:
    """Bytes of the APPn and COM segments before the first scan, markers included."""
    total, position = 0, 2
    while data[position] == 0xFF and data[position + 1] != 0xDA:
        length = 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if data[position + 1] in _APPS_AND_COMMENT:
            total += length
        position += length
    return total


def pixels(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image)


def test_the_expected_corpus_photos_take_the_lossless_path() -> None:
    taken = {relative for relative in CORPUS_JPEGS if isinstance(chosen(corpus(relative).read_bytes()), LosslessJpeg)}
    assert taken == EXPECTED


@pytest.mark.parametrize("relative", CORPUS_JPEGS)
def test_a_lossless_display_decodes_to_exactly_the_originals_upright_pixels(relative: str) -> None:
    data = corpus(relative).read_bytes()
    result = transcode(data, "image/jpeg")
    if result.strategy != LosslessJpeg.name:
        assert relative not in EXPECTED
        return
    check_variants(result, IMAGE_VARIANTS)
    variant = next(v for v in result.variants if v.name == "display")
    original, shown = pixels(data), pixels(variant.data)
    assert (shown.mode, shown.size) == (original.mode, original.size)
    assert shown.tobytes() == original.tobytes()
    assert len(variant.data) <= len(strip(data)) <= len(data) - metadata_bytes(data)
    assert not set(jpeg_segments(variant.data)) & _APPS_AND_COMMENT


def test_huffman_tables_are_optimised() -> None:
    # A phone's encoder writes the standard tables: optimal ones save 3.6% here.
    data = corpus("images/camera/jolla.jpg").read_bytes()
    shown = display(data, turbojpeg.read_header(data), DISPLAY.max_bytes)
    assert len(shown) < len(strip(data)) - 25_000
    assert pixels(shown).tobytes() == pixels(data).tobytes()


def test_gps_and_every_other_segment_of_metadata_are_gone() -> None:
    data = corpus("images/camera/DSCN0010.jpg").read_bytes()
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(0x8825)
    stripped = display(data, turbojpeg.read_header(data), DISPLAY.max_bytes)
    assert b"Exif" not in stripped[:4096]
    assert not Image.open(io.BytesIO(stripped)).getexif()


@pytest.mark.parametrize(
    "relative",
    [
        "images/formats/rommel.jpg",
        "images/orientation/Landscape_6.jpg",
        "images/orientation/Portrait_2.jpg",
        # Flipped top to bottom, but 1800 rows are not whole 16-row MCUs.
        "images/orientation/Portrait_4.jpg",
    ],
)
def test_a_turn_the_dct_domain_does_not_make_exactly_is_re_encoded_from_its_planes(relative: str) -> None:
    assert isinstance(chosen(corpus(relative).read_bytes()), PlanarJpeg)


def oriented(data: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 segment giving it this EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return with_segment(data, 0xE1, exif.tobytes())


def corpus_crop(relative: str, size: tuple[int, int], **params: object) -> bytes:
    """A corner of a corpus photo, upright, saved again by Pillow."""
    picture = ImageOps.exif_transpose(Image.open(corpus(relative))).crop((0, 0, *size))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=88, **params)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("subsampling", "height"),
    [("4:4:4", 1000), ("4:2:2", 1000), ("4:2:0", 992)],
)
@pytest.mark.parametrize("progressive", [False, True], ids=["sequential", "progressive"])
@pytest.mark.parametrize("relative", ["images/camera/jolla.jpg", "images/formats/rommel.jpg"])
def test_a_photo_upside_down_and_mirrored_is_flipped_exactly(
    relative: str, subsampling: str, height: int, progressive: bool
) -> None:
    data = oriented(corpus_crop(relative, (1400, height), subsampling=subsampling, progressive=progressive), 4)
    assert isinstance(chosen(data), LosslessJpeg)
    result = transcode(data, "image/jpeg")
    check_variants(result, IMAGE_VARIANTS)
    variant = next(v for v in result.variants if v.name == "display")
    assert pixels(variant.data).tobytes() == pixels(data).tobytes()
    assert len(variant.data) <= len(strip(data))


@pytest.mark.parametrize(
    ("data", "orientation"),
    [
        (chroma_440(corpus_crop("images/camera/jolla.jpg", (1400, 1008), subsampling="4:4:4")), 4),
        (corpus_crop("images/camera/jolla.jpg", (1400, 1000), subsampling="4:4:4"), 2),
        (corpus_crop("images/camera/jolla.jpg", (1400, 1000), subsampling="4:4:4"), 3),
        (corpus_crop("images/camera/jolla.jpg", (1400, 1000), subsampling="4:4:4"), 5),
    ],
    ids=["flip-4:4:0", "mirror-4:4:4", "half-turn-4:4:4", "transpose-4:4:4"],
)
def test_an_orientation_the_rule_refuses_goes_the_decoded_way(data: bytes, orientation: int) -> None:
    data = oriented(data, orientation)
    assert not orients_exactly(turbojpeg.read_header(data), orientation)
    assert isinstance(chosen(data), PlanarJpeg)
    assert transcode(data, "image/jpeg").strategy == PlanarJpeg.name


def test_the_setting_off_re_encodes_the_display() -> None:
    data = corpus("images/camera/jolla.jpg").read_bytes()
    assert isinstance(chosen(data, lossless_display=False), PlanarJpeg)
    assert transcode(data, "image/jpeg", lossless_display=False).strategy == PlanarJpeg.name


def photo(size: tuple[int, int] = (1200, 900), **params: object) -> bytes:
    picture = Image.new("RGB", size, (200, 40, 30))
    picture.paste((30, 60, 200), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def test_a_progressive_jpeg_stays_progressive() -> None:
    data = photo(progressive=True)
    assert isinstance(chosen(data), LosslessJpeg)
    shown = display(data, turbojpeg.read_header(data), DISPLAY.max_bytes)
    assert 0xC2 in jpeg_segments(shown)
    assert pixels(shown).tobytes() == pixels(data).tobytes()
    assert len(shown) <= len(strip(data))


def test_when_optimal_tables_would_add_bytes_the_display_is_the_stripped_original(tmp_path: Path) -> None:
    # Progressive with spectral selection alone, no successive approximation: on so small a
    # photo, fewer bytes than the simple progression the display would be written with.
    scans = tmp_path / "scans"
    scans.write_text("0,1,2: 0-0, 0, 0;\n0: 1-63, 0, 0;\n1: 1-63, 0, 0;\n2: 1-63, 0, 0;\n")
    original = corpus("images/camera/Canon_40D.jpg")
    data = subprocess.run(
        ["jpegtran", "-copy", "none", "-optimize", "-scans", str(scans), str(original)], capture_output=True, check=True
    ).stdout
    assert display(data, turbojpeg.read_header(data), DISPLAY.max_bytes) == strip(data)


def test_the_pictures_after_the_first_are_left_out() -> None:
    # iPhones write MPO: the primary picture, then a gain map or depth image.
    first = Image.new("RGB", (1200, 900), (10, 120, 200))
    mpo = io.BytesIO()
    first.save(mpo, "MPO", save_all=True, append_images=[Image.new("RGB", (600, 450), (250, 0, 0))], quality=90)
    data = mpo.getvalue()
    stripped = strip(data)
    assert len(stripped) < len(data) - metadata_bytes(data) - 1000
    assert pixels(stripped).tobytes() == pixels(data).tobytes()


def test_a_scan_ends_at_its_marker_past_stuffed_bytes_restart_markers_and_fill_bytes(tmp_path: Path) -> None:
    original = tmp_path / "landscape.jpg"
    original.write_bytes(corpus("images/orientation/Landscape_0.jpg").read_bytes())
    data = subprocess.run(["jpegtran", "-copy", "none", "-restart", "1", str(original)], capture_output=True, check=True).stdout
    scan = data[data.index(b"\xff\xda") : -2]
    assert b"\xff\x00" in scan
    assert any(bytes((0xFF, restart)) in scan for restart in range(0xD0, 0xD8))
    assert strip(data).endswith(scan + b"\xff\xd9")
    filled = data[:-2] + b"\xff\xff\xff\xd9"
    assert strip(filled) == strip(data)[:-2] + b"\xff\xff\xff\xd9"
    assert pixels(strip(filled)).tobytes() == pixels(data).tobytes()


def with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (with_segment(photo(), 0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01"), "an Adobe segment"),
        (corpus("images/formats/hopper_16bit_qtables.jpg").read_bytes(), "segment 0xC1"),
        (photo()[:-5000], "scan runs past the end"),
        (photo()[:300], "runs past the end"),
        (b"\x89PNG\r\n\x1a\n", "no SOI"),
    ],
    ids=["adobe", "extended-sequential", "truncated-scan", "truncated-header", "not-a-jpeg"],
)
def test_what_cannot_be_its_own_display_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(NotLossless, match=reason):
        strip(data)


def test_a_display_over_its_budget_is_re_encoded() -> None:
    data = photo()
    header = turbojpeg.read_header(data)
    with pytest.raises(NotLossless, match="byte budget"):
        display(data, header, max_bytes=len(display(data, header, DISPLAY.max_bytes)) - 1)


def test_damaged_bytes_make_the_parser_refuse_never_crash() -> None:
    source = photo(size=(300, 200), exif=b"Exif\x00\x00" + bytes(40))
    generator = random.Random(18)
    for _ in range(400):
        damaged = bytearray(source)
        for _ in range(generator.randint(1, 4)):
            damaged[generator.randrange(len(damaged))] = generator.randrange(256)
        with contextlib.suppress(NotLossless):
            strip(bytes(damaged))


SMALLER = [spec for spec in SPECS if spec is not DISPLAY]


def pillows_still(data: bytes) -> Image.Image:
    """The picture the smaller variants were made from before: Pillow decoding the JPEG again."""
    return decode_with_pillow(open_image(data, "image/jpeg", DEFAULT_LIMITS), SMALLER).image


FLIPPED_CROPS = [
    f"flipped-{subsampling}-{coding}" for subsampling in ("4:4:4", "4:2:2", "4:2:0") for coding in ("sequential", "progressive")
]


def lossless_input(source: str) -> bytes:
    """A corpus photo, or a crop of one flipped upside down (flipped-<subsampling>-<coding>)."""
    if not source.startswith("flipped-"):
        return corpus(source).read_bytes()
    _, subsampling, coding = source.split("-")
    height = 992 if subsampling == "4:2:0" else 1000
    crop = corpus_crop("images/camera/jolla.jpg", (1400, height), subsampling=subsampling, progressive=coding == "progressive")
    return oriented(crop, 4)


@pytest.mark.parametrize("source", [*sorted(EXPECTED), *FLIPPED_CROPS])
def test_the_smaller_variants_picture_is_the_one_pillow_decodes(source: str) -> None:
    data = lossless_input(source)
    # Decoded with the display's coefficients, once, instead of by Pillow again: the same pixels.
    strategy = chosen(data)
    assert isinstance(strategy, LosslessJpeg)
    assert strategy.picture is not None
    expected = pillows_still(data)
    assert (strategy.picture.mode, strategy.picture.size, strategy.picture.info) == (expected.mode, expected.size, expected.info)
    assert strategy.picture.tobytes() == expected.tobytes()


def test_the_smaller_variants_are_the_bytes_pillows_picture_makes() -> None:
    data = corpus("images/orientation/Landscape_4.jpg").read_bytes()
    result = transcode(data, "image/jpeg")
    assert result.strategy == LosslessJpeg.name
    before = make_variants(pillows_still(data), result.width, result.height, SMALLER)
    assert [v for v in result.variants if v.name != DISPLAY.name] == before


@pytest.mark.parametrize(("width", "height"), [(4000, 3000), (3264, 2448), (1800, 1200), (1201, 900), (640, 480), (300, 200)])
@pytest.mark.parametrize("box", [600, 300, 150, 75])
def test_the_scale_is_the_one_pillows_draft_picks(width: int, height: int, box: int) -> None:
    image = Image.open(io.BytesIO(photo((width, height))))
    image.draft(None, fit(width, height, box))
    scale = draft_scale(width, height, box)
    assert image.size == (-(-width // scale), -(-height // scale))


def test_what_libjpeg_cannot_decode_is_not_lossless_and_goes_the_decoded_way() -> None:
    # Three scans of a progressive photo: libjpeg would smooth the coefficients it lacks.
    data = photo(progressive=True)
    starts = [position for position in range(len(data) - 1) if data[position : position + 2] == b"\xff\xda"]
    cut = data[: starts[3]] + b"\xff\xd9"
    with pytest.raises(NotLossless, match="unfinished"):
        display_and_picture(cut, turbojpeg.read_header(cut), DISPLAY.max_bytes, 600)
    assert not isinstance(chosen(cut), LosslessJpeg)
