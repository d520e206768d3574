"""Animated GIF, WebP, PNG and AVIF kept moving: an animated WebP and an H.264 MP4 ("gifv").

The still variants still come from the first frame (strategies); these two come from
every frame (an APNG's default image is neither when the animation leaves it out: see
decode.first_frame), decoded one at a time by Pillow (a GIF's and an APNG's drawn one over the
other as browsers draw them: see canvas, gif and decode.apng_shown) and fed to both encoders
(FFmpeg's libwebp animation encoder and libx264, through PyAV) as it goes, so that memory holds
one frame whatever the length. An animation over any of `AnimationLimits` keeps its stills only: the upload is still good, it is
just not worth animating at that size.

Frame timing is kept in milliseconds: each frame is shown for the duration its source
gives (browsers show a frame of 10 ms or less for 100 ms, whatever its format, and so do
we). The WebP plays as many times as browsers play the source; the MP4 holds no such count,
and plays once, or for ever as a `<video loop>`. The WebP keeps the frames' alpha; the MP4 has
none, so transparent pixels are composited over white; its sides are rounded down to even
numbers, as 4:2:0 needs (a side of 1 doubled).

Both are sRGB: the WebP carries no profile, which browsers take for sRGB, and the MP4 is
tagged BT.709 (primaries, transfer, matrix, limited range) as the video renditions are,
its frames converted to YUV with that matrix: untagged, a player guesses the matrix from
the size (BT.601 below HD, BT.709 above), and swscale's default is BT.601, so the colours
of a large gifv shifted. So a source with an ICC profile has its frames converted to sRGB
as the stills are (decode.srgb_conversion), and a Display P3 one as well, although its
stills keep P3 (colour.py): P3 colours outside sRGB are clipped here. A PNG whose gAMA gives
another tone curve has its levels taken to sRGB's first, as the stills do (decode.tones).

Only those formats animate. The further pictures of a JPEG (MPO: the gain map of an Ultra
HDR photo, the other half of a stereo pair) and the further top-level images of a HEIF
are not frames of one animation, and Pillow lists them as frames all the same: such a
file is a still of its first (HEIF: primary) picture, and the others are never decoded.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

from mediavault.imaging import gif, isobmff
from mediavault.imaging.decode import (
    TRANSPOSE_FOR_ORIENTATION,
    apng_shown,
    exif_orientation,
    first_frame,
    first_gif_picture,
    icc_profile,
    in_srgb_tones,
    srgb_conversion,
    tones,
    upright,
)
from mediavault.imaging.spec import AnimationLimits, fit
from mediavault.imaging.variants import Variant

ANIMATION = "animation"
GIFV = "gifv"
_ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP", "AVIF"})
_MILLISECONDS = Fraction(1, 1000)
# Chromium and Firefox show a frame of any format that lasts this long or less (a GIF's 0 or
# 1 centisecond) for _DEFAULT_FRAME_MS; a 60 fps WebP's or APNG's 16 or 17 ms they show as they are.
_NO_DURATION_MS = 10
_DEFAULT_FRAME_MS = 100
# The streams' frame rate, from which x264 works out the H.264 level the MP4 declares: the
# most the frames reach, a frame every 11 ms. At the 1000 fps of their millisecond clock, a
# 600x600 gifv declared level 5.2, past what many phones decode; at this rate it is 3.2.
_HIGHEST_FRAME_RATE = Fraction(1000, _NO_DURATION_MS + 1)
_WEBP_QUALITY = "75"
# FFmpeg's bgra: libwebp takes the frames as RGBA and makes their YUV itself, weighting each
# pixel's colour by its alpha, so that a transparent pixel's colour (black, often) does not darken
# the edges beside it as it does in swscale's YUV; and its animation encoder turns YUV frames back
# into RGBA anyway, a loss of its own.
_WEBP_PIXELS = "bgra"
# The most plays the WebP's ANIM chunk holds, in 16 bits, short of 0, which plays it for ever.
_MOST_WEBP_PLAYS = 0xFFFF
# The VP8X chunk's flag saying that the canvas has transparency.
_WEBP_ALPHA_FLAG = 0x10
# ITU-T H.273's code for BT.709, the same for primaries, transfer and matrix.
_BT709 = 1
# No B-frames: with them, x264's reordering delay shifts the decode times below zero, and
# the MP4's duration comes out shorter than the frames' own.
_X264_OPTIONS: dict[str, object] = {"crf": "23", "preset": "veryfast", "profile": "high", "bf": "0"}


@dataclass(frozen=True)
class Animation:
    """The moving renditions of an animated image, how long one loop lasts, and how many times it
    plays through (0: for ever), as browsers play the source and the animated WebP says."""

    duration_ms: int
    frames: int
    plays: int
    variants: list[Variant]


def is_animated(image: Image.Image, data: bytes) -> bool:
    """Whether the opened image, of these bytes, is an animation of more than one frame."""
    return image.format in _ANIMATED_FORMATS and _frames(image, data, 2) > 1


def _frames(image: Image.Image, data: bytes, most: int) -> int:
    """The frames of the opened image a browser shows, counted no further than `most` (see gif);
    0 for a GIF too costly to count."""
    if image.format == "GIF":
        blocks = gif.read(data, most)
        return 0 if blocks is None else len(blocks.frames)
    # Read from a header or an index the decoder built: the chunks of a WebP, the samples of an AVIF,
    # an APNG's acTL.
    return min(most, getattr(image, "n_frames", 1) - first_frame(image))


def animate(image: Image.Image, data: bytes, limits: AnimationLimits) -> Animation | None:
    """The animation of an opened, animated image (its first frame loaded where that reads its
    EXIF: see decode.exif) of these bytes; None when it is over a limit or not animated.

    None too when a frame of another format than GIF is not the first one's size: the limits were
    checked on the first. A GIF's frames are drawn on its screen, clipped to it (see gif.Gif.screen),
    and count towards max_total_pixels as the larger of the screen and their own pictures, which are
    decoded whole.
    Raises what Pillow or FFmpeg raise on a frame they cannot decode or encode; the caller turns
    that into the uploader's answer.
    """
    if image.format not in _ANIMATED_FORMATS:
        return None
    pictures: Iterator[tuple[Image.Image, int]]
    if image.format == "GIF":
        blocks = gif.read(data, limits.max_frames + 1)
        if blocks is None:
            return None
        frames = len(blocks.frames)
        pixels = max(frames * image.width * image.height, blocks.own_pixels)
        pictures = gif.shown(data, blocks, first_gif_picture(image))
        plays = blocks.plays
    else:
        frames = _frames(image, data, limits.max_frames + 1)
        pixels = frames * image.width * image.height
        # Only an APNG's first frame may be past Pillow's frame 0 (decode.first_frame).
        pictures = apng_shown(data, frames) if image.format == "PNG" else _seeking(image, frames)
        # A WebP's ANIM chunk and an APNG's acTL count the plays as the animated WebP does, and Pillow
        # reads them; an AVIF's edit list it does not read.
        plays = isobmff.sequence_plays(data) if image.format == "AVIF" else int(image.info.get("loop", 0))
    plays = min(plays, _MOST_WEBP_PLAYS)
    if not 1 < frames <= limits.max_frames or pixels > limits.max_total_pixels:
        return None
    # Turned upright as the stills are: neither rendition carries the EXIF that would turn it.
    orientation = exif_orientation(image)
    transpose = TRANSPOSE_FOR_ORIENTATION.get(orientation)
    width, height = fit(*upright(image.width, image.height, orientation), limits.box)
    even = (max(2, width - width % 2), max(2, height - height % 2))
    size = image.size
    icc = icc_profile(image)
    to_srgb = srgb_conversion(icc) if icc else None
    levels = tones(image)
    with tempfile.TemporaryDirectory(prefix="mediavault-gifv-") as folder:
        # The MP4's index goes first (faststart), which FFmpeg does by rewriting a file.
        mp4_path = os.path.join(folder, "gifv.mp4")
        webp = io.BytesIO()
        with av.open(webp, "w", format="webp", options={"loop": str(plays)}) as webp_out, \
                av.open(mp4_path, "w", format="mp4", options={"movflags": "+faststart"}) as mp4_out:
            webp_stream = _stream(webp_out, "libwebp_anim", (width, height), _WEBP_PIXELS, {"quality": _WEBP_QUALITY})
            mp4_stream = _stream(mp4_out, "libx264", even, "yuv420p", _X264_OPTIONS)
            mp4_stream.codec_context.colorspace = _BT709
            mp4_stream.codec_context.color_primaries = _BT709
            mp4_stream.codec_context.color_trc = _BT709
            mp4_stream.codec_context.color_range = ColorRange.MPEG
            start = 0
            # Each MP4 packet's duration, in the frames' order, which is the packets' (no B-frames).
            mp4_durations: deque[int] = deque()
            transparent = False
            for picture, milliseconds in pictures:
                if picture.size != size:
                    return None
                rgba = in_srgb_tones(picture, levels)
                if to_srgb is not None:
                    rgba = to_srgb.apply(rgba)
                if transpose is not None:
                    rgba = rgba.transpose(transpose)
                if rgba.size != (width, height):
                    rgba = rgba.resize((width, height), Image.Resampling.LANCZOS)
                transparent = transparent or rgba.getchannel("A").getextrema()[0] != 255
                flat = _even_sized(_over_white(rgba), even)
                shown = _DEFAULT_FRAME_MS if milliseconds <= _NO_DURATION_MS else milliseconds
                mp4_durations.append(shown)
                _encode(webp_out, webp_stream, _rgba(rgba), start)
                _encode(mp4_out, mp4_stream, _bt709(flat), start, mp4_durations)
                start += shown
                if start > limits.max_seconds * 1000:
                    return None
            _mux(webp_out, webp_stream.encode())
            _mux(mp4_out, mp4_stream.encode(), mp4_durations)
        with open(mp4_path, "rb") as mp4:
            gifv = mp4.read()
    return Animation(
        start,
        frames,
        plays,
        [
            Variant(ANIMATION, "image/webp", width, height, _completed(webp.getvalue(), start, transparent)),
            Variant(GIFV, "video/mp4", even[0], even[1], gifv),
        ],
    )


def _completed(webp: bytes, end_ms: int, transparent: bool) -> bytes:
    """The animated WebP completed with what FFmpeg's libwebp_anim leaves out: its last frame shown
    until end_ms, and the flag saying that it has transparency when its frames had some.

    FFmpeg's libwebp_anim never tells libwebp when the last frame ends, and libwebp then shows it
    for the mean of the others' durations (a GIF's long last frame, the pause before it loops, came
    out as short as the rest). And libwebp sets the alpha flag only when a frame it stores has
    alpha, but it stores only the part of a frame that changed, or of the first the part that is
    not transparent: a GIF of opaque shapes on a clear screen stored none, and decoders that go by
    the flag (Pillow) showed the clear screen black; Chromium shows it clear all the same."""
    data = bytearray(webp)
    if transparent and data[12:16] == b"VP8X":
        data[20] |= _WEBP_ALPHA_FLAG
    # Each ANMF chunk's payload starts with its offset and size (3 bytes each), then its duration.
    position, last, shown = 12, None, 0
    while position + 8 <= len(data):
        size = int.from_bytes(data[position + 4 : position + 8], "little")
        if data[position : position + 4] == b"ANMF":
            if last is not None:
                shown += int.from_bytes(data[last + 20 : last + 23], "little")
            last = position
        position += 8 + size + (size & 1)
    if last is not None:
        data[last + 20 : last + 23] = (end_ms - shown).to_bytes(3, "little")
    return bytes(data)


def _seeking(image: Image.Image, frames: int) -> Iterator[tuple[Image.Image, int]]:
    """The opened WebP's or AVIF's first `frames` frames as Pillow draws them, RGBA, each with its
    duration in milliseconds (0 without one)."""
    for index in range(frames):
        image.seek(index)
        # Loading the frame is what gives a WebP frame its duration.
        image.load()
        yield image.convert("RGBA"), int(image.info.get("duration") or 0)


def _stream(container: av.container.OutputContainer, codec: str, size: tuple[int, int], pixel_format: str,
            options: dict[str, object]) -> av.VideoStream:
    stream = cast(av.VideoStream, container.add_stream(codec, rate=_HIGHEST_FRAME_RATE))
    stream.width, stream.height = size
    stream.pix_fmt = pixel_format
    stream.time_base = _MILLISECONDS
    stream.codec_context.time_base = _MILLISECONDS
    stream.codec_context.thread_count = 1
    stream.options = options
    return stream


def _rgba(picture: Image.Image) -> av.VideoFrame:
    # VideoFrame.from_image converts any picture to RGB, dropping its alpha.
    return av.VideoFrame.from_bytes(picture.tobytes(), picture.width, picture.height, format="rgba")


def _bt709(picture: Image.Image) -> av.VideoFrame:
    return av.VideoFrame.from_image(picture).reformat(
        format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG,
        dst_color_trc=_BT709, dst_color_primaries=_BT709,
    )


def _encode(
    container: av.container.OutputContainer,
    stream: av.VideoStream,
    frame: av.VideoFrame,
    pts: int,
    durations: deque[int] | None = None,
) -> None:
    frame.pts = pts
    frame.time_base = _MILLISECONDS
    _mux(container, stream.encode(frame), durations)


def _mux(container: av.container.OutputContainer, packets: Iterable[av.Packet], durations: deque[int] | None = None) -> None:
    for packet in packets:
        if durations is not None:
            # x264 leaves them 0, and the MP4 muxer then shows the last frame for one frame at the
            # stream's rate, whatever its own duration (each other frame lasts until the next).
            packet.duration = durations.popleft()
        container.mux(packet)


def _even_sized(picture: Image.Image, even: tuple[int, int]) -> Image.Image:
    """The picture at the even size 4:2:0 needs: cropped, a side of 1 doubled with its own pixels
    (cropping past it filled the new row or column with black, which bled into the picture's
    colours through the shared chroma)."""
    cropped = picture.crop((0, 0, min(picture.width, even[0]), min(picture.height, even[1])))
    return cropped if cropped.size == even else cropped.resize(even, Image.Resampling.NEAREST)


def _over_white(rgba: Image.Image) -> Image.Image:
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat
