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
        corpus("images/camera/DSCN0010.jpg").read_bytes(),
        crop((333, 221), subsampling="4:2:0"),
        crop((61, 100), subsampling="4:2:2", quality=100),
        crop((250, 9), subsampling="4:4:4"),
        crop((640, 2032), subsampling="4:2:0"),
    ],
    ids=["DSCN0010-4:2:2", "partial-mcus-4:2:0", "partial-mcus-4:2:2", "one-mcu-row-4:4:4", "127-mcu-rows-4:2:0"],
)
def test_the_tables_counted_here_are_libjpegs_own(data: bytes) -> None:
    # Below 128 MCU rows every symbol is counted here, not by libjpeg's slower gathering pass:
    # the same file or a bug.
    stripped = strip(data)
    assert optimize(stripped, NO_LIMIT, False, False) == jpegtran_optimised(stripped)


def ac_symbols_with_a_code(data: bytes) -> list[int]:
    """How many symbols each AC Huffman table of the JPEG gives a code."""
    counts, position = [], 2
    while data[position + 1] != 0xDA:
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        table = position + 4
        while data[position + 1] == 0xC4 and table < position + 2 + length:
            symbols = sum(data[table + 1 : table + 17])
            if data[table] >> 4:
                counts.append(symbols)
            table += 17 + symbols
        position += 2 + length
    return counts


@pytest.mark.parametrize(
    "relative",
    ["images/camera/jolla.jpg", "images/camera/iphone_hdr_NO.jpg", "images/camera/28-hex_value.jpg"],
)
def test_a_large_pictures_ac_tables_from_every_eighth_row_are_within_a_fifth_of_a_percent_of_optimal(relative: str) -> None:
    stripped = strip(corpus(relative).read_bytes())
    optimal = jpegtran_optimised(stripped)
    sampled = optimize(stripped, NO_LIMIT, False, False)
    assert decoded(sampled).tobytes() == decoded(stripped).tobytes()
    assert len(optimal) <= len(sampled) <= len(optimal) * 1.002
    # Every legal AC symbol (end of block, a run of 16 zeros, runs 0-15 of 1-10 bits) has a
    # code, whatever the rows not counted hold.
    assert ac_symbols_with_a_code(sampled) == [2 + 16 * 10] * len(ac_symbols_with_a_code(optimal))


def test_a_large_flipped_pictures_tables_are_counted_whole() -> None:
    # Its display has no stripped original to fall back on when it would not be smaller.
    stripped = strip(corpus("images/camera/jolla.jpg").read_bytes())
    reference = subprocess.run(
        ["jpegtran", "-copy", "none", "-optimize", "-flip", "vertical", "-perfect"], input=stripped, capture_output=True, check=True
    ).stdout
    assert optimize(stripped, NO_LIMIT, True, False) == strip(reference)


def with_an_ac_coefficient(value: int, mcu_rows: int, row: int) -> bytes:
    """A baseline 4:4:4 JPEG, one MCU wide and mcu_rows high, all grey but for the first AC
    coefficient of the luma block of MCU row `row`, which is `value` (positive): its Huffman
    table codes only the symbols used, so `value` may be more bits than baseline allows."""
    bits = value.bit_length()
    entropy = "".join("010" + format(value, f"0{bits}b") + "0" + "00" * 2 if mcu == row else "00" * 3 for mcu in range(mcu_rows))
    entropy += "1" * (-len(entropy) % 8)
    coded = int(entropy, 2).to_bytes(len(entropy) // 8, "big").replace(b"\xff", b"\xff\x00")

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (2 + len(body)).to_bytes(2, "big") + body

    components = b"".join(bytes([c, 0x11, 0]) for c in (1, 2, 3))
    return b"".join([
        b"\xff\xd8",
        segment(0xDB, bytes(1) + bytes([1] * 64)),
        segment(0xC0, bytes([8]) + (8 * mcu_rows).to_bytes(2, "big") + (8).to_bytes(2, "big") + bytes([3]) + components),
        # DC: the zero difference, code 0. AC: end of block 0, (run 0, `bits` bits) 10.
        segment(0xC4, bytes([0x00, 1]) + bytes(15) + bytes([0x00])),
        segment(0xC4, bytes([0x10, 1, 1]) + bytes(14) + bytes([0x00, bits])),
        segment(0xDA, bytes([3, 1, 0x00, 2, 0x00, 3, 0x00, 0, 63, 0])),
        coded,
        b"\xff\xd9",
    ])


@pytest.mark.parametrize(
    ("mcu_rows", "row"),
    [(10, 3), (160, 0), (160, 3)],
    ids=["all-rows-counted", "in-a-counted-row", "in-a-row-not-counted"],
)
def test_an_ac_coefficient_out_of_baseline_range_raises_wherever_it_is(mcu_rows: int, row: int) -> None:
    # 1023 is the largest baseline magnitude; the same file with 1024 must never be written.
    fits = with_an_ac_coefficient(1023, mcu_rows, row)
    assert decoded(optimize(fits, NO_LIMIT, False, False)).tobytes() == decoded(fits).tobytes()
    too_large = with_an_ac_coefficient(1024, mcu_rows, row)
    decoded(too_large)
    with pytest.raises(JpegError, match="out of baseline range"):
        optimize(too_large, NO_LIMIT, False, False)


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


def stretched(size: tuple[int, int]) -> bytes:
    """A corpus photo resized to `size` (to be tall and narrow: many MCU rows, few bytes)."""
    buffer = io.BytesIO()
    Image.open(corpus("images/camera/DSCN0010.jpg")).resize(size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_damaged_bytes_raise_never_crash() -> None:
    # The tall one's AC symbols are counted in every eighth MCU row only.
    sources = [crop((96, 64)), crop((96, 64), progressive=True), stretched((48, 2048))]
    generator = random.Random(18)
    for attempt in range(900):
        source = sources[attempt % 3]
        width, height = Image.open(io.BytesIO(source)).size
        damaged = bytearray(source)
        for _ in range(generator.randint(1, 6)):
            damaged[generator.randrange(len(damaged))] = generator.randrange(256)
        flip, progressive = attempt % 4 == 0, attempt % 5 == 0
        with contextlib.suppress(JpegError):
            optimize(bytes(damaged), NO_LIMIT, flip, progressive)
        with contextlib.suppress(JpegError):
            optimize_and_decode(bytes(damaged), NO_LIMIT, flip, progressive, 2, bytearray(width // 2 * height // 2 * 3))


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
