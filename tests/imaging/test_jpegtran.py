"""libjpeg's lossless transcoding: the same pixels in fewer bytes, flipped exactly, errors as exceptions."""

from __future__ import annotations

import contextlib
import io
import random
import re
import subprocess

import pytest
from PIL import Image

from mediavault.imaging._jpegtran import JpegError, optimize, optimize_and_decode
from mediavault.imaging.lossless import strip
from tests.imaging.helpers import chroma_440, corpus, jpeg_segments

NO_LIMIT = 10**9
_APPS_AND_COMMENT = {*range(0xE0, 0xF0), 0xFE}


def crop(size: tuple[int, int], **params: object) -> bytes:
    """A JPEG of a corner of a corpus photo, made by Pillow (standard Huffman tables unless optimize=True)."""
    picture = Image.open(corpus("images/camera/DSCN0010.jpg")).crop((0, 0, *size))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", **{"quality": 90, **params})
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def is_progressive(data: bytes) -> bool:
    return 0xC2 in jpeg_segments(data)


@pytest.mark.parametrize("progressive", [False, True], ids=["sequential", "progressive"])
def test_the_same_pixels_in_fewer_bytes_and_the_same_coding(progressive: bool) -> None:
    data = crop((640, 480), progressive=progressive, exif=b"Exif\x00\x00" + bytes(200))
    optimised = optimize(data, NO_LIMIT, False, progressive)
    assert decoded(optimised).tobytes() == decoded(data).tobytes()
    assert len(optimised) < len(data) - 200
    assert is_progressive(optimised) == progressive
    assert not set(jpeg_segments(optimised)) & _APPS_AND_COMMENT


def jpegtran_optimised(data: bytes) -> bytes:
    """libjpeg's own optimisation (`jpegtran -optimize`, the reference) less the JFIF segment it writes."""
    return strip(subprocess.run(["jpegtran", "-copy", "none", "-optimize"], input=data, capture_output=True, check=True).stdout)


@pytest.mark.parametrize(
    "data",
    [
        corpus("images/camera/jolla.jpg").read_bytes(),
        corpus("images/camera/DSCN0010.jpg").read_bytes(),
        corpus("images/camera/28-hex_value.jpg").read_bytes(),
        crop((333, 221), subsampling="4:2:0"),
        crop((61, 100), subsampling="4:2:2", quality=100),
        crop((250, 9), subsampling="4:4:4"),
    ],
    ids=["jolla-4:2:0", "DSCN0010-4:2:2", "28-hex_value-4:4:0", "partial-mcus-4:2:0", "partial-mcus-4:2:2", "one-mcu-row-4:4:4"],
)
def test_the_tables_counted_here_are_libjpegs_own(data: bytes) -> None:
    # The symbols are counted here, not by libjpeg's slower gathering pass: the same file or a bug.
    stripped = strip(data)
    assert optimize(stripped, NO_LIMIT, False, False) == jpegtran_optimised(stripped)


@pytest.mark.parametrize(
    ("subsampling", "height"),
    [("4:4:4", 472), ("4:2:2", 472), ("4:2:0", 464)],
)
@pytest.mark.parametrize("progressive", [False, True], ids=["sequential", "progressive"])
def test_a_flip_decodes_to_exactly_the_flipped_pixels(subsampling: str, height: int, progressive: bool) -> None:
    data = crop((600, height), subsampling=subsampling, progressive=progressive)
    flipped = optimize(data, NO_LIMIT, True, progressive)
    assert decoded(flipped).tobytes() == decoded(data).transpose(Image.Transpose.FLIP_TOP_BOTTOM).tobytes()


def test_a_flip_needs_whole_mcu_rows() -> None:
    with pytest.raises(JpegError, match="whole number of MCU rows"):
        optimize(crop((600, 472), subsampling="4:2:0"), NO_LIMIT, True, False)


def scans_cut(data: bytes, kept: int) -> bytes:
    """The progressive JPEG ending after its first `kept` scans."""
    starts = [match.start() for match in re.finditer(b"\xff\xda", data)]
    return data[: starts[kept]] + b"\xff\xd9"


