"""Animated GIF, WebP and PNG keep moving: an animated WebP and an H.264 MP4 besides the stills."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import av
import pytest
from PIL import GifImagePlugin, Image, ImageChops, ImageCms, ImageDraw, ImageStat

from mediavault.imaging import (
    DEFAULT_LIMITS,
    DEFAULT_VARIANTS,
    ImagingError,
    Limits,
    PermanentImagingError,
    TranscodeResult,
    transcode,
)
from mediavault.imaging.animation import ANIMATION, GIFV, Animation
from mediavault.imaging.colour import D65, DISPLAY_P3, SRGB_PRIMARIES
from mediavault.imaging.spec import AnimationLimits
from tests.imaging.helpers import avif_sequence, check_variants, corpus, open_variant, power_law_profile, transcoded

IMAGE_VARIANTS = {spec.name for spec in DEFAULT_VARIANTS.image}
COLOURS = ((220, 30, 40, 255), (30, 180, 60, 255), (40, 60, 210, 255))


def webp_frame_durations(data: bytes) -> list[int]:
    """The duration of each ANMF chunk of an animated WebP, in milliseconds."""
    durations, position = [], 12
    while position + 8 <= len(data):
        size = int.from_bytes(data[position + 4 : position + 8], "little")
        if data[position : position + 4] == b"ANMF":
            durations.append(int.from_bytes(data[position + 20 : position + 23], "little"))
        position += 8 + size + (size & 1)
    return durations


def webp_plays(data: bytes) -> int:
    """How many times an animated WebP plays through, from its ANIM chunk (0: for ever)."""
    position = 12
    while position + 8 <= len(data):
        size = int.from_bytes(data[position + 4 : position + 8], "little")
        if data[position : position + 4] == b"ANIM":
            # Past the background colour.
            return int.from_bytes(data[position + 12 : position + 14], "little")
        position += 8 + size + (size & 1)
    raise AssertionError("no ANIM chunk")


def mp4_facts(data: bytes) -> tuple[str, tuple[int, int], int, float]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_image() for frame in container.decode(stream)]
        assert stream.duration is not None
        assert stream.time_base is not None
        return stream.codec_context.name, frames[0].size, len(frames), float(stream.duration * stream.time_base)


def renditions(animation: Animation | None) -> dict[str, bytes]:
    assert animation is not None
    assert [(v.name, v.content_type) for v in animation.variants] == [(ANIMATION, "image/webp"), (GIFV, "video/mp4")]
    return {v.name: v.data for v in animation.variants}


def test_newtons_cradle_keeps_all_its_frames_and_timing() -> None:
    result = transcoded("images/formats/newtonscradle.gif")
    check_variants(result, IMAGE_VARIANTS)
    assert result.animation is not None
    assert (result.animation.frames, result.animation.duration_ms) == (36, 820)
    made = renditions(result.animation)
    webp = Image.open(io.BytesIO(made[ANIMATION]))
    assert (webp.format, webp.size, getattr(webp, "n_frames", 1)) == ("WEBP", (200, 150), 36)
    durations = webp_frame_durations(made[ANIMATION])
    assert durations[:3] == [50, 20, 20]
    assert abs(sum(durations) - 820) <= 5
    codec, size, frames, seconds = mp4_facts(made[GIFV])
    assert (codec, size) == ("h264", (200, 150))
    assert frames >= 36
    assert seconds == pytest.approx(0.82, abs=0.03)
    # Index first, so that a browser starts playing before the whole file is in.
    assert made[GIFV].find(b"moov") < made[GIFV].find(b"mdat")


def animated(fmt: str, size: tuple[int, int] = (161, 121), durations: tuple[int, ...] = (100, 200, 300)) -> bytes:
    frames = [Image.new("RGBA", size, colour) for colour in COLOURS[: len(durations)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=list(durations), loop=0)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mime"), [("WEBP", "image/webp"), ("PNG", "image/png"), ("GIF", "image/gif"), ("AVIF", "image/avif")]
)
def test_animated_webp_png_gif_and_avif_become_both_renditions(fmt: str, mime: str) -> None:
    result = transcode(animated(fmt), mime)
    check_variants(result, IMAGE_VARIANTS)
    assert result.animation is not None
    assert result.animation.duration_ms == 600
    made = renditions(result.animation)
    webp = Image.open(io.BytesIO(made[ANIMATION]))
    assert (webp.size, getattr(webp, "n_frames", 1)) == ((161, 121), 3)
    assert webp_frame_durations(made[ANIMATION])[:2] == [100, 200]
    codec, size, _, seconds = mp4_facts(made[GIFV])
    # 4:2:0 wants even sides.
    assert (codec, size) == ("h264", (160, 120))
    assert seconds == pytest.approx(0.6, abs=0.03)


@pytest.mark.parametrize(("fmt", "mime"), [("WEBP", "image/webp"), ("PNG", "image/png")])
def test_an_opaque_animation_keeps_each_frames_duration(fmt: str, mime: str) -> None:
    # Pillow opens these in RGB, which the stills' decode takes as they are, without a copy.
    frames = [Image.new("RGB", (161, 121), colour[:3]) for colour in COLOURS]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=[300, 100, 200], loop=0)
    result = transcode(buffer.getvalue(), mime)
    assert result.animation is not None
    assert result.animation.duration_ms == 600
    assert webp_frame_durations(renditions(result.animation)[ANIMATION]) == [300, 100, 200]


@pytest.mark.parametrize(
    ("fmt", "durations", "shown"),
    [
        # GIF delays are in centiseconds; 0 and 1 are shown for 100 ms.
        ("GIF", (0, 10, 20, 30), (100, 100, 20, 30)),
        # A 60 fps WebP or APNG: 16 and 17 ms are shown as they are.
        ("WEBP", (0, 10, 11, 16, 17), (100, 100, 11, 16, 17)),
        ("PNG", (0, 10, 11, 16, 17), (100, 100, 11, 16, 17)),
    ],
)
def test_a_frame_of_10_ms_or_less_is_shown_for_100_as_browsers_do_and_any_longer_as_it_is(
    fmt: str, durations: tuple[int, ...], shown: tuple[int, ...]
) -> None:
    frames = [Image.new("RGB", (64, 48), (40 * index, 80, 160)) for index in range(len(durations))]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=list(durations), loop=0)
    result = transcode(buffer.getvalue(), f"image/{fmt.lower()}")
    assert result.animation is not None
    assert result.animation.duration_ms == sum(shown)
    made = renditions(result.animation)
    assert webp_frame_durations(made[ANIMATION]) == list(shown)
    assert mp4_facts(made[GIFV])[3] == pytest.approx(sum(shown) / 1000, abs=0.002)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_the_webps_last_frame_lasts_its_own_duration(fmt: str) -> None:
    # A long last frame, a pause before the loop starts again, is common in GIFs.
    made = renditions(transcode(animated(fmt, durations=(100, 200, 1500)), f"image/{fmt.lower()}").animation)
    assert webp_frame_durations(made[ANIMATION]) == [100, 200, 1500]


@pytest.mark.parametrize(
    ("fmt", "loop", "plays"),
    [
        # A GIF without a loop count plays once; with one, as many times more (0: for ever).
        ("GIF", None, 1),
        ("GIF", 0, 0),
        ("GIF", 1, 2),
        ("GIF", 3, 4),
        # 65536 plays, one more than the WebP holds.
        ("GIF", 65535, 65535),
        # A WebP's and an APNG's count the plays themselves.
        ("WEBP", 0, 0),
        ("WEBP", 3, 3),
        ("PNG", 0, 0),
        ("PNG", 1, 1),
        ("PNG", 3, 3),
        # Pillow writes an AVIF whose edit list repeats for as long as its track, indefinite.
        ("AVIF", None, 0),
    ],
)
def test_the_animated_webp_plays_as_many_times_as_browsers_play_the_source(fmt: str, loop: int | None, plays: int) -> None:
    frames = [Image.new("RGB", (64, 48), colour[:3]) for colour in COLOURS]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, **({} if loop is None else {"loop": loop}))
    result = transcode(buffer.getvalue(), f"image/{fmt.lower()}")
    assert result.animation is not None
    assert result.animation.plays == plays
    assert webp_plays(renditions(result.animation)[ANIMATION]) == plays


@pytest.mark.parametrize(
    ("repeats", "track_duration", "plays"),
    [
        (True, None, 0),
        # The track lasts three edits, or part of a third: the edit plays three times, as libavif and Chromium count.
        (True, 900, 3),
        (True, 601, 3),
        (True, 300, 1),
        (False, None, 1),
        # Without an edit list libavif knows no count, and Chromium plays it for ever.
        (None, None, 0),
    ],
)
def test_an_avif_sequence_plays_as_many_times_as_its_edit_list_says(
    repeats: bool | None, track_duration: int | None, plays: int
) -> None:
    result = transcode(avif_sequence(repeats, track_duration), "image/avif")
    assert result.animation is not None
    assert (result.animation.frames, result.animation.duration_ms) == (3, 300)
    assert result.animation.plays == plays
    assert webp_plays(renditions(result.animation)[ANIMATION]) == plays


def test_a_gifs_loop_count_may_be_animexts_as_well_as_netscape() -> None:
    data = animated("GIF")
    assert b"NETSCAPE2.0\x03\x01\x00\x00" in data
    # Loop count 2, under the other name: three plays.
    result = transcode(data.replace(b"NETSCAPE2.0\x03\x01\x00\x00", b"ANIMEXTS1.0\x03\x01\x02\x00"), "image/gif")
    assert result.animation is not None
    assert (result.animation.plays, webp_plays(renditions(result.animation)[ANIMATION])) == (3, 3)


def test_the_mp4_shows_transparency_over_white_and_keeps_the_colours() -> None:
    frames = [Image.new("RGBA", (161, 121), colour) for colour in (COLOURS[0], (40, 60, 210, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=[100, 100], loop=0)
    result = transcode(buffer.getvalue(), "image/png")
    with av.open(io.BytesIO(renditions(result.animation)[GIFV])) as container:
        pictures = [frame.to_image() for frame in container.decode(video=0)]
    first, last = pictures[0].getpixel((80, 60)), pictures[-1].getpixel((80, 60))
    assert isinstance(first, tuple)
    assert isinstance(last, tuple)
    assert max(abs(a - b) for a, b in zip(first, COLOURS[0][:3], strict=True)) < 12
    assert min(last) > 240


def sticker(fmt: str) -> bytes:
    """An animation of three discs with smooth edges on a transparent canvas, as a sticker is."""
    frames = []
    for colour in COLOURS:
        large = Image.new("RGBA", (640, 480), (0, 0, 0, 0))
        ImageDraw.Draw(large).ellipse((80, 60, 560, 420), fill=colour)
        frames.append(large.resize((160, 120), Image.Resampling.LANCZOS))
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=[100, 200, 300], loop=0)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_the_animated_webp_keeps_the_frames_transparency(fmt: str) -> None:
    data = sticker(fmt)
    source = Image.open(io.BytesIO(data))
    webp = Image.open(io.BytesIO(renditions(transcode(data, f"image/{fmt.lower()}").animation)[ANIMATION]))
    assert getattr(webp, "n_frames", 1) == 3
    for index, colour in enumerate(COLOURS):
        source.seek(index)
        webp.seek(index)
        expected, made = source.convert("RGBA"), webp.convert("RGBA")
        assert ImageChops.difference(expected.getchannel("A"), made.getchannel("A")).getextrema()[1] <= 2
        assert made.getpixel((0, 0)) == (0, 0, 0, 0)
        assert_centres([made], colour)


def test_the_mp4_is_tagged_bt709_and_its_colours_come_back_in_ffmpeg(tmp_path: Path) -> None:
    # Untagged, a player picks the matrix by size (BT.601 below HD, BT.709 above), and this green
    # is more than 30 levels apart between the two.
    colours = ((0, 200, 0), (200, 30, 40), (30, 60, 220))
    frames = [Image.new("RGB", (320, 240), colour) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    result = transcode(buffer.getvalue(), "image/gif")
    mp4 = tmp_path / "gifv.mp4"
    mp4.write_bytes(renditions(result.animation)[GIFV])
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-of", "json",
         "-show_entries", "stream=color_space,color_primaries,color_transfer,color_range", str(mp4)],
        capture_output=True, check=True, text=True,
    )
    tags = json.loads(probe.stdout)["streams"][0]
    assert tags == {"color_space": "bt709", "color_primaries": "bt709", "color_transfer": "bt709", "color_range": "tv"}
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(mp4), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True
    ).stdout
    size = 320 * 240 * 3
    centre = (120 * 320 + 160) * 3
    decoded = [tuple(raw[i + centre : i + centre + 3]) for i in range(0, len(raw), size)]
    for pixel, colour in zip(decoded, colours, strict=False):
        assert max(abs(a - b) for a, b in zip(pixel, colour, strict=True)) <= 4, (pixel, colour)


def test_the_mp4_declares_the_h264_level_its_frames_need_and_lasts_as_long_as_they_do(tmp_path: Path) -> None:
    # 600x600 (the box) at most 1000/11 frames a second (a frame of 10 ms or less is shown for 100)
    # is level 3.2; the clock the frames are timed on, in milliseconds, is no frame rate of theirs.
    frames = [Image.new("RGB", (600, 600), colour[:3]) for colour in COLOURS]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=[20, 300, 1500], loop=0)
    mp4 = tmp_path / "gifv.mp4"
    mp4.write_bytes(renditions(transcode(buffer.getvalue(), "image/gif").animation)[GIFV])
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-of", "json",
         "-show_entries", "stream=profile,level,duration,nb_read_frames", str(mp4)],
        capture_output=True, check=True, text=True,
    )
    stream = json.loads(probe.stdout)["streams"][0]
    assert (stream["profile"], stream["level"], stream["nb_read_frames"]) == ("High", 32, "3")
    assert float(stream["duration"]) == pytest.approx(1.82, abs=0.002)


def centre_in_srgb(picture: Image.Image) -> tuple[int, ...]:
    """The centre pixel of a decoded picture in sRGB: converted from its embedded profile, if any."""
    rgb = picture.convert("RGB")
    icc = picture.info.get("icc_profile")
    if icc:
        rgb = ImageCms.profileToProfile(rgb, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"))
    pixel = rgb.getpixel((rgb.width // 2, rgb.height // 2))
    assert isinstance(pixel, tuple)
    return pixel


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize(
    "icc",
    [
        pytest.param(DISPLAY_P3, id="display-p3"),
        # A wide RGB profile that is not P3, which the stills convert to sRGB.
        pytest.param(Image.open(corpus("images/formats/icc_profile_big.jpg")).info["icc_profile"], id="other-rgb"),
    ],
)
def test_the_renditions_show_a_tagged_sources_colours_in_srgb_as_the_stills_do(fmt: str, icc: bytes) -> None:
    # A colour whose sRGB values lie far from its values in either profile.
    frames = [Image.new("RGB", (160, 120), colour) for colour in ((60, 160, 70), (200, 60, 50))]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, icc_profile=icc, lossless=True)
    result = transcode(buffer.getvalue(), f"image/{fmt.lower()}")
    preview = next(v for v in result.variants if v.name == "preview")
    expected = centre_in_srgb(Image.open(io.BytesIO(preview.data)))
    made = renditions(result.animation)
    webp = Image.open(io.BytesIO(made[ANIMATION]))
    assert "icc_profile" not in webp.info, "no profile: sRGB"
    with av.open(io.BytesIO(made[GIFV])) as container:
        mp4 = next(container.decode(video=0)).to_image()
    for rendition, tolerance in ((webp, 4), (mp4, 8)):
        pixel = centre_in_srgb(rendition)
        assert max(abs(a - b) for a, b in zip(pixel, expected, strict=True)) <= tolerance, (rendition.format, pixel, expected)


def test_the_renditions_of_a_linear_profile_keep_its_shadows_as_lcms_converts_them() -> None:
    # Stripes of the darkest levels, where a linear tone curve is steepest against sRGB's.
    levels = (1, 2, 3, 4, 6, 8)
    frame = Image.new("RGB", (40 * len(levels), 64))
    for index, level in enumerate(levels):
        frame.paste((level, level, level), (40 * index, 0, 40 * (index + 1), 64))
    icc = power_law_profile(SRGB_PRIMARIES, D65, 1.0, "Linear sRGB")
    mirrored = frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    frame.save(buffer, "PNG", save_all=True, append_images=[mirrored], duration=100, icc_profile=icc)
    expected = ImageCms.profileToProfile(frame, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"))
    webp = Image.open(io.BytesIO(renditions(transcode(buffer.getvalue(), "image/png").animation)[ANIMATION])).convert("RGB")
    for index in range(len(levels)):
        centre = (40 * index + 20, 32)
        pixel, shown = webp.getpixel(centre), expected.getpixel(centre)
        assert isinstance(pixel, tuple)
        assert isinstance(shown, tuple)
        assert max(abs(a - b) for a, b in zip(pixel, shown, strict=True)) <= 3, (levels[index], pixel, shown)


@pytest.mark.parametrize(
    "limits",
    [
        AnimationLimits(max_frames=2),
        AnimationLimits(max_total_pixels=161 * 121 * 3 - 1),
        AnimationLimits(max_seconds=0.5),
    ],
    ids=["frames", "pixels", "seconds"],
)
def test_past_a_limit_only_the_stills_are_made(limits: AnimationLimits) -> None:
    result = transcode(animated("GIF"), "image/gif", limits=dataclasses.replace(DEFAULT_LIMITS, animation=limits))
    check_variants(result, IMAGE_VARIANTS)
    assert result.animation is None


def many_frames(fmt: str, count: int) -> bytes:
    frames = [Image.new("RGB", (16, 16), (index % 256, index // 256 * 40, 90)) for index in range(count)]
    buffer = io.BytesIO()
    # Lossless: libwebp merges a frame into the one before when they look alike.
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=20, loop=0, lossless=True)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animation_of_more_frames_than_its_limit_keeps_its_stills_whatever_their_number(fmt: str) -> None:
    data = many_frames(fmt, 1001)
    result = transcode(data, f"image/{fmt.lower()}")
    check_variants(result, IMAGE_VARIANTS)
    assert result.animation is None
    # No other bound on frames: within a limit raised past them, all of them are animated.
    raised = dataclasses.replace(DEFAULT_LIMITS, animation=AnimationLimits(max_frames=1001))
    moving = transcode(data, f"image/{fmt.lower()}", limits=raised).animation
    assert moving is not None
    assert (moving.frames, moving.duration_ms) == (1001, 20_020)
    assert mp4_facts(renditions(moving)[GIFV])[2] == 1001


def gif_of(frames: bytes) -> bytes:
    """A 1x1 GIF of a two-colour palette holding `frames`, each an image descriptor and its data."""
    return b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff" + frames + b"\x3b"


# A 1x1 frame at (0, 0): minimum code size 2, then clear, pixel 0 and end (3 bits each) in one sub-block.
ONE_PIXEL = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x4c\x01\x00"
MAX_GIF_BYTES = 50 * 1024 * 1024


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(lambda: ONE_PIXEL * (MAX_GIF_BYTES // len(ONE_PIXEL)), id="3.5-million-frames"),
        # The first frame's data goes on past the LZW end code in 1-byte sub-blocks, which decoders skip.
        pytest.param(lambda: ONE_PIXEL[:-1] + b"\x01\x00" * (MAX_GIF_BYTES // 2) + b"\x00" + ONE_PIXEL, id="1-byte-sub-blocks"),
    ],
)
def test_a_gif_is_never_walked_further_than_its_animation_could_go(frames: Callable[[], bytes]) -> None:
    # Pillow walks the whole file to count the frames, a read call per sub-block: 15 s each time.
    data = gif_of(frames())
    started = time.perf_counter()
    result = transcode(data, "image/gif")
    assert time.perf_counter() - started < 5
    assert (result.width, result.height, result.animation) == (1, 1, None)


def test_a_gifs_comment_before_its_first_image_costs_no_time_and_is_ignored() -> None:
    # 8 MB of comment in full sub-blocks: Pillow's open copied all it had gathered at each one.
    comment = b"\x21\xfe" + (b"\xff" + b"c" * 255) * 32_000 + b"\x00"
    data = animated("GIF", durations=(100, 200))
    screen_end = 13 + (3 << ((data[10] & 7) + 1))
    started = time.perf_counter()
    result = transcode(data[:screen_end] + comment + data[screen_end:], "image/gif")
    assert time.perf_counter() - started < 5
    assert result.animation is not None
    assert (result.width, result.height, result.animation.frames, result.animation.duration_ms) == (161, 121, 2, 300)


def test_a_gif_of_more_blocks_before_its_first_image_than_any_encoder_writes_is_refused_at_once() -> None:
    # 25 million 1-byte sub-blocks of an application extension, which Pillow's open read one by one.
    extension = b"\x21\xff\x0bMEDIAVAULT1" + b"\x01x" * (MAX_GIF_BYTES // 2) + b"\x00"
    data = gif_of(extension + ONE_PIXEL)
    started = time.perf_counter()
    with pytest.raises(PermanentImagingError, match="image too large"):
        transcode(data, "image/gif")
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("relative", ["images/formats/hopper.gif", "images/formats/hopper.webp", "images/formats/hopper.png"])
def test_still_images_are_not_animated(relative: str) -> None:
    assert transcoded(relative).animation is None


@pytest.mark.parametrize(("fmt", "mime"), [("WEBP", "image/webp"), ("PNG", "image/png")])
def test_the_renditions_are_turned_upright_by_the_exif_orientation_as_the_stills_are(fmt: str, mime: str) -> None:
    # Stored 200 wide and 400 tall, red above blue; orientation 6 shows it turned a quarter
    # clockwise: 400 wide, red on the right.
    frame = Image.new("RGB", (200, 400), (220, 30, 40))
    frame.paste((40, 60, 210), (0, 200, 200, 400))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    # A second frame that differs (identical ones are merged), red above blue as well.
    second = frame.copy()
    second.paste((230, 40, 50), (0, 0, 200, 200))
    frame.save(buffer, fmt, save_all=True, append_images=[second], duration=100, loop=0, exif=exif, lossless=True)
    result = transcode(buffer.getvalue(), mime)
    assert (result.width, result.height) == (400, 200)
    made = renditions(result.animation)
    webp = Image.open(io.BytesIO(made[ANIMATION])).convert("RGB")
    with av.open(io.BytesIO(made[GIFV])) as container:
        mp4 = next(container.decode(video=0)).to_image()
    for picture in (webp, mp4):
        assert picture.size == (400, 200)
        right, left = picture.getpixel((350, 100)), picture.getpixel((50, 100))
        assert isinstance(right, tuple)
        assert isinstance(left, tuple)
        assert right[0] > 150 > right[2], right
        assert left[2] > 150 > left[0], left


def test_a_scratch_space_fault_while_animating_is_tried_again_not_a_corrupt_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", full)
    with pytest.raises(ImagingError) as caught:
        transcode(animated("GIF"), "image/gif")
    assert not isinstance(caught.value, PermanentImagingError)


@pytest.mark.parametrize("size", [(1, 40), (40, 1), (1, 1)], ids=["1-wide", "1-high", "1x1"])
def test_a_one_pixel_side_is_doubled_in_the_mp4_with_its_own_pixels(size: tuple[int, int]) -> None:
    # 4:2:0 needs even sides: there is nothing to crop, and black filled the side added.
    made = renditions(transcode(animated("PNG", size=size), "image/png").animation)
    with av.open(io.BytesIO(made[GIFV])) as container:
        pictures = [frame.to_image() for frame in container.decode(video=0)]
    assert [picture.size for picture in pictures] == [(max(2, size[0]), max(2, size[1]))] * 3
    for picture, colour in zip(pictures, COLOURS, strict=True):
        for x in range(picture.width):
            for y in range(picture.height):
                pixel = picture.getpixel((x, y))
                assert isinstance(pixel, tuple)
                assert max(abs(a - b) for a, b in zip(pixel, colour[:3], strict=True)) < 16, (x, y, pixel, colour)


def test_a_large_animation_is_scaled_into_its_box() -> None:
    result = transcode(animated("GIF", size=(1300, 700), durations=(100, 100)), "image/gif")
    made = renditions(result.animation)
    assert Image.open(io.BytesIO(made[ANIMATION])).size == (600, 323)
    assert mp4_facts(made[GIFV])[1] == (600, 322)


def test_a_corrupt_later_frame_refuses_the_upload() -> None:
    data = animated("GIF", durations=(100, 100, 100))
    damaged = data[: len(data) - 40]
    assert stock_pillow_refuses_a_frame(damaged)
    with pytest.raises(PermanentImagingError, match="corrupt image"):
        transcode(damaged, "image/gif")


def stock_pillow_refuses_a_frame(data: bytes) -> bool:
    image = Image.open(io.BytesIO(data))
    try:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            image.load()
    except (OSError, EOFError, ValueError, SyntaxError):
        return True
    return False


def test_a_sixteen_bit_grey_animation_keeps_its_tones_as_its_stills_do() -> None:
    frames = []
    for step in range(2):
        frame = Image.new("I;16", (64, 48))
        frame.putdata([(x * 4 + step) * 257 for _ in range(48) for x in range(64)])
        frames.append(frame)
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=100)
    made = renditions(transcode(buffer.getvalue(), "image/png").animation)
    webp = Image.open(io.BytesIO(made[ANIMATION])).convert("L")
    with av.open(io.BytesIO(made[GIFV])) as container:
        mp4 = next(container.decode(video=0)).to_image().convert("L")
    for picture in (webp, mp4):
        # Column 32 is level 128 * 257: 128 in 8 bits, not clipped to 255.
        assert abs(picture.getpixel((32, 20)) - 128) <= 8, picture.getpixel((32, 20))


def test_the_renditions_differ_from_frame_to_frame() -> None:
    made = renditions(transcode(animated("WEBP"), "image/webp").animation)
    webp = Image.open(io.BytesIO(made[ANIMATION]))
    first = webp.convert("RGB")
    webp.seek(1)
    second = webp.convert("RGB")
    assert max(ImageStat.Stat(ImageChops.difference(first, second)).mean) > 50


# A GIF frame's box (left, top, width, height), its colour indices row by row, its transparent
# index (or None) and its disposal method.
GifFrame = tuple[tuple[int, int, int, int], list[int], int | None, int]


def drawn_gif(screen: tuple[int, int], frames: list[GifFrame]) -> bytes:
    """A GIF of a four-colour palette, COLOURS and black, whose background colour is 0 (red) and whose
    frames each show for 100 ms."""
    palette = b"".join(bytes(colour[:3]) for colour in COLOURS) + bytes(3)
    data = b"GIF89a" + struct.pack("<HH", *screen) + b"\x81\x00\x00" + palette
    for (left, top, width, height), indices, transparent, disposal in frames:
        # Minimum code size 2: clear is 4, end 5. A clear before every other pixel keeps the
        # code table from growing, so every code stays 3 bits wide.
        codes = [code for i in range(0, len(indices), 2) for code in (4, *indices[i : i + 2])] + [5]
        lzw = sum(code << (3 * i) for i, code in enumerate(codes)).to_bytes((3 * len(codes) + 7) // 8, "little")
        blocks = b"".join(bytes([len(lzw[i : i + 255])]) + lzw[i : i + 255] for i in range(0, len(lzw), 255))
        flags = disposal << 2 | (transparent is not None)
        control = b"\x21\xf9\x04" + bytes([flags]) + struct.pack("<H", 10) + bytes([transparent or 0]) + b"\x00"
        data += control + b"\x2c" + struct.pack("<HHHH", left, top, width, height) + b"\x00\x02" + blocks + b"\x00"
    return data + b"\x3b"


def gif_with_frames(screen: tuple[int, int], frames: list[tuple[int, int, int, int]]) -> bytes:
    """A GIF whose frames, each (left, top, width, height) on the logical screen, are all of colour 0."""
    return drawn_gif(screen, [(box, [0] * (box[2] * box[3]), None, 0) for box in frames])


RED, GREEN, BLUE, CLEAR = 0, 1, 2, 3


def test_the_animated_webp_of_opaque_shapes_on_a_clear_screen_says_it_has_transparency() -> None:
    # libwebp keeps the first frame's opaque square alone, and set the alpha flag only for frames with alpha.
    square = ([RED] * 16 + [CLEAR] * 16) * 16 + [CLEAR] * 512
    data = drawn_gif((32, 32), [((0, 0, 32, 32), square, CLEAR, 1), ((16, 16, 16, 16), [BLUE] * 256, None, 1)])
    webp = Image.open(io.BytesIO(renditions(transcode(data, "image/gif").animation)[ANIMATION]))
    for index, corners in enumerate([(RED, CLEAR, CLEAR), (RED, CLEAR, BLUE)]):
        webp.seek(index)
        alpha = webp.convert("RGBA").getchannel("A")
        alphas = [alpha.getpixel(point) for point in ((8, 8), (24, 8), (24, 24))]
        assert alphas == [0 if colour == CLEAR else 255 for colour in corners], (index, alphas)


def test_a_gif_frame_disposed_of_to_the_background_leaves_its_area_clear_as_browsers_do() -> None:
    # Pillow paints a frame it disposes of in the background colour unless that frame has a
    # transparent colour, and goes on disposing of the next frames so if they say nothing.
    data = drawn_gif((32, 32), [
        # Clear on the left, blue on the right; left in place (1).
        ((0, 0, 32, 32), ([CLEAR] * 16 + [BLUE] * 16) * 32, CLEAR, 1),
        # Green at the top, cleared after (2).
        ((0, 0, 32, 16), [GREEN] * 512, None, 2),
        # Blue at the bottom, with no disposal method (0): left in place.
        ((0, 16, 32, 16), [BLUE] * 512, None, 0),
        ((0, 0, 32, 16), [GREEN] * 512, None, 0),
        # Green at the bottom, then what was there put back (3).
        ((0, 16, 32, 16), [GREEN] * 512, None, 3),
        ((0, 0, 32, 16), [RED] * 512, None, 0),
    ])
    # Each frame's quarters as browsers show them: top left, top right, bottom left, bottom right.
    shown = [
        (CLEAR, BLUE, CLEAR, BLUE),
        (GREEN, GREEN, CLEAR, BLUE),
        (CLEAR, CLEAR, BLUE, BLUE),
        (GREEN, GREEN, BLUE, BLUE),
        (GREEN, GREEN, GREEN, GREEN),
        (RED, RED, BLUE, BLUE),
    ]
    made = renditions(transcode(data, "image/gif").animation)
    webp = Image.open(io.BytesIO(made[ANIMATION]))
    with av.open(io.BytesIO(made[GIFV])) as container:
        mp4 = [frame.to_image() for frame in container.decode(video=0)]
    assert (getattr(webp, "n_frames", 1), len(mp4)) == (len(shown), len(shown))
    for index, quarters in enumerate(shown):
        webp.seek(index)
        frame = webp.convert("RGBA")
        for (x, y), colour in zip(((8, 8), (24, 8), (8, 24), (24, 24)), quarters, strict=True):
            pixel, flat = frame.getpixel((x, y)), mp4[index].getpixel((x, y))
            assert isinstance(pixel, tuple)
            assert isinstance(flat, tuple)
            if colour == CLEAR:
                assert pixel[3] == 0, (index, x, y, pixel)
                assert min(flat) > 240, (index, x, y, flat)
            else:
                assert pixel[3] == 255, (index, x, y, pixel)
                for got in (pixel[:3], flat):
                    assert max(abs(a - b) for a, b in zip(got, COLOURS[colour][:3], strict=True)) < 12, (index, x, y, got)


@pytest.mark.parametrize("frames", [1, 2])
def test_a_gifs_stills_leave_the_screen_its_first_frame_does_not_cover_clear_as_browsers_and_its_animation_do(
    frames: int,
) -> None:
    # A blue square in the top left of the screen, with no transparent colour: Pillow showed the
    # rest of the screen in colour 0 (red).
    data = drawn_gif((32, 32), [((0, 0, 16, 16), [BLUE] * 256, None, 1), ((16, 16, 16, 16), [GREEN] * 256, None, 1)][:frames])
    result = transcode(data, "image/gif")
    stills = check_variants(result, IMAGE_VARIANTS)
    pictures = [picture.convert("RGBA") for picture in stills.values()]
    if frames > 1:
        pictures.append(Image.open(io.BytesIO(renditions(result.animation)[ANIMATION])).convert("RGBA"))
    for picture in pictures:
        side = picture.width
        assert picture.getpixel((side // 4, side // 4))[3] == 255
        assert max(abs(a - b) for a, b in zip(picture.getpixel((side // 4, side // 4))[:3], COLOURS[BLUE][:3], strict=True)) < 12
        for point in ((side * 3 // 4, side // 4), (side // 4, side * 3 // 4), (side * 3 // 4, side * 3 // 4)):
            assert picture.getpixel(point)[3] == 0, (picture.size, point, picture.getpixel(point))


def gif_growing_to(corner: int) -> bytes:
    """A 100x100 GIF whose second frame, at (corner, corner), grows Pillow's canvas past the screen."""
    data = gif_with_frames((100, 100), [(0, 0, 10, 10), (corner, corner, 1, 1)])
    opened = Image.open(io.BytesIO(data))
    assert (opened.size, getattr(opened, "n_frames", 1)) == ((100, 100), 2)
    opened.seek(1)
    assert opened.size == (corner + 1, corner + 1)
    return data


