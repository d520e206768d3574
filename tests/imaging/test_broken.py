"""Broken images are refused: whatever a reference decoder refuses never becomes variants.

Every corpus image, of every format, is truncated at several lengths and has bytes
flipped inside its compressed data (PNG IDAT, the JPEG scan, GIF image data, the WebP
VP8/VP8L bitstream, the HEIF/AVIF mdat). The references are stock Pillow's full
`Image.open(...).load()` (with the pillow-heif and AVIF plugins for HEIF and AVIF) and,
for JPEG, libjpeg-turbo's djpeg, whose exit status 1 is a refusal (2 is a warning, and
it still decodes the picture). A truncated HEIF or AVIF is refused even where the
reference decodes it (see decode.open_image).
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from mediavault.imaging import PermanentImagingError, transcode
from mediavault.imaging.errors import CORRUPT_IMAGE, IMAGE_TOO_LARGE, UNSUPPORTED_FORMAT
from mediavault.media.v1 import media_pb2 as mpb
from tests.conftest import CORPUS
from tests.helpers import settled, upload
from tests.imaging.helpers import content_type

REASONS = {CORRUPT_IMAGE, IMAGE_TOO_LARGE, UNSUPPORTED_FORMAT}
# Taken before any test has run the pipeline, which sets its own limit.
STOCK_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
DJPEG = shutil.which("djpeg")

# The orientation set is eighteen files from one encoder; two stand for them.
IMAGES = sorted(
    path.relative_to(CORPUS).as_posix()
    for path in (CORPUS / "images").rglob("*")
    if path.suffix.lower() in {".jpg", ".png", ".gif", ".webp", ".heic", ".heif", ".avif"}
    and (path.parent.name != "orientation" or path.stem in ("Landscape_5", "Portrait_8"))
)
# Files with no compressed data to corrupt: not an image, or a header and nothing else.
HEADER_ONLY = {"images/bad/broken.png", "images/bad/decompression_bomb.gif", "images/bad/zero_width.gif"}
TRUNCATIONS = (0.1, 0.5, 0.9)
FLIPS = (0.1, 0.5, 0.9)


def _png_data(data: bytes) -> tuple[int, int]:
    """From the first IDAT's deflate data (past the zlib header) to the end of the last IDAT."""
    spans = []
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        if data[position + 4 : position + 8] == b"IDAT":
            spans.append((position + 8, position + 8 + length))
        position += 12 + length
    return spans[0][0] + 2, spans[-1][1]


def _jpeg_data(data: bytes) -> tuple[int, int]:
    """The entropy-coded data: from after the first SOS header to the EOI marker, if there is one."""
    position = 2
    while data[position + 1] != 0xDA:
        assert data[position] == 0xFF, "no marker where a segment should start"
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    start = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    end = data.rfind(b"\xff\xd9")
    return start, end if end > start else len(data)


def _gif_data(data: bytes) -> tuple[int, int]:
    """The first frame's LZW sub-blocks."""
    position = 13 + _gif_colour_table(data[10])
    while data[position] == 0x21:
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    assert data[position] == 0x2C, "no image descriptor"
    # Past the descriptor, its colour table and the LZW minimum code size.
    start = position + 10 + _gif_colour_table(data[position + 9]) + 1
    end = start
    while data[end]:
        end += data[end] + 1
    return start, end


def _gif_colour_table(flags: int) -> int:
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _webp_data(data: bytes) -> tuple[int, int]:
    """The first VP8 or VP8L bitstream, past its frame header, also inside an animation frame."""
    for tag, header in ((b"VP8 ", 10), (b"VP8L", 5)):
        found = data.find(tag, 12)
        if found != -1:
            size = int.from_bytes(data[found + 4 : found + 8], "little")
            return found + 8 + header, found + 8 + size
    raise AssertionError("no VP8 or VP8L chunk")


def _isobmff_data(data: bytes) -> tuple[int, int]:
    """The mdat box's payload."""
    position = 0
    while True:
        size, header = int.from_bytes(data[position : position + 4], "big"), 8
        if size == 1:
            # A 64-bit size follows the box type.
            size, header = int.from_bytes(data[position + 8 : position + 16], "big"), 16
        if data[position + 4 : position + 8] == b"mdat":
            return position + header, position + size
        assert size >= header, "a box this test cannot walk past"
        position += size


