"""Shared checks for the imaging tests: every variant is decoded back and inspected."""

from __future__ import annotations

import functools
import io
import struct
from pathlib import Path

from PIL import Image, ImageChops, ImageStat

from mediavault.imaging import DEFAULT_VARIANTS, TranscodeResult, transcode, turbojpeg
from mediavault.imaging.colour import DISPLAY_P3, Chromaticity, Primaries, matrix_profile
from mediavault.imaging.pipeline import transcode_poster
from tests.conftest import CORPUS

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".heic": "image/heic",
    ".heif": "image/heif",
    ".avif": "image/avif",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
}
FORMATS = {"image/jpeg": "JPEG", "image/webp": "WEBP"}
SPECS = {spec.name: spec for spec in (*DEFAULT_VARIANTS.image, DEFAULT_VARIANTS.poster, *DEFAULT_VARIANTS.video)}


def corpus(relative: str) -> Path:
    return CORPUS / relative


def content_type(path: Path) -> str:
    return CONTENT_TYPES[path.suffix.lower()]


@functools.cache
def transcoded(relative: str) -> TranscodeResult:
    """Each corpus file is transcoded once per test run, however many tests look at it (a video
    from its file, as the video job passes it)."""
    path = corpus(relative)
    mime = content_type(path)
    if mime.startswith("video/"):
        return transcode_poster(path, mime)
    return transcode(path.read_bytes(), mime)


def open_variant(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def check_variants(result: TranscodeResult, names: set[str]) -> dict[str, Image.Image]:
    """Every variant present, decodable, within its box and budget, aspect kept, never upscaled, no metadata."""
    assert {v.name for v in result.variants} == names
    assert len(result.variants) == len(names)
    decoded = {}
    for variant in result.variants:
        spec = SPECS[variant.name]
        image = open_variant(variant.data)
        assert image.format == FORMATS[variant.content_type], variant.name
        assert image.size == (variant.width, variant.height), variant.name
        assert len(variant.data) <= spec.max_bytes, variant.name
        assert variant.width <= spec.box, variant.name
        assert variant.height <= spec.box, variant.name
        assert variant.width <= result.width, f"{variant.name} upscaled"
        assert variant.height <= result.height, f"{variant.name} upscaled"
        assert aspect_kept(variant.width, variant.height, result.width, result.height), variant.name
        assert_no_metadata(image, variant.data)
        decoded[variant.name] = image
    return decoded


def aspect_kept(width: int, height: int, original_width: int, original_height: int) -> bool:
    """Equal aspect ratios up to rounding one side to a whole pixel."""
    return (
        abs(width - height * original_width / original_height) <= 1
        or abs(height - width * original_height / original_width) <= 1
    )


def assert_no_metadata(image: Image.Image, data: bytes) -> None:
    """No metadata but, for a wide-colour variant, our own compact Display P3 profile."""
    assert len(image.getexif()) == 0
    for key in ("exif", "xmp", "XML:com.adobe.xmp", "comment", "photoshop"):
        assert key not in image.info, key
    wide = "icc_profile" in image.info
    if wide:
        assert image.info["icc_profile"] == DISPLAY_P3
    if image.format == "JPEG":
        # Only the JFIF header may precede the tables and the frame (baseline or, for a
        # lossless display, progressive): no APP1 (EXIF, XMP), APP13 (IPTC) or COM
        # segment, and APP2 (ICC) only to hold DISPLAY_P3.
        allowed = {0xE0, 0xDB, 0xC4, 0xC0, 0xC2, 0xDD} | ({0xE2} if wide else set())
        assert set(jpeg_segments(data)) <= allowed, [hex(m) for m in jpeg_segments(data)]
    else:
        allowed_chunks = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH"} | ({b"ICCP"} if wide else set())
        assert set(webp_chunks(data)) <= allowed_chunks, webp_chunks(data)


def jpeg_segments(data: bytes) -> list[int]:
    """The marker of every segment between SOI and the first scan."""
    markers = []
    position = 2
    while data[position] == 0xFF and data[position + 1] != 0xDA:
        markers.append(data[position + 1])
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return markers


def webp_chunks(data: bytes) -> list[bytes]:
    """The FourCC of every chunk in a RIFF/WEBP file (EXIF, XMP and ICCP carry metadata)."""
    chunks = []
    position = 12
    while position + 8 <= len(data):
        size = int.from_bytes(data[position + 4 : position + 8], "little")
        chunks.append(data[position : position + 4])
        position += 8 + size + (size & 1)
    return chunks


def chroma_440(data: bytes) -> bytes:
    """The 4:4:4 JPEG again with its chroma at half height (4:4:0), which Pillow cannot write."""
    header = turbojpeg.read_header(data)
    width, height = header.width, header.height
    y, cb, cr = turbojpeg.decompress_to_planes(data, header)
    rows = range(0, height, 2)
    planes = [[plane[row * width : (row + 1) * width] for row in lines] for plane, lines in ((y, range(height)), (cb, rows), (cr, rows))]
    # Each plane as many rows as the encoder reads (an odd height has a luma row more than the
    # picture), the last one repeated.
    padded = [
        b"".join(lines + lines[-1:] * (turbojpeg.plane_size(c, width, height, turbojpeg.SAMP_440)[1] - len(lines)))
        for c, lines in enumerate(planes)
    ]
    return turbojpeg.compress_planes(padded, width, height, turbojpeg.SAMP_440, 88)


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference over the channels of two pictures of one size, in RGB."""
    return sum(ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean) / 3


def power_law_profile(primaries: Primaries, white: Chromaticity, exponent: float, description: str) -> bytes:
    """An RGB profile of these primaries and white whose tone curve is a plain power law: light is
    level ** exponent (1 for a linear profile, 563 / 256 for Adobe RGB's, 1.8 for ProPhoto's)."""
    profile = matrix_profile(primaries, white, description)
    # The three channels share one tone curve, the profile's last data: the power law in its place.
    curve = profile.index(b"para")
    power_law = b"para\0\0\0\0" + struct.pack(">HHi", 0, 0, round(exponent * 65536))
    return profile[:curve] + power_law.ljust(len(profile) - curve, b"\0")


def avif_sequence(repeats: bool | None, track_duration: int | None) -> bytes:
    """A three-frame AVIF of 100 ms frames as Pillow writes it, its edit list (one 300 ms edit,
    repeated for an indefinite track duration) made to repeat or not, or taken out (None), and its
    track header's duration set to track_duration milliseconds (None: left indefinite)."""
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((220, 30, 40), (30, 180, 60), (40, 60, 210))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "AVIF", save_all=True, append_images=frames[1:], duration=100)
    data = bytearray(buffer.getvalue())
    # Version 1, flags 1 (repeat), one edit of 300 in the movie's timescale (1000).
    elst = data.index(b"elst")
    assert data[elst + 4 : elst + 20] == bytes.fromhex("01000001 00000001 000000000000012c")
    if repeats is None:
        data[data.index(b"edts") : data.index(b"edts") + 4] = b"free"
    elif not repeats:
        data[elst + 7] = 0
    if track_duration is not None:
        # Version 1: past the flags, two times, the track id and a reserved word.
        duration = data.index(b"tkhd") + 4 + 4 + 24
        assert data[duration : duration + 8] == b"\xff" * 8
        data[duration : duration + 8] = track_duration.to_bytes(8, "big")
    return bytes(data)