@pytest.mark.parametrize(
    ("corner", "limits"),
    [
        # Pillow grows its canvas to 150x150: within every limit, but not the screen the header declares.
        (149, DEFAULT_LIMITS),
        # To 1100x1100, 1.21 times max_pixels, where Pillow only warns; no canvas is grown.
        (1099, Limits(max_pixels=1_000_000)),
    ],
    ids=["within-max-pixels", "past-max-pixels"],
)
def test_a_gif_frame_placed_past_its_screen_is_clipped_away_and_the_gif_animated(corner: int, limits: Limits) -> None:
    result = transcode(gif_growing_to(corner), "image/gif", limits=limits)
    assert (result.width, result.height) == (100, 100)
    assert all(picture.size[0] <= 100 for picture in check_variants(result, IMAGE_VARIANTS).values())
    assert result.animation is not None
    assert (result.animation.frames, result.animation.duration_ms) == (2, 200)
    webp = Image.open(io.BytesIO(renditions(result.animation)[ANIMATION]))
    assert webp.size == (100, 100)
    for index in range(getattr(webp, "n_frames", 1)):
        webp.seek(index)
        frame = webp.convert("RGBA")
        assert (frame.getpixel((5, 5))[3], frame.getpixel((99, 99))[3]) == (255, 0)