@pytest.mark.parametrize(
    ("data", "max_pixels", "message"),
    [
        (crop((640, 480))[:20000], NO_LIMIT, "Premature end of JPEG file"),
        (b"\x89PNG\r\n\x1a\n", NO_LIMIT, "Not a JPEG file"),
        (crop((640, 480)), 640 * 480 - 1, "more pixels than the limit"),
        (crop((300, 200), progressive=True), NO_LIMIT, None),
        (scans_cut(crop((300, 200), progressive=True), 3), NO_LIMIT, "scans leave coefficients unfinished"),
    ],
    ids=["truncated", "not-a-jpeg", "over-the-pixel-limit", "complete-progressive", "unfinished-progressive"],
)
@pytest.mark.parametrize("with_picture", [False, True], ids=["optimize", "optimize_and_decode"])
def test_what_libjpeg_refuses_or_warns_about_raises(
    data: bytes, max_pixels: int, message: str | None, with_picture: bool
) -> None:
    def transcode() -> bytes:
        if not with_picture:
            return optimize(data, max_pixels, False, message is None)
        width, height = Image.open(io.BytesIO(data)).size if data.startswith(b"\xff\xd8") else (0, 0)
        return optimize_and_decode(data, max_pixels, False, message is None, 2, bytearray(-(-width // 2) * -(-height // 2) * 3))

    if message is None:
        assert decoded(transcode()).tobytes() == decoded(data).tobytes()
        return
    with pytest.raises(JpegError, match=message):
        transcode()


def test_only_three_component_ycbcr_is_taken() -> None:
    grey = io.BytesIO()
    Image.open(io.BytesIO(crop((64, 64)))).convert("L").save(grey, "JPEG")
    with pytest.raises(JpegError, match="three-component YCbCr"):
        optimize(grey.getvalue(), NO_LIMIT, False, False)


def test_damaged_bytes_raise_never_crash() -> None:
    sources = [crop((96, 64)), crop((96, 64), progressive=True)]
    generator = random.Random(18)
    for attempt in range(600):
        damaged = bytearray(sources[attempt % 2])
        for _ in range(generator.randint(1, 6)):
            damaged[generator.randrange(len(damaged))] = generator.randrange(256)
        with contextlib.suppress(JpegError):
            optimize(bytes(damaged), NO_LIMIT, attempt % 3 == 0, attempt % 4 == 0)
        with contextlib.suppress(JpegError):
            optimize_and_decode(bytes(damaged), NO_LIMIT, attempt % 3 == 0, attempt % 4 == 0, 2, bytearray(48 * 32 * 3))


def test_only_a_pixel_buffer_of_the_scaled_pictures_size_is_written() -> None:
    with pytest.raises(JpegError, match="not the scaled picture's size"):
        optimize_and_decode(crop((97, 64)), NO_LIMIT, False, False, 2, bytearray(48 * 32 * 3))
    with pytest.raises(ValueError, match="scale"):
        optimize_and_decode(crop((96, 64)), NO_LIMIT, False, False, 3, bytearray(32 * 22 * 3))


def sampled(size: tuple[int, int], subsampling: str, progressive: bool) -> bytes:
    """A crop in this chroma subsampling, written progressive (libjpeg's simple progression) or not."""
    data = chroma_440(crop(size, subsampling="4:4:4")) if subsampling == "4:4:0" else crop(size, subsampling=subsampling)
    if not progressive:
        return data
    return subprocess.run(["jpegtran", "-copy", "none", "-progressive"], input=data, capture_output=True, check=True).stdout


def draft_decoded(data: bytes, scale: int) -> Image.Image:
    """What Pillow decodes after draft() picked 1/scale, as decode.decode_with_pillow has it do."""
    image = Image.open(io.BytesIO(data))
    image.draft(None, (image.width // scale, image.height // scale))
    image.load()
    return image


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("progressive", [False, True], ids=["sequential", "progressive"])
@pytest.mark.parametrize("subsampling", ["4:4:4", "4:2:2", "4:2:0", "4:4:0"])
@pytest.mark.parametrize(("size", "flip"), [((333, 221), False), ((600, 464), True)], ids=["partial-mcus", "flipped"])
def test_the_picture_decoded_with_the_coefficients_is_pillows_draft_decode(
    subsampling: str, progressive: bool, scale: int, size: tuple[int, int], flip: bool
) -> None:
    data = sampled(size, subsampling, progressive)
    expected = draft_decoded(data, scale)
    assert expected.size == (-(-size[0] // scale), -(-size[1] // scale))
    if flip:
        expected = expected.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    pixels = bytearray(expected.width * expected.height * 3)
    # One decode for both: the display is the same file optimize() writes.
    assert optimize_and_decode(data, NO_LIMIT, flip, progressive, scale, pixels) == optimize(data, NO_LIMIT, flip, progressive)
    assert Image.frombuffer("RGB", expected.size, pixels, "raw", "RGB", 0, 1).tobytes() == expected.tobytes()