def compressed_data(data: bytes) -> tuple[int, int]:
    """Where the compressed pixels of an image file are, as a (start, end) byte range."""
    if data.startswith(b"\x89PNG"):
        return _png_data(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_data(data)
    if data.startswith(b"GIF"):
        return _gif_data(data)
    if data.startswith(b"RIFF"):
        return _webp_data(data)
    return _isobmff_data(data)


def mutated(data: bytes, mutation: str) -> bytes:
    kind, _, where = mutation.partition("@")
    if kind == "truncated":
        return data[:-1] if where == "end" else data[: int(len(data) * float(where))]
    start, end = compressed_data(data)
    assert end - start > 8, "too little compressed data to corrupt"
    position = start + int((end - start - 4) * float(where))
    flipped = bytes(b ^ 0x5A for b in data[position : position + 4])
    return data[:position] + flipped + data[position + 4 :]


def mutations(relative: str) -> list[str]:
    found = [*(f"truncated@{f}" for f in TRUNCATIONS), "truncated@end"]
    if relative not in HEADER_ONLY:
        found += [f"flipped@{f}" for f in FLIPS]
    return found


def reference_refusal(data: bytes) -> str | None:
    """Why a reference decoder refuses the bytes, or None when they all decode them."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = STOCK_MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Exception as exc:
        return f"Pillow: {type(exc).__name__}: {exc}"
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if data.startswith(b"\xff\xd8"):
        assert DJPEG, "djpeg (Debian's libjpeg-turbo-progs, see scripts/install-system-deps.sh) is not installed"
        djpeg = subprocess.run([DJPEG, "-outfile", "/dev/null"], input=data, capture_output=True, check=False)
        if djpeg.returncode == 1:
            return f"djpeg: {djpeg.stderr.decode(errors='replace').strip()}"
    return None


def pipeline_refusal(data: bytes, declared: str, jpeg_planes: bool = True) -> str | None:
    """The reason the pipeline refused the file with, or None when it made variants."""
    try:
        result = transcode(data, declared, jpeg_planes=jpeg_planes)
    except PermanentImagingError as exc:
        refusal = exc.message
    else:
        assert result.variants
        return None
    assert refusal in REASONS
    return refusal


@pytest.mark.parametrize(
    ("relative", "mutation"), [(relative, mutation) for relative in IMAGES for mutation in mutations(relative)]
)
def test_a_file_a_reference_decoder_refuses_is_refused(relative: str, mutation: str) -> None:
    data = mutated((CORPUS / relative).read_bytes(), mutation)
    declared = content_type(Path(relative))
    refusal = reference_refusal(data)
    for jpeg_planes in (True, False) if declared == "image/jpeg" else (True,):
        outcome = pipeline_refusal(data, declared, jpeg_planes)
        assert outcome is not None or refusal is None, f"variants made (jpeg_planes={jpeg_planes}) although {refusal}"


@pytest.mark.parametrize(
    "relative",
    [
        "images/formats/hopper.jpg",
        "images/formats/hopper.png",
        "images/formats/hopper.gif",
        "images/formats/hopper.webp",
        "images/formats/hopper.avif",
        "images/heic/samplefilehub.heif",
    ],
)
def test_the_mutations_break_files_of_every_format(relative: str) -> None:
    # Or the test above could pass without ever meeting a broken file of that format.
    data = (CORPUS / relative).read_bytes()
    refused = {m for m in mutations(relative) if reference_refusal(mutated(data, m)) is not None}
    assert any(m.startswith("truncated") for m in refused), refused
    start, end = compressed_data(data)
    assert 0 < start < end <= len(data)


@pytest.mark.parametrize("relative", ["images/heic/IMG_5195.HEIC", "images/heic/samplefilehub.heif", "images/formats/hopper.avif"])
@pytest.mark.parametrize("mutation", [*(f"truncated@{f}" for f in TRUNCATIONS), "truncated@end"])
def test_a_truncated_heif_or_avif_is_refused_even_where_libheif_fills_in_the_missing_tiles(
    relative: str, mutation: str
) -> None:
    # IMG_5195.HEIC is a grid of tiles; cut short, libheif decodes the tiles it has and
    # paints the others grey, and stock pillow-heif hands that out without an error.
    data = mutated((CORPUS / relative).read_bytes(), mutation)
    with pytest.raises(PermanentImagingError, match=f"^{CORRUPT_IMAGE}$"):
        transcode(data, content_type(Path(relative)))


@pytest.mark.parametrize(
    ("relative", "mutation"),
    [
        ("images/formats/hopper.png", "truncated@0.5"),
        ("images/formats/hopper.gif", "truncated@0.5"),
        ("images/formats/hopper.webp", "truncated@0.9"),
        ("images/camera/jolla.jpg", "truncated@0.9"),
        ("images/formats/hopper.jpg", "truncated@0.9"),
        ("images/heic/samplefilehub.heif", "truncated@0.9"),
    ],
)
def test_truncated_files_are_refused_even_if_pillow_was_told_to_load_them(
    monkeypatch: pytest.MonkeyPatch, relative: str, mutation: str
) -> None:
    # A library in the same process may turn this global on; the pipeline must not follow.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = mutated((CORPUS / relative).read_bytes(), mutation)
    declared = content_type(Path(relative))
    for jpeg_planes in (True, False):
        with pytest.raises(PermanentImagingError, match=f"^{CORRUPT_IMAGE}$"):
            transcode(data, declared, jpeg_planes=jpeg_planes)


@pytest.mark.parametrize(
    ("relative", "mutation"), [("images/formats/hopper.png", "flipped@0.5"), ("images/camera/jolla.jpg", "truncated@0.9")]
)
async def test_a_broken_upload_ends_failed_with_its_reason(storage, media, auth, user_id, worker, relative, mutation):
    md = auth(user_id)
    data = mutated((CORPUS / relative).read_bytes(), mutation)
    assert reference_refusal(data) is not None
    declared = content_type(Path(relative))
    done = await upload(storage, md, data, filename=Path(relative).name, content_type=declared)
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_FAILED
    assert item.processing_error == CORRUPT_IMAGE
    assert item.attempts == 1
    assert not item.variants


def test_a_palette_png_with_more_transparency_entries_than_colours_is_corrupt() -> None:
    # Pillow decodes it and only objects when the palette is applied, in the colour conversion.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes(8) for _ in range(8))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", b"\x00\x00\x00")
        + chunk(b"tRNS", b"\x00" * 300)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(PermanentImagingError, match=f"^{CORRUPT_IMAGE}$"):
        transcode(data, "image/png")