@pytest.mark.parametrize(
    ("declared", "size"),
    [
        # Only the second frame goes past the screen, by 8 pixels each way.
        ((32, 32), (32, 32)),
        # The first frame is taller than the screen declared, which grows to cover it, as Pillow's
        # stills and Chromium grow it.
        ((32, 16), (32, 32)),
    ],
    ids=["later-frame", "first-frame"],
)
def test_a_gif_frame_partly_off_its_screen_is_clipped_as_browsers_clip_it(declared: tuple[int, int], size: tuple[int, int]) -> None:
    data = drawn_gif(declared, [((0, 0, 32, 32), [BLUE] * 1024, None, 1), ((24, 24, 16, 16), [GREEN] * 256, None, 1)])
    result = transcode(data, "image/gif")
    assert (result.width, result.height) == size
    assert_centres(list(check_variants(result, IMAGE_VARIANTS).values()), COLOURS[BLUE])
    made = renditions(result.animation)
    webp = Image.open(io.BytesIO(made[ANIMATION]))
    with av.open(io.BytesIO(made[GIFV])) as container:
        mp4 = [frame.to_image() for frame in container.decode(video=0)]
    assert (webp.size, getattr(webp, "n_frames", 1), len(mp4)) == (size, 2, 2)
    for index, corner in enumerate((BLUE, GREEN)):
        webp.seek(index)
        for picture in (webp.convert("RGB"), mp4[index]):
            for point, colour in (((16, 16), BLUE), ((28, 28), corner)):
                pixel = picture.getpixel(point)
                assert isinstance(pixel, tuple)
                assert max(abs(a - b) for a, b in zip(pixel, COLOURS[colour][:3], strict=True)) < 16, (index, point, pixel)


