"""Untrusted input is bounded: allow-listed decoders, pixel and frame limits checked from headers."""

from __future__ import annotations

import io
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import pytest
from PIL import Image

from mediavault.imaging import DEFAULT_LIMITS, Limits, PermanentImagingError, TranscodeResult, transcode
from mediavault.imaging.metadata import PhotoFacts
from mediavault.imaging.pipeline import transcode_poster
from tests.imaging.helpers import corpus

JOLLA = "images/camera/jolla.jpg"  # 3264x2448, 8 MP


def made(data: bytes, content_type: str, limits: Limits = DEFAULT_LIMITS) -> TranscodeResult:
    """An image's bytes transcoded; a video's made into its poster from a file, as the video job passes it."""
    if not content_type.startswith("video/"):
        return transcode(data, content_type, limits=limits)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "video"
        path.write_bytes(data)
        return transcode_poster(path, content_type, limits=limits)


def refused(data: bytes, content_type: str, limits: Limits = DEFAULT_LIMITS) -> str:
    with pytest.raises(PermanentImagingError) as caught:
        made(data, content_type, limits)
    return caught.value.message


def test_decompression_bomb_is_refused_without_allocating_it() -> None:
    data = corpus("images/bad/decompression_bomb.gif").read_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    assert refused(data, "image/gif") == "image too large"
    assert time.perf_counter() - started < 1
    # Decoding its 4.3 gigapixels would take more than 4 GB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024


def exif_bomb(tags: int, blob_bytes: int) -> bytes:
    """A little-endian TIFF block whose IFD0 has `tags` UNDEFINED tags all pointing at one blob."""
    ifd_at = 8
    blob_at = ifd_at + 2 + 12 * tags + 4
    entries = b"".join(struct.pack("<HHLL", 0x100 + i, 7, blob_bytes, blob_at) for i in range(tags))
    return b"II*\0" + struct.pack("<L", ifd_at) + struct.pack("<H", tags) + entries + b"\0\0\0\0" + bytes(blob_bytes)


_PEAK_OF_A_TRANSCODE = """
import resource, sys
from mediavault.imaging import transcode
data = sys.stdin.buffer.read()
result = transcode(data, sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, result.width, repr(result.photo))
"""


def peak_kib_of_a_transcode(data: bytes, content_type: str) -> tuple[int, int, str]:
    """Peak RSS (KiB), width and photo facts (repr) of one transcode in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_A_TRANSCODE, content_type], input=data, capture_output=True, check=True
    )
    peak, width, facts = done.stdout.decode().split(maxsplit=2)
    return int(peak), int(width), facts.strip()


@pytest.mark.parametrize(("fmt", "content_type"), [("PNG", "image/png"), ("WEBP", "image/webp")])
def test_an_exif_block_past_jpegs_bound_is_dropped_unread(fmt: str, content_type: str) -> None:
    # 400 tags at one 1 MB blob: Pillow's reader would copy the blob for each, 400 MB.
    picture = Image.new("RGB", (64, 64), (200, 40, 40))
    plain, bomb = io.BytesIO(), io.BytesIO()
    picture.save(plain, fmt)
    picture.save(bomb, fmt, exif=exif_bomb(400, 1_000_000))
    assert len(bomb.getvalue()) < 1_100_000
    baseline, _, _ = peak_kib_of_a_transcode(plain.getvalue(), content_type)
    peak, width, facts = peak_kib_of_a_transcode(bomb.getvalue(), content_type)
    assert (width, facts) == (64, repr(PhotoFacts())), "the pixels are still good; the facts are dropped"
    assert peak - baseline < 50 * 1024, (peak, baseline)


_HELD_AFTER_TRANSCODES = """
import io, sys
from PIL import Image
from mediavault.imaging import transcode

def resident_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

count, size = int(sys.argv[1]), int(sys.argv[2])
for index in range(count):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, "WEBP", icc_profile=bytes([index]) * size)
    data = buffer.getvalue()
    del buffer
    transcode(data, "image/webp")
    del data
    if index == 0:
        after_one = resident_bytes()