def test_each_frame_of_a_gif_is_decoded_once_for_its_stills_and_its_animation(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first frame was decoded four times: by Pillow for the stills and again for the animation,
    # neither used, and as the stills and the animation each draw it.
    sizes: list[tuple[int, int]] = []
    load_prepare = GifImagePlugin.GifImageFile.load_prepare

    def counted(image: GifImagePlugin.GifImageFile) -> None:
        sizes.append(image.size)
        load_prepare(image)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "load_prepare", counted)
    data = drawn_gif((32, 32), [((0, 0, 32, 32), [BLUE] * 1024, None, 1), ((8, 8, 16, 16), [GREEN] * 256, None, 1)])
    result = transcode(data, "image/gif")
    assert result.animation is not None
    assert result.animation.frames == 2
    assert sorted(sizes) == [(16, 16), (32, 32)]
    assert_centres(list(check_variants(result, IMAGE_VARIANTS).values()), COLOURS[BLUE])


def test_a_gif_whose_frames_own_pictures_are_over_the_pixel_limit_keeps_its_stills_only() -> None:
    # Each frame's picture is decoded whole, off the screen as well: the second's 48x48 count.
    data = drawn_gif((16, 16), [((0, 0, 16, 16), [BLUE] * 256, None, 1), ((8, 8, 48, 48), [GREEN] * 2304, None, 1)])
    limits = dataclasses.replace(DEFAULT_LIMITS, animation=AnimationLimits(max_total_pixels=2 * 48 * 48))
    assert transcode(data, "image/gif", limits=limits).animation is not None
    limits = dataclasses.replace(DEFAULT_LIMITS, animation=AnimationLimits(max_total_pixels=48 * 48 + 16 * 16 - 1))
    result = transcode(data, "image/gif", limits=limits)
    check_variants(result, IMAGE_VARIANTS)
    assert result.animation is None


def assert_red_still(result: TranscodeResult) -> None:
    assert result.animation is None
    assert (result.width, result.height) == (64, 64)
    for name, picture in check_variants(result, IMAGE_VARIANTS).items():
        centre = picture.convert("RGB").getpixel((picture.width // 2, picture.height // 2))
        assert isinstance(centre, tuple)
        assert max(abs(a - b) for a, b in zip(centre, (200, 30, 30), strict=True)) < 12, name


def test_an_mpo_is_the_still_of_its_first_picture() -> None:
    # Phone photos with an Ultra HDR gain map are MPOs of two pictures; the second is never shown.
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(
        buffer, "MPO", save_all=True, append_images=[Image.new("L", (3000, 3000), 128)]
    )
    data = buffer.getvalue()
    opened = Image.open(io.BytesIO(data), formats=["JPEG"])
    assert (opened.format, getattr(opened, "n_frames", 1)) == ("MPO", 2)
    assert_red_still(transcode(data, "image/jpeg"))


@pytest.mark.parametrize("primary", [0, 1])
def test_a_heif_is_the_still_of_its_primary_image(primary: int) -> None:
    # The other top-level image is over max_pixels: decoding it would be refused.
    red, blue = Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (1200, 1200), (30, 60, 210))
    first, other = (red, blue) if primary == 0 else (blue, red)
    buffer = io.BytesIO()
    first.save(buffer, "HEIF", save_all=True, append_images=[other], primary_index=primary, quality=90)
    data = buffer.getvalue()
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert_red_still(transcode(data, "image/heic", limits=Limits(max_pixels=1_000_000)))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def apng_with_default_image(default: tuple[int, int, int], frames: list[tuple[tuple[int, int, int], int]]) -> bytes:
    """A 160x120 RGB APNG whose IDAT, of colour `default`, is not part of its animation: the frames,
    each (colour, milliseconds), are all fdAT chunks."""
    width, height = 160, 120

    def pixels(colour: tuple[int, int, int]) -> bytes:
        return zlib.compress((b"\x00" + bytes(colour) * width) * height)

    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    data += png_chunk(b"acTL", struct.pack(">II", len(frames), 0)) + png_chunk(b"IDAT", pixels(default))
    sequence = 0
    for colour, milliseconds in frames:
        control = struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, milliseconds, 1000, 0, 0)
        data += png_chunk(b"fcTL", control) + png_chunk(b"fdAT", struct.pack(">I", sequence + 1) + pixels(colour))
        sequence += 2
    return data + png_chunk(b"IEND", b"")