print(resident_bytes() - after_one)
"""


def test_the_icc_profiles_of_past_uploads_are_not_kept_in_memory() -> None:
    # Nothing bounds a WebP's ICCP chunk but the upload's size; the colour checks' caches kept
    # the last 16 profiles whole in the worker, which holds them against its memory budget.
    size = 40_000_000
    done = subprocess.run([sys.executable, "-c", _HELD_AFTER_TRANSCODES, "17", str(size)], capture_output=True, check=True)
    assert int(done.stdout) < 2 * size, int(done.stdout)


def with_last_scan_repeated(data: bytes, times: int) -> bytes:
    """The progressive JPEG with its last scan (its SOS segment and entropy-coded data) repeated:
    as valid to a decoder, which makes one more pass over the picture for each."""
    last = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * times + data[end:]


def progressive(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (120, 130, 140)).save(out, "JPEG", quality=90, progressive=True)
    return out.getvalue()


def test_a_jpeg_of_more_scans_than_the_limit_is_refused_before_decoding() -> None:
    data = progressive((4000, 3000))
    at_limit = with_last_scan_repeated(data, DEFAULT_LIMITS.max_jpeg_scans - data.count(b"\xff\xda"))
    assert made(at_limit, "image/jpeg").width == 4000
    # A thousand scans of a few bytes each: about 100 KB that take a decoder seconds.
    hostile = with_last_scan_repeated(data, 1000)
    assert len(hostile) < 150_000
    started = time.perf_counter()
    assert refused(hostile, "image/jpeg") == "image too large"
    assert time.perf_counter() - started < 1


def test_ff_da_bytes_in_metadata_are_not_taken_for_scans() -> None:
    out = io.BytesIO()
    # The COM segment holds 200 FF DA pairs; the picture is baseline, one scan.
    Image.new("RGB", (64, 48), (120, 130, 140)).save(out, "JPEG", comment=b"\xff\xda" * 200)
    assert out.getvalue().count(b"\xff\xda") > DEFAULT_LIMITS.max_jpeg_scans
    assert made(out.getvalue(), "image/jpeg").width == 64


@pytest.mark.parametrize("max_pixels", [1_000_000, 5_000_000])
def test_pixel_limit_is_checked_from_the_header(max_pixels: int) -> None:
    # 5 MP is below Pillow's own bomb error (twice the limit), where it only warns.
    data = corpus(JOLLA).read_bytes()
    assert refused(data, "image/jpeg", Limits(max_pixels=max_pixels)) == "image too large"


def test_pixel_limit_at_the_image_size_is_allowed() -> None:
    result = transcode(corpus(JOLLA).read_bytes(), "image/jpeg", limits=Limits(max_pixels=3264 * 2448))
    assert (result.width, result.height) == (3264, 2448)


@pytest.mark.parametrize(
    "payload",
    [
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n",
        b"\xc5\xd0\xd3\xc6" + b"\x00" * 28,  # DOS EPS binary header
        b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x10\x00\x00\x00\x10\x00\x08\x00\x03" + b"\x00" * 64,
        b"II*\x00\x08\x00\x00\x00" + b"\x00" * 64,  # TIFF
        b"BM" + b"\x00" * 64,  # BMP
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    ],
    ids=["eps", "eps-binary", "psd", "tiff", "bmp", "svg"],
)
@pytest.mark.parametrize("declared", ["image/jpeg", "image/png", "application/postscript", "image/vnd.adobe.photoshop"])
def test_formats_outside_the_allow_list_are_refused(payload: bytes, declared: str) -> None:
    assert refused(payload, declared) == "unsupported format"


def test_declared_type_must_match_the_bytes() -> None:
    png = corpus("images/formats/hopper.png").read_bytes()
    assert refused(png, "video/mp4") == "unsupported format"
    assert refused(png, "image/gif") == "unsupported format"
    assert transcode(png, "image/png; charset=binary").kind == "image"


def test_heic_declared_as_heif_is_accepted() -> None:
    assert transcode(corpus("images/heic/IMG_5195.HEIC").read_bytes(), "image/heif").kind == "image"


def test_truncated_video_is_corrupt() -> None:
    data = corpus("video/realshort.mp4").read_bytes()
    assert refused(data[:2048], "video/mp4") == "corrupt video"


def test_garbage_after_a_video_header_is_corrupt() -> None:
    data = corpus("video/realshort.mp4").read_bytes()
    assert refused(data[:32] + bytes(4096), "video/mp4") == "corrupt video"


def test_video_pixel_limit() -> None:
    data = corpus("video/realshort.mp4").read_bytes()
    assert refused(data, "video/mp4", Limits(max_pixels=320 * 240 - 1)) == "video too large"


def test_packet_limit_bounds_the_search_for_a_keyframe() -> None:
    data = video_starting_mid_gop(skip=5)
    # Keyframes every 10 frames; cut at 5, the first one is the 6th packet.
    assert refused(data, "video/mp4", Limits(max_packets_before_first_frame=5)) == "corrupt video"
    result = made(data, "video/mp4", Limits(max_packets_before_first_frame=6))
    assert (result.kind, result.width, result.height) == ("video", 64, 48)


def video_starting_mid_gop(skip: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = 10
        stream.codec_context.options = {"x264-params": "scenecut=0:bframes=0"}
        packets = []
        for i in range(30):
            packets += stream.encode(av.VideoFrame.from_image(Image.new("RGB", (64, 48), (i * 8, 0, 0))))
        packets += stream.encode()
        assert [p.is_keyframe for p in packets[: 11]] == [True] + [False] * 9 + [True]
        for packet in packets[skip:]:
            container.mux(packet)
    return buffer.getvalue()


def test_video_codec_outside_the_allow_list_is_refused() -> None:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 48), (i * 60, 0, 0)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert refused(buffer.getvalue(), "video/mp4") == "unsupported format"