def assert_centres(pictures: list[Image.Image], colour: tuple[int, ...]) -> None:
    for picture in pictures:
        centre = picture.convert("RGB").getpixel((picture.width // 2, picture.height // 2))
        assert isinstance(centre, tuple)
        assert max(abs(a - b) for a, b in zip(centre, colour[:3], strict=True)) < 12, (centre, colour)


def test_an_apngs_default_image_left_out_of_its_animation_is_neither_a_frame_nor_the_still() -> None:
    # Browsers never show such an IDAT: it is the picture for decoders that do not animate.
    grey = (128, 128, 128)
    data = apng_with_default_image(grey, [(COLOURS[0][:3], 100), (COLOURS[1][:3], 200), (COLOURS[2][:3], 300)])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 4
    result = transcode(data, "image/png")
    stills = check_variants(result, IMAGE_VARIANTS)
    alternates = [open_variant(a.data) for v in result.variants for a in v.alternates]
    assert_centres([*stills.values(), *alternates], COLOURS[0])
    assert result.animation is not None
    assert (result.animation.frames, result.animation.duration_ms) == (3, 600)
    made = renditions(result.animation)
    assert webp_frame_durations(made[ANIMATION]) == [100, 200, 300]
    webp = Image.open(io.BytesIO(made[ANIMATION]))
    assert_centres([webp], COLOURS[0])
    with av.open(io.BytesIO(made[GIFV])) as container:
        assert_centres([next(container.decode(video=0)).to_image()], COLOURS[0])
    assert mp4_facts(made[GIFV])[3] == pytest.approx(0.6, abs=0.03)


def test_an_apng_of_one_frame_besides_its_default_image_is_a_still_of_that_frame() -> None:
    result = transcode(apng_with_default_image((128, 128, 128), [(COLOURS[1][:3], 100)]), "image/png")
    assert result.animation is None
    assert_centres(list(check_variants(result, IMAGE_VARIANTS).values()), COLOURS[1])


Sixteen = tuple[int, int, int]


def sixteen_bit_apng(transparent: Sixteen, frames: list[tuple[Sixteen, Sixteen]], default: Sixteen | None = None) -> bytes:
    """A 32x32 16-bit RGB APNG whose tRNS names `transparent`, of `frames` each given as the colours
    of its left and right halves (16-bit samples), each drawn over the whole canvas in turn: the
    first in the IDAT, or with a `default` image there, left out of the animation, all in fdATs."""
    width = height = 32

    def pixels(left: Sixteen, right: Sixteen) -> bytes:
        return zlib.compress((b"\x00" + struct.pack(">3H", *left) * (width // 2) + struct.pack(">3H", *right) * (width // 2)) * height)

    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
    data += png_chunk(b"acTL", struct.pack(">II", len(frames), 0)) + png_chunk(b"tRNS", struct.pack(">3H", *transparent))
    if default is not None:
        data += png_chunk(b"IDAT", pixels(default, default))
    sequence = 0
    for index, halves in enumerate(frames):
        data += png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, 100, 1000, 0, 0))
        sequence += 1
        if index == 0 and default is None:
            data += png_chunk(b"IDAT", pixels(*halves))
        else:
            data += png_chunk(b"fdAT", struct.pack(">I", sequence) + pixels(*halves))
            sequence += 1
    return data + png_chunk(b"IEND", b"")


TRANSPARENT_16, BESIDE_16, RED_16 = (0x1234, 0x5678, 0x9ABC), (0x1234, 0x5678, 0x9ABD), (0xDC00, 0x1E00, 0x2800)


@pytest.mark.parametrize("default", [None, BESIDE_16], ids=["first-frame-in-idat", "default-image-left-out"])
def test_a_sixteen_bit_apngs_transparent_colour_is_transparent_in_its_animation_as_in_its_stills(default: Sixteen | None) -> None:
    # Matched on all 16 bits: the colour beside it, of the same top bytes, stays opaque.
    transparent, beside, red = TRANSPARENT_16, BESIDE_16, RED_16
    data = sixteen_bit_apng(transparent, [(transparent, beside), (red, transparent), (beside, red)], default)
    result = transcode(data, "image/png")
    display = check_variants(result, IMAGE_VARIANTS)["display"].convert("RGBA").getchannel("A")
    assert (display.getpixel((8, 16)), display.getpixel((24, 16))) == (0, 255)
    made = renditions(result.animation)
    webp = Image.open(io.BytesIO(made[ANIMATION]))
    with av.open(io.BytesIO(made[GIFV])) as container:
        mp4 = [frame.to_image() for frame in container.decode(video=0)]
    assert (getattr(webp, "n_frames", 1), len(mp4)) == (3, 3)
    for index, halves in enumerate([(transparent, beside), (red, transparent), (beside, red)]):
        webp.seek(index)
        frame = webp.convert("RGBA")
        for x, colour in zip((8, 24), halves, strict=True):
            pixel, flat = frame.getpixel((x, 16)), mp4[index].getpixel((x, 16))
            assert isinstance(pixel, tuple)
            assert isinstance(flat, tuple)
            if colour == transparent:
                assert (pixel[3], min(flat) > 240) == (0, True), (index, x, pixel, flat)
            else:
                expected = tuple(sample >> 8 for sample in colour)
                assert pixel[3] == 255, (index, x, pixel)
                for got in (pixel[:3], flat):
                    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 12, (index, x, got, expected)


# An APNG frame: its box (left, top, width, height), its rows of pixels, its dispose_op and blend_op.
ApngFrame = tuple[tuple[int, int, int, int], list[bytes], int, int]
NONE, BACKGROUND = 0, 1
SOURCE, OVER = 0, 1


def drawn_apng(
    size: tuple[int, int], bit_depth: int, colour_type: int, frames: list[ApngFrame], before_pixels: bytes = b"",
    default: list[bytes] | None = None,
) -> bytes:
    """An APNG of unfiltered rows whose frames each show for 100 ms: the first in the IDAT, or with a
    `default` image there, left out of the animation, all in fdATs."""
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", *size, bit_depth, colour_type, 0, 0, 0))
    data += png_chunk(b"acTL", struct.pack(">II", len(frames), 0)) + before_pixels
    if default is not None:
        data += png_chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row for row in default)))
    sequence = 0
    for index, ((left, top, width, height), rows, dispose_op, blend_op) in enumerate(frames):
        control = struct.pack(">IIIIIHHBB", sequence, width, height, left, top, 100, 1000, dispose_op, blend_op)
        data += png_chunk(b"fcTL", control)
        sequence += 1
        pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
        if index == 0 and default is None:
            data += png_chunk(b"IDAT", pixels)
        else:
            data += png_chunk(b"fdAT", struct.pack(">I", sequence) + pixels)
            sequence += 1
    return data + png_chunk(b"IEND", b"")


def webp_frame(result: TranscodeResult, index: int) -> Image.Image:
    webp = Image.open(io.BytesIO(renditions(result.animation)[ANIMATION]))
    webp.seek(index)
    return webp.convert("RGBA")


def assert_pixel(picture: Image.Image, xy: tuple[int, int], expected: tuple[int, int, int, int]) -> None:
    """The pixel is `expected`, its colour as near as a lossy encoder keeps it, where it is not transparent."""
    pixel = picture.getpixel(xy)
    assert isinstance(pixel, tuple)
    assert abs(pixel[3] - expected[3]) < 8, (xy, pixel, expected)
    if expected[3]:
        assert max(abs(a - b) for a, b in zip(pixel[:3], expected[:3], strict=True)) < 12, (xy, pixel, expected)


GREY_APNG, RGB_APNG, PALETTE_APNG = 0, 2, 3


@pytest.mark.parametrize(
    ("bit_depth", "colour_type", "before_pixels", "first", "second"),
    [
        (8, RGB_APNG, b"", bytes(COLOURS[0][:3]), bytes(COLOURS[1][:3])),
        # Palette colour 0 is not the background: browsers clear to transparent black all the same.
        (8, PALETTE_APNG, png_chunk(b"PLTE", bytes(COLOURS[0][:3]) + bytes(COLOURS[1][:3])), b"\x00", b"\x01"),
    ],
    ids=["rgb", "palette"],
)
def test_an_apng_frame_disposed_of_to_the_background_leaves_its_area_clear_as_browsers_do(
    bit_depth: int, colour_type: int, before_pixels: bytes, first: bytes, second: bytes,
) -> None:
    data = drawn_apng(
        (16, 16), bit_depth, colour_type,
        [((0, 0, 16, 16), [first * 16] * 16, BACKGROUND, SOURCE), ((0, 0, 8, 8), [second * 8] * 8, NONE, OVER)],
        before_pixels,
    )
    second_frame = webp_frame(transcode(data, "image/png"), 1)
    assert_pixel(second_frame, (4, 4), COLOURS[1])
    assert_pixel(second_frame, (12, 12), (0, 0, 0, 0))


def test_a_grey_apngs_transparent_level_is_transparent_where_a_frame_is_drawn_over_another() -> None:
    # tRNS names level 200: the half of a frame of it drawn over level 50 leaves the 50 showing.
    data = drawn_apng(
        (16, 16), 8, GREY_APNG,
        [
            ((0, 0, 16, 16), [bytes([50]) * 16] * 16, NONE, SOURCE),
            ((0, 0, 16, 8), [bytes([200]) * 8 + bytes([100]) * 8] * 8, NONE, OVER),
        ],
        png_chunk(b"tRNS", struct.pack(">H", 200)),
    )
    second_frame = webp_frame(transcode(data, "image/png"), 1)
    assert_pixel(second_frame, (4, 4), (50, 50, 50, 255))
    assert_pixel(second_frame, (12, 4), (100, 100, 100, 255))


def test_a_sixteen_bit_apngs_transparent_colour_shows_the_frame_below_where_a_frame_is_drawn_over_it() -> None:
    red, transparent, beside = (struct.pack(">3H", *colour) for colour in (RED_16, TRANSPARENT_16, BESIDE_16))
    data = drawn_apng(
        (32, 32), 16, RGB_APNG,
        [((0, 0, 32, 32), [red * 32] * 32, NONE, SOURCE), ((0, 0, 32, 32), [transparent * 16 + beside * 16] * 32, NONE, OVER)],
        png_chunk(b"tRNS", transparent),
    )
    second_frame = webp_frame(transcode(data, "image/png"), 1)
    assert_pixel(second_frame, (8, 16), (*(sample >> 8 for sample in RED_16), 255))
    assert_pixel(second_frame, (24, 16), (*(sample >> 8 for sample in BESIDE_16), 255))


def test_an_apngs_first_frame_after_a_default_image_left_out_is_drawn_on_a_clear_canvas_in_its_stills_and_animation() -> None:
    grey = bytes([128, 128, 128])
    data = drawn_apng(
        (16, 16), 8, RGB_APNG,
        [((0, 0, 8, 8), [bytes(COLOURS[0][:3]) * 8] * 8, NONE, OVER), ((8, 8, 8, 8), [bytes(COLOURS[1][:3]) * 8] * 8, NONE, OVER)],
        default=[grey * 16] * 16,
    )
    result = transcode(data, "image/png")
    display = check_variants(result, IMAGE_VARIANTS)["display"].convert("RGBA")
    scale = display.width / 16
    for picture, at in ((display, scale), (webp_frame(result, 0), 1.0)):
        assert_pixel(picture, (round(4 * at), round(4 * at)), COLOURS[0])
        assert_pixel(picture, (round(12 * at), round(12 * at)), (0, 0, 0, 0))
    second_frame = webp_frame(result, 1)
    assert_pixel(second_frame, (4, 4), COLOURS[0])
    assert_pixel(second_frame, (12, 12), COLOURS[1])
    assert_pixel(second_frame, (12, 4), (0, 0, 0, 0))


@pytest.mark.parametrize("damage", ["cut-short", "out-of-sequence"])
def test_an_apng_that_stock_pillow_refuses_is_refused(damage: str) -> None:
    frames: list[ApngFrame] = [((0, 0, 16, 16), [bytes(colour[:3]) * 16] * 16, NONE, SOURCE) for colour in COLOURS]
    data = drawn_apng((16, 16), 8, RGB_APNG, frames)
    # The last fdAT's sequence number, 4, made 5.
    damaged = data[:-40] if damage == "cut-short" else data.replace(struct.pack(">I", 4) + b"x", struct.pack(">I", 5) + b"x")
    assert damaged != data
    assert stock_pillow_refuses_a_frame(damaged)
    with pytest.raises(PermanentImagingError, match="corrupt image"):
        transcode(damaged, "image/png")
