"""Videos to H.264 renditions with Debian's ffmpeg, run as a supervised subprocess.

Why a subprocess and not PyAV: PyAV's wheel has libx264 but no zscale (libzimg), which
the HDR tone-mapping chain needs; and the ffmpeg CLI is the reference the renditions are
measured against, so running it is that reference's speed by construction. A subprocess
is also the unit of cancellation: killing it stops the work at once, whatever the
decoder was doing. See docs/video.md for the ladder and its encoder settings.

Every fact the limits are checked against comes from ffprobe reading the container: its
headers, then the timestamps of every packet of the streams the renditions are made from
(demuxed, not decoded), since headers can state any duration. No FFmpeg run on the source
opens a decoder that is not on its whitelist (the stream analysis would decode a first frame of
every stream otherwise). ffmpeg decodes nothing before the source has passed the checks, decodes
only the renditions' streams (mapped by index), and enforces the limits again on what it decodes: every frame's size (`-max_pixels`, with `-xerror` so that a
frame refused fails the run), and the duration (`-t`). ffmpeg's private memory is capped too
(VideoLimits.max_memory_bytes), since neither limit bounds what its decoders and encoders allocate.

Sound: the first audio stream whose codec is in AUDIO_CODECS becomes the renditions' AAC, unless
nothing of it is heard (an MP4 edit list may leave out every sample): then the source has no sound,
as ffmpeg's renditions have none. A source whose audio streams are all of other codecs is refused as
unsupported rather than made silent: its sound is part of what was uploaded, and a rendition
without it would pass for a complete one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

from mediavault.imaging.errors import CORRUPT_VIDEO, TIMED_OUT, UNSUPPORTED_FORMAT, ImagingError, PermanentImagingError
from mediavault.imaging.variants import bitrate

# The one demuxer each sniffed type may reach (mp4 and mov share FFmpeg's mov demuxer),
# and only local files: no playlists, no network protocols.
DEMUXERS = {"video/mp4": "mov", "video/quicktime": "mov", "video/webm": "matroska"}
_PROTOCOLS = "file,pipe"
# Decoders the renditions may be made from, as ffprobe names the codecs.
VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1"})
# What phones and cameras put beside those: AAC almost always; MP3, Opus, Vorbis, AC-3/E-AC-3,
# ALAC and integer or float PCM (MOV's lpcm/sowt/twos/in24) from cameras, editors and screen
# recorders; AMR-NB/WB from phones writing 3GP, whose brands the sniffer accepts as MP4.
AUDIO_CODECS = frozenset({
    "aac", "mp3", "opus", "vorbis", "ac3", "eac3", "alac", "amr_nb", "amr_wb",
    "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_s32le", "pcm_s32be", "pcm_f32le", "pcm_f32be",
})
# The decoders FFmpeg may open on an upload (`-codec_whitelist`), by decoder name: a codec has
# several (native, libvpx, dav1d, fixed-point...) and FFmpeg takes the first its build has.
# Its stream analysis (avformat_find_stream_info) otherwise decodes the first frames of every
# stream, of any of the hundreds of codecs its demuxers map, before a check has looked at them.
RENDITION_DECODERS = frozenset({
    "h264", "hevc", "vp8", "libvpx", "vp9", "libvpx-vp9", "libdav1d", "libaom-av1", "av1",
    "aac", "aac_fixed", "mp3float", "mp3", "opus", "libopus", "vorbis", "libvorbis", "ac3", "ac3_fixed", "eac3",
    "alac", "amrnb", "amrwb", "libopencore_amrnb", "libopencore_amrwb",
    *(codec for codec in AUDIO_CODECS if codec.startswith("pcm_")),
})
# ffprobe opens a decoder for every stream and exits when one is refused, so the probe also allows
# what phones and editors put beside the video and the renditions never use: a cover picture
# (MP4's covr holds a JPEG or a PNG) and timed text. A source with any other decodable stream is
# refused as unsupported; data streams (timecode, camera metadata) have no decoder to open.
PROBE_DECODERS = RENDITION_DECODERS | {"mjpeg", "png", "mov_text", "webvtt"}
# What FFmpeg logs when a stream's decoder is not on the whitelist.
_DECODER_REFUSED = b"not on whitelist"

VIDEO_TOO_LONG = "video too long"
VIDEO_TOO_LARGE = "video too large"
VIDEO_TOO_SMALL = "video too small"
FRAME_RATE_TOO_HIGH = "frame rate too high"
TOO_MANY_PACKETS = "too many packets"
PROBE_TIMED_OUT = "probe timed out"
# Below a macroblock on a side, H.264 has nothing to show.
MIN_SIDE = 16

# HLG and PQ as FFmpeg names their transfer characteristics.
HDR_TRANSFERS = frozenset({"arib-std-b67", "smpte2084"})
# The common zscale chain (linear light, Hable's curve, then BT.709 transfer, matrix and
# primaries), spelled out: npl=100 puts HLG's and PQ's reference white on SDR white, the
# float format is the one tonemap works in (else swscale converts with its own guesses),
# and tonemap's default desaturation keeps the brightest colours from clipping to neon.
TONEMAP_CHAIN = (
    "zscale=t=linear:npl=100,format=gbrpf32le,tonemap=tonemap=hable,"
    "zscale=t=bt709:m=bt709:p=bt709:r=tv,format=yuv420p"
)
# BT.2020 primaries with an SDR transfer (HLG and PQ go through the tone mapping instead):
# the colours are moved into BT.709's gamut by zscale, which swscale cannot do.
BT2020_SDR_TRANSFERS = frozenset({"bt709", "bt2020-10", "bt2020-12", "smpte170m"})
BT2020_TO_BT709_CHAIN = "zscale=p=bt709:t=bt709:m=bt709:r=tv,format=yuv420p"
# ffprobe's color_space names as swscale's in_color_matrix takes them.
SCALE_MATRICES = {
    "bt709": "bt709", "smpte170m": "smpte170m", "bt470bg": "bt470", "bt2020nc": "bt2020", "bt2020c": "bt2020",
    "fcc": "fcc", "smpte240m": "smpte240m",
}
# What FFmpeg logs when a decoder meets a frame past -max_pixels.
_FRAME_TOO_LARGE = b"exceeds specified max pixel count"
# What ffmpeg logs when an allocation fails, the only sign that a run reached its memory cap:
# FFmpeg's ENOMEM in its several spellings, x264's own, and a decoder's frame pool.
_OUT_OF_MEMORY = (b"Cannot allocate memory", b"Could not allocate", b"malloc of size", b"get_buffer() failed")
# What a decoder logs before "get_buffer() failed" when a frame's size, not memory, was refused.
_INVALID_PICTURE = b"image parameters invalid"
# What ffmpeg logs when a thread cannot be started (pthread_create's EAGAIN: the user's or the
# host's limit on processes and threads) and when an encoder does not open without a failed
# allocation (x264 says nothing of its threads that did not start). A fault of the machine, not of
# the file nor of its memory: the attempt is tried again. A thread's stack can be refused by the
# memory cap too (EAGAIN as well), but threads start before any frame is decoded, far under a cap
# sized for them (memory_cap_bytes).
_COULD_NOT_START = (b"Resource temporarily unavailable", b"Error while opening encoder")
# The AAC sample rates every phone plays: Android's AAC decoder is required to play AAC's standard
# rates from 8 to 48 kHz (its compatibility definition). ffmpeg's encoder also writes 7.35, 64, 88.2
# and 96 kHz, and gives a source at a rate it does not write the nearest one it does, lower than the
# source's (37.8 kHz became 32) or outside that range (5 kHz became 7.35).
AAC_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
# The channel counts FFmpeg takes a layout for when a sound states none (av_channel_layout_default:
# mono to 7.1, hexadecagonal, 22.2), and so can mix down to stereo; any other it cannot mix without
# a stated layout (Source.first_two_channels).
GUESSED_LAYOUT_CHANNELS = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 16, 24})
# Packets a second of the duration limit may hold in the streams other than the video (the sound
# and whatever is beside it): Opus's shortest frame, 2.5 ms, is the shortest packet of the allowed
# audio codecs, and their usual ones last 20 ms or more (MOV's PCM is demuxed a chunk a packet).
AUDIO_PACKETS_PER_SECOND = 400
# The frame rate no rendition exceeds: 60 fps sources are halved.
MAX_RENDITION_FPS = 30
# The cap as the renditions' frames see it: a frame closer than this to the last one kept is
# dropped, and every frame kept keeps its timestamp. A tenth under 1/30 s, since a phone's 30 fps
# clock jitters by a tick of its 600 Hz timescale (19/600 s) and no such frame may go; no instant
# of a rendition is above 33 fps.
MIN_FRAME_INTERVAL_SECONDS = 0.9 / MAX_RENDITION_FPS
# A keyframe at least this often, by the frames' time, whatever their rate.
KEYFRAME_SECONDS = 2
# The copies of a late picture's first frame held from 0, at the cap's rate (command): x264 reads its
# B-frame delay from the time to its third frame (veryfast's B-pyramid delays two).
_HELD_COPIES = 3


def memory_cap_bytes(threads: int) -> int:
    """A cap on ffmpeg's private memory that the renditions of any admitted source fit under with
    room to spare, for ffmpeg run with `threads` (0: its own choice). RLIMIT_DATA counts every
    thread's stack reservation and codec buffers, so the need grows with the threads, about 175 MiB
    a thread over 544 MiB for one (4K HLG HEVC, the largest measured: 988 MiB with its own choice
    on 2 cores, 3177 with 16, 5244 with 32; docs/video.md). Left to choose, x264 takes 1.5 threads
    a core, and the decoders one a core and one more."""
    effective = threads or math.ceil(1.5 * len(os.sched_getaffinity(0)))
    return (1024 + 192 * effective) * 1024 * 1024


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on a source video, checked from its container before anything is decoded."""

    max_duration_seconds: float = 600.0
    max_long_side: int = 4096
    max_frame_rate: float = 240.0
    # One deadline over the whole probe, every ffprobe run (the headers, the packets, and the first
    # frame of a BT.2020 source that states an SDR transfer): the packet bounds below make it a read
    # of at most max_video_packets + max_other_packets lines, and this leaves room for a busy machine.
    max_probe_seconds: float = 30.0
    # ffmpeg's private memory as RLIMIT_DATA counts it (0: no cap), for ffmpeg left to choose its threads.
    max_memory_bytes: int = field(default_factory=lambda: memory_cap_bytes(0))

    @property
    def max_video_packets(self) -> int:
        """As many frames as the longest video at the highest frame rate holds."""
        return math.ceil(self.max_duration_seconds * self.max_frame_rate)

    @property
    def max_other_packets(self) -> int:
        """The packets of every other stream together: the sound's, at a rate no allowed codec reaches."""
        return math.ceil(self.max_duration_seconds * AUDIO_PACKETS_PER_SECOND)

    @property
    def max_frame_pixels(self) -> int:
        """The largest frame the long-side limit allows, as FFmpeg's decoders count it for -max_pixels:
        they round the width up to their stride alignment (64 on builds with AVX-512), so a frame
        exactly max_long_side wide would be refused by a bare max_long_side squared."""
        return -(-self.max_long_side // 64) * 64 * self.max_long_side


@dataclass(frozen=True)
class Rung:
    """One rendition: its name, the 16:9 box it fits in (either way up), and the encoder's quality
    target and cap. The box, not the short side alone, keeps a tall or wide source's frames within
    the H.264 level the rung's name promises (a 1080x2400 screen recording would be level 5.0)."""

    name: str
    long_side: int
    short_side: int
    crf: int
    maxrate_bps: int
    audio_bps: int

    @property
    def bufsize_bits(self) -> int:
        # Two seconds of the cap: a buffer a phone's player fills before it starts.
        return 2 * self.maxrate_bps


LADDER = (
    Rung("360p", 640, 360, crf=24, maxrate_bps=1_000_000, audio_bps=96_000),
    Rung("720p", 1280, 720, crf=23, maxrate_bps=3_500_000, audio_bps=128_000),
    Rung("1080p", 1920, 1080, crf=23, maxrate_bps=6_500_000, audio_bps=128_000),
)
# x264's speed/size trade-off for every rung; faster presets lose quality at the same CRF.
X264_PRESET = "veryfast"
# Frames x264 looks ahead for rate control (veryfast's own is 10). Each frame held costs
# memory in every rung's encoder; at 5 the 1080p HDR ladder stays under the worker's
# memory goal (bench/README.md) and x264 also spends a little less CPU.
X264_LOOKAHEAD_FRAMES = 5


@dataclass(frozen=True)
class Source:
    """What ffprobe read from the container: its headers, and the duration its packets last."""

    codec: str
    # The streams the renditions are made from, by their index in the container; audio_index
    # is None when the source has no sound, or none of it is heard (probe).
    video_index: int
    audio_index: int | None
    coded_width: int
    coded_height: int
    # Upright and in square pixels: the size the video is shown at.
    width: int
    height: int
    rotation: int
    duration_seconds: float
    # Where the container's clock starts: ffmpeg counts the renditions' time from here.
    start_seconds: float
    # The average frame rate, what Media.frame_rate reports and the limit checks: one over the mean
    # interval between the video frames shown, by their packets (probe). The headers' average is no
    # measure of a variable-frame-rate stream: in Matroska it is the rate of the timestamps' clock
    # when the track states one (1000 for a phone's H.264 that ffmpeg wrote), else an estimate from
    # its first frames. The renditions follow the frames' timestamps, never this figure (command).
    frame_rate: float
    # The colour tags as ffprobe names them ("" when untagged).
    transfer: str
    matrix: str = ""
    primaries: str = ""
    # The renditions' sound's, in Hz; 0 without sound.
    audio_sample_rate: int = 0
    # Its channels, and whether it states their layout (without one, FFmpeg guesses it from their count).
    audio_channels: int = 0
    audio_layout_stated: bool = False
    # Where the video's first frame is shown, counted from start_seconds (probe): after 0 when the
    # picture starts after the sound, which the renditions hold it for (command).
    first_frame_seconds: float = 0.0

    @property
    def has_audio(self) -> bool:
        return self.audio_index is not None

    @property
    def rendition_sample_rate(self) -> int:
        """The renditions' AAC sample rate: the lowest every phone plays that is not below the sound's,
        so that none of it is lost (a 96 kHz camera's PCM gets the highest, 48 kHz)."""
        return next((rate for rate in AAC_SAMPLE_RATES if rate >= self.audio_sample_rate), AAC_SAMPLE_RATES[-1])

    @property
    def first_two_channels(self) -> bool:
        """Whether the renditions' stereo is the sound's first two channels as they are, FFmpeg having no
        layout to mix it down from (GUESSED_LAYOUT_CHANNELS): every layout puts the front left and right
        first, and Web Audio's discrete mixing keeps the first channels so."""
        return self.has_audio and not self.audio_layout_stated and self.audio_channels not in GUESSED_LAYOUT_CHANNELS

    @property
    def is_hdr(self) -> bool:
        return self.transfer in HDR_TRANSFERS

    @property
    def is_bt2020_sdr(self) -> bool:
        return self.primaries == "bt2020" and self.transfer in BT2020_SDR_TRANSFERS

    @property
    def scale_matrix(self) -> str:
        """The YCbCr matrix of the frames the rungs' scalers get, as swscale names it."""
        if self.is_hdr or self.is_bt2020_sdr:
            return "bt709"
        if self.matrix in SCALE_MATRICES:
            return SCALE_MATRICES[self.matrix]
        # Untagged: what players assume, BT.709 for HD and BT.601 for SD (swscale would take BT.601 for both).
        return "bt709" if self.coded_width >= 1280 or self.coded_height >= 720 else "smpte170m"


@dataclass(frozen=True)
class Planned:
    rung: Rung
    width: int
    height: int


@dataclass(frozen=True)
class Rendition:
    name: str
    path: Path
    width: int
    height: int
    size_bytes: int
    bitrate: int


def _even(value: float) -> int:
    return max(2, 2 * round(value / 2))


def plan(source: Source, ladder: tuple[Rung, ...] = LADDER) -> list[Planned]:
    """The rungs the source gets, each fitted inside its box turned the source's way up: the first
    always, the others when the source reaches their box on a side; never upscaled."""
    short, long = min(source.width, source.height), max(source.width, source.height)
    planned = []
    for index, rung in enumerate(ladder):
        if index and short < rung.short_side and long < rung.long_side:
            break
        scale = min(1.0, rung.short_side / short, rung.long_side / long)
        new_short, new_long = _even(short * scale), _even(long * scale)
        if source.width <= source.height:
            planned.append(Planned(rung, new_short, new_long))
        else:
            planned.append(Planned(rung, new_long, new_short))
    return planned


def _ratio(text: str | None) -> Fraction | None:
    if not text or ":" not in text and "/" not in text:
        return None
    num, den = text.replace(":", "/").split("/")
    return Fraction(int(num), int(den)) if int(den) and int(num) else None


def _rotation(stream: dict) -> int:
    """The display matrix's angle (counter-clockwise) rounded to a degree, as ffmpeg's autorotate
    rounds it before it turns the frames; ffprobe's own "rotation" truncates it (89.6 is 89, where
    ffmpeg turns a quarter) and is a huge negative number for a matrix without an angle."""
    # The display matrix only, the one thing ffmpeg's autorotate reads: a "rotate" tag (free
    # text in Matroska) turns no frame, and counting it would plan renditions of the wrong shape.
    for side in stream.get("side_data_list", ()):
        if "displaymatrix" in side:
            # Three rows "00000000:  a  b  u", in 16.16 fixed point but for the last column.
            matrix = [int(v) for row in side["displaymatrix"].strip().splitlines() for v in row.partition(":")[2].split()]
            if len(matrix) != 9:
                raise ValueError("display matrix")
            a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]
            if not math.hypot(a, c) or not math.hypot(b, d):
                # av_display_rotation_get's NaN: ffmpeg turns nothing.
                return 0
            return round(-math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c))))
    return 0


def _seconds(text: str | None) -> float | None:
    return None if text in (None, "N/A") else float(text)


def parse_probe(report: dict) -> Source:
    """ffprobe's JSON (streams and format) as a Source whose duration is the longest the headers state
    (0 when they state none) and whose frame rate is 0 (the packets' to tell: probe);
    PermanentImagingError when it holds no usable video, or is malformed.
    """
    try:
        return _source(report)
    except (ValueError, TypeError, KeyError):
        # A value unfit for its field comes from the file (ffprobe reports what it reads), and
        # the same bytes give the same report: the file is at fault, and a retry is no use.
        raise PermanentImagingError(CORRUPT_VIDEO) from None


def _source(report: dict) -> Source:
    streams = report.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")), None)
    if video is None and any(s.get("codec_type") == "audio" for s in streams):
        # Sound alone (a voice memo, an .m4a with its cover picture) is no video, but nothing corrupt.
        raise PermanentImagingError(UNSUPPORTED_FORMAT)
    if video is None or not video.get("width") or not video.get("height"):
        raise PermanentImagingError(CORRUPT_VIDEO)
    codec = video.get("codec_name", "")
    if codec not in VIDEO_CODECS:
        raise PermanentImagingError(UNSUPPORTED_FORMAT)
    sounds = [s for s in streams if s.get("codec_type") == "audio"]
    audio = next((s for s in sounds if s.get("codec_name") in AUDIO_CODECS), None)
    if sounds and audio is None:
        raise PermanentImagingError(UNSUPPORTED_FORMAT)
    coded_width, coded_height = int(video["width"]), int(video["height"])
    aspect = _ratio(video.get("sample_aspect_ratio")) or Fraction(1)
    width, height = coded_width * aspect, Fraction(coded_height)
    rotation = _rotation(video)
    # ffmpeg's autorotate transposes the frames at a quarter turn only; any other angle it draws
    # turned inside the frame's own size (its rotate filter), so the frames keep their shape.
    if rotation % 180 == 90:
        width, height = height, width
    container = report.get("format", {})
    stated = [d for d in (_seconds(container.get("duration")), _seconds(video.get("duration"))) if d is not None]
    return Source(
        codec=codec,
        video_index=int(video["index"]),
        audio_index=None if audio is None else int(audio["index"]),
        coded_width=coded_width,
        coded_height=coded_height,
        width=max(1, round(width)),
        height=max(1, round(height)),
        rotation=rotation,
        duration_seconds=max(stated, default=0.0),
        start_seconds=_seconds(container.get("start_time")) or 0.0,
        frame_rate=0.0,
        audio_sample_rate=0 if audio is None else int(audio.get("sample_rate") or 0),
        audio_channels=0 if audio is None else int(audio.get("channels") or 0),
        audio_layout_stated=audio is not None and "channel_layout" in audio,
        transfer=video.get("color_transfer", ""),
        matrix=video.get("color_space", ""),
        primaries=video.get("color_primaries", ""),
    )


def check(source: Source, limits: VideoLimits) -> None:
    """Refuses a source past the limits, with the reason the uploader sees."""
    if source.duration_seconds > limits.max_duration_seconds:
        raise PermanentImagingError(VIDEO_TOO_LONG)
    if max(source.coded_width, source.coded_height, source.width, source.height) > limits.max_long_side:
        raise PermanentImagingError(VIDEO_TOO_LARGE)
    # The smallest rendition too: a 4096x16 source fits the first rung's box at 640x2, frames a
    # phone's hardware decoder refuses.
    first = plan(source)[0]
    if min(source.width, source.height, first.width, first.height) < MIN_SIDE:
        raise PermanentImagingError(VIDEO_TOO_SMALL)
    if source.frame_rate > limits.max_frame_rate:
        raise PermanentImagingError(FRAME_RATE_TOO_HIGH)


async def probe(path: Path, mime: str, limits: VideoLimits) -> Source:
    """The source's facts from its container, checked against the limits: first as its headers state
    them, then with the duration and the frame rate its packets actually present. The whole probe is
    bounded by limits.max_probe_seconds, and ffprobe never outlives it, cancelled or not."""
    try:
        async with asyncio.timeout(limits.max_probe_seconds):
            stated = parse_probe(await _ffprobe(path, mime, limits, "-show_streams", "-show_format"))
            check(stated, limits)
            presented = await _presented(path, mime, stated, limits)
            if stated.primaries == "bt2020" and not stated.is_hdr:
                stated = replace(stated, transfer=await _frame_transfer(path, mime, stated, limits) or stated.transfer)
    except TimeoutError:
        raise PermanentImagingError(PROBE_TIMED_OUT) from None
    # Checked: the longer of the two, as a header may claim hours over a second of frames. Reported
    # and timed: what the packets present, as the renditions and a player end where the media ends
    # (an edit list that runs past it lengthens only the headers).
    longest = max(stated.duration_seconds, presented.duration_seconds)
    if longest <= 0:
        raise PermanentImagingError(CORRUPT_VIDEO)
    source = replace(
        stated, duration_seconds=presented.duration_seconds or stated.duration_seconds, frame_rate=presented.frame_rate,
        first_frame_seconds=presented.first_frame_seconds,
    )
    if not presented.has_audio:
        # A sound stream of which nothing is heard: ffmpeg makes the renditions silent, and so they are said to be.
        source = replace(source, audio_index=None, audio_sample_rate=0, audio_channels=0, audio_layout_stated=False)
    check(replace(source, duration_seconds=longest), limits)
    return source


async def _frame_transfer(path: Path, mime: str, source: Source, limits: VideoLimits) -> str | None:
    """The HDR transfer the first frame of a BT.2020 source declares when its stream does not:
    some cameras signal HLG only in an alternative-transfer-characteristics SEI message, which
    the decoder applies to its frames while the stream keeps its SDR transfer."""
    report = await _ffprobe(
        path, mime, limits, "-select_streams", str(source.video_index), "-read_intervals", "%+#1",
        "-show_frames", "-show_entries", "frame=color_transfer",
    )
    frames = report.get("frames") or [{}]
    transfer = frames[0].get("color_transfer") if isinstance(frames[0], dict) else None
    return transfer if transfer in HDR_TRANSFERS else None


def _capped(limits: VideoLimits) -> list[str]:
    """What execs a command under the memory cap: prlimit(1), with no Python code between fork
    and exec (see transcode). RLIMIT_DATA, not RLIMIT_AS: the address space also counts every
    thread's 64 MiB malloc arena reservation and the shared libraries, and took 1.5 times as much
    for the same runs."""
    return ["prlimit", f"--data={limits.max_memory_bytes}", "--"] if limits.max_memory_bytes else []


def _ffprobe_command(path: Path, mime: str, limits: VideoLimits, *what: str) -> list[str]:
    # Under the renditions' memory cap too: the demuxer allocates what the container's tables claim.
    # Not niced, unlike ffmpeg: the probe's limit is on the clock and its refusal final, so behind
    # the photo pool on a busy machine a source would be refused for the machine's load; the packet
    # limits bound its work instead.
    return [
        *_capped(limits),
        "ffprobe", "-v", "error", "-protocol_whitelist", _PROTOCOLS, "-codec_whitelist", ",".join(sorted(PROBE_DECODERS)),
        "-max_pixels", str(limits.max_frame_pixels), "-f", DEMUXERS[mime], *what, str(path),
    ]


@dataclass(frozen=True)
class _Presented:
    """What the packets of the renditions' streams present (see _presented)."""

    # From where the renditions' clock starts to the end of the last packet presented.
    duration_seconds: float
    # One over the video frames' mean interval, start to start (the last frame's own duration may be
    # stretched to its edit's end), to a thousandth (ffprobe prints microseconds); 0 for one frame.
    frame_rate: float
    # Whether the sound stream presents any of its samples: an MP4 edit list may leave them all out.
    has_audio: bool
    # From where the renditions' clock starts to the first video frame shown.
    first_frame_seconds: float


# How ffprobe names the packet side data that tells the decoder how many samples to drop.
_SKIP_SAMPLES = "Skip Samples"
# ffprobe prints times to the microsecond: two times this close are one.
_PRINTED_SECONDS = 1e-6


async def _presented(path: Path, mime: str, source: Source, limits: VideoLimits) -> _Presented:
    """How long the renditions' streams last by the timestamps of the packets they present, counted
    from where ffmpeg starts the renditions' clock, the video's average frame rate, and whether the
    sound presents anything; demuxing only, nothing decoded. Reading stops once past the duration
    limit, and the packets are read as they come, so a file of millions of them costs no memory; a
    file with more packets than the limits allow is refused when it passes them, since each one costs
    the worker a line to parse. A video stream that presents no frame at all (its MP4 edit list starts
    past the end of its media) is refused as corrupt: there is nothing to show. A sound stream that
    presents no sample is no sound: ffmpeg drops it from the renditions."""
    wanted = {source.video_index, source.audio_index}
    video_packets = other_packets = shown = 0
    first_frame, last_frame = math.inf, -math.inf
    video_end = sound_end = 0.0
    # Where the sound is first heard (_heard_from), and the latest start of a sound packet that the
    # edit list keeps.
    heard_from: float | None = None
    last_sound = -math.inf
    reading = _bounded(
        _ffprobe_command(path, mime, limits, "-show_entries",
                         "packet=stream_index,pts_time,duration_time,flags:packet_side_data=side_data_type,skip_samples",
                         "-of", "csv=p=0"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with reading as process:
            assert process.stdout is not None
            async for line in process.stdout:
                fields = line.decode().strip().split(",")
                # A packet with side data ends its line with the side data's fields, and is followed by
                # an empty line (the end of its side data list).
                if len(fields) < 4:
                    continue
                index, pts, length, flags = int(fields[0]), fields[1], fields[2], fields[3]
                video_packets += index == source.video_index
                other_packets += index != source.video_index
                if video_packets > limits.max_video_packets or other_packets > limits.max_other_packets:
                    raise PermanentImagingError(TOO_MANY_PACKETS)
                if index == source.audio_index and heard_from is None:
                    heard_from = _heard_from(fields, source.audio_sample_rate)
                # "D": a packet outside the container's edit list, decoded only as a reference for
                # the frames shown after it; the renditions, as players, never show it.
                if index in wanted and "D" not in flags:
                    shown += index == source.video_index
                    if pts != "N/A":
                        start = float(pts)
                        end = start + (_seconds(length) or 0.0) - source.start_seconds
                        if index == source.video_index:
                            first_frame, last_frame = min(first_frame, start), max(last_frame, start)
                            video_end = max(video_end, end)
                        else:
                            last_sound = max(last_sound, start)
                            sound_end = max(sound_end, end)
                        if max(video_end, sound_end) > limits.max_duration_seconds:
                            raise PermanentImagingError(VIDEO_TOO_LONG)
            await process.wait()
    except (ValueError, ZeroDivisionError):
        # A field unfit to be read, or samples to drop from a sound stream of no sample rate.
        raise PermanentImagingError(CORRUPT_VIDEO) from None
    _not_killed(process)
    if process.returncode != 0 or not shown:
        raise PermanentImagingError(CORRUPT_VIDEO)
    # A packet kept that starts before where the sound is heard presents nothing of it: the decoder
    # drops its samples too (the last packet of a sound whose MP4 edit starts past the end of its
    # media, which FFmpeg's demuxer takes to last as long as the edit, and so keeps). A sound whose
    # last such packet straddles that point presents less than a packet of it, and is no sound either.
    has_audio = heard_from is not None and last_sound >= heard_from - _PRINTED_SECONDS
    span = last_frame - first_frame
    return _Presented(
        max(video_end, sound_end if has_audio else 0.0), round((shown - 1) / span, 3) if span > 0 else 0.0, has_audio,
        first_frame - source.start_seconds if math.isfinite(first_frame) else 0.0,
    )


def _heard_from(fields: list[str], sample_rate: int) -> float:
    """Where a sound stream is first heard, from the line of its first packet: the packet's time plus
    the samples it tells the decoder to drop (the encoder's priming, or up to where an MP4 edit list
    starts, which may lie past every sample), which the demuxer puts on the first packet."""
    skipped = int(fields[fields.index(_SKIP_SAMPLES) + 1]) if _SKIP_SAMPLES in fields else 0
    start = -math.inf if fields[1] == "N/A" else float(fields[1])
    return start + (skipped / sample_rate if skipped else 0.0)


async def _ffprobe(path: Path, mime: str, limits: VideoLimits, *what: str) -> dict:
    async with _bounded(
        _ffprobe_command(path, mime, limits, "-print_format", "json", *what),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    ) as process:
        out, errors = await process.communicate()
    _not_killed(process)
    if process.returncode != 0:
        raise PermanentImagingError(UNSUPPORTED_FORMAT if _DECODER_REFUSED in errors else CORRUPT_VIDEO)
    try:
        report = json.loads(out or b"{}")
    except ValueError:
        raise PermanentImagingError(CORRUPT_VIDEO) from None
    return report if isinstance(report, dict) else {}


def _decoding(source_path: Path, mime: str, limits: VideoLimits, threads: int) -> list[str]:
    """ffmpeg's input options and input: how every run decodes the source."""
    return [
        "-protocol_whitelist", _PROTOCOLS, "-threads", str(threads),
        # The headers' facts bind nothing inside the stream: a later H.264 SPS may switch to any
        # frame size, and the probe's duration may still fall short of what the demuxer delivers.
        "-max_pixels", str(limits.max_frame_pixels), "-t", str(limits.max_duration_seconds),
        # Only the mapped streams are decoded, but the input's stream analysis would take a first
        # frame of each (a cover picture's, say) without this.
        "-codec_whitelist", ",".join(sorted(RENDITION_DECODERS)),
        "-f", DEMUXERS[mime], "-i", str(source_path),
    ]


def command(
    source_path: Path, mime: str, source: Source, planned: list[Planned], out_dir: Path, limits: VideoLimits, threads: int
) -> list[str]:
    """The ffmpeg command that makes every planned rendition in one decode."""
    # The frame-rate cap first, so that no filter works on a frame it drops. It drops frames and
    # duplicates none, on every source: neither of ffprobe's rates can say which needs it, since a
    # phone's variable-frame-rate stream runs at 24 fps here and 60 there, its average is neither,
    # and its nominal rate (r_frame_rate) is read from its first frames or is the rate all its
    # timestamps fit on (120 for 24 and 30). `fps=30` would make it constant-rate, duplicating the
    # frames of its slower stretches.
    chain = [f"select='isnan(prev_selected_t)+gte(t-prev_selected_t\\,{MIN_FRAME_INTERVAL_SECONDS:.6f})'"]
    if source.is_hdr or source.is_bt2020_sdr:
        # zscale finds no path from a frame whose primaries or matrix are unspecified, and the run
        # failed though every frame decodes: left out, they are read as BT.2020's, those HLG and PQ
        # are defined in (setparams only tags the frames).
        untagged = []
        if not source.primaries:
            untagged.append("color_primaries=bt2020")
        if not source.matrix:
            untagged.append("colorspace=bt2020nc")
        if untagged:
            chain.append("setparams=" + ":".join(untagged))
    if source.is_hdr:
        # Down to the largest rung first, in the source's own pixel format (10-bit stays 10-bit,
        # its matrix and transfer untouched): the tone mapping works on float RGB frames, 12 bytes
        # a pixel, and at a 4K source's size it held ffmpeg's peak above 600 MB for a 1080p rung.
        top = max(planned, key=lambda item: item.width * item.height)
        chain.append(f"scale={top.width}:{top.height}:flags=bicubic")
        chain.append(TONEMAP_CHAIN)
    elif source.is_bt2020_sdr:
        chain.append(BT2020_TO_BT709_CHAIN)
    # ffmpeg's autorotate has already turned the frames upright before this graph.
    chain.append(f"split={len(planned)}" + "".join(f"[s{i}]" for i in range(len(planned))))
    # By index: "v:0" would be the first video stream, which may be an attached cover picture.
    graph = f"[0:{source.video_index}]"
    if source.first_frame_seconds > _PRINTED_SECONDS:
        # A picture that starts after the sound is held from 0 on its first frame, so that the
        # renditions' video starts with their clock, as their sound does: left to itself, ffmpeg's
        # muxer put the late start in an empty edit, which players that ignore MP4 edit lists skip,
        # showing the picture early by the delay. Held by timestamps, the last copy lasting until the
        # picture starts (the cap then drops that frame if it comes within its interval of the copy,
        # the same picture), as a variable-frame-rate source's pause is: copies at the cap's rate
        # all along cost every rung's scaler and x264 30 frames a second of the delay (11 s of a 14 s
        # run for 1.2 s of 1080p picture 20 s after its sound), and one a keyframe interval cost a
        # keyframe each, which x264 gives the bits of a frame shown for 2 s. Not one copy: x264 dates
        # the frames before its B-frames back by the time to its third frame, in an edit that such
        # players show the picture late by (by the whole delay, were that frame the picture's).
        copies = min(_HELD_COPIES, math.ceil(source.first_frame_seconds * MAX_RENDITION_FPS))
        graph += (
            f"split=2[picture][first];[first]trim=end_frame=1,loop=loop={copies - 1}:size=1,"
            f"setpts=N/{MAX_RENDITION_FPS}/TB[held];[held][picture]interleave,"
        )
    graph += ",".join(chain)
    # The matrix and range named on both sides: swscale otherwise keeps the source's matrix in
    # renditions tagged BT.709, and guesses BT.601 for an untagged source.
    colour = f"in_color_matrix={source.scale_matrix}:out_color_matrix=bt709:out_range=tv"
    for i, item in enumerate(planned):
        graph += f";[s{i}]scale={item.width}:{item.height}:flags=bicubic:{colour},setsar=1,format=yuv420p[v{i}]"
    args = [
        "ffmpeg", "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-y", "-xerror",
        *_decoding(source_path, mime, limits, threads),
        "-filter_complex_threads", str(threads), "-filter_complex", graph, "-progress", "pipe:1",
    ]
    for i, item in enumerate(planned):
        rung = item.rung
        args += ["-map", f"[v{i}]"]
        if source.audio_index is not None:
            args += [
                "-map", f"0:{source.audio_index}",
                # Silence where the sound starts after the video, or stops and starts again later
                # (a gap of over 0.1 s, swresample's threshold): the renditions' sound starts with their
                # clock and never skips, so that players which ignore MP4 edit lists keep it in sync
                # (ffmpeg's muxer puts such a start in an empty edit, and a gap nowhere).
                # A sound of channels FFmpeg has no layout for failed the run: it cannot mix them down.
                "-af", ("pan=stereo|c0=c0|c1=c1," if source.first_two_channels else "") + "aresample=first_pts=0",
                "-c:a", "aac", "-ac", "2", "-ar", str(source.rendition_sample_rate), "-b:a", str(rung.audio_bps),
            ]
        args += [
            "-c:v", "libx264", "-threads", str(threads), "-preset", X264_PRESET, "-rc-lookahead", str(X264_LOOKAHEAD_FRAMES),
            "-profile:v", "high",
            "-pix_fmt", "yuv420p", "-crf", str(rung.crf), "-maxrate", str(rung.maxrate_bps),
            "-bufsize", str(rung.bufsize_bits),
            # Keyframes by time, as a variable frame rate spaces frames unevenly; x264's own interval
            # (in frames) is no shorter at the cap's rate. Counted from the last one forced: counted
            # from 0 (n_forced*2), every frame after a gap of several seconds was forced, one a
            # frame, until the count caught up.
            "-force_key_frames", f"expr:isnan(prev_forced_t)+gte(t,prev_forced_t+{KEYFRAME_SECONDS})",
            "-g", str(KEYFRAME_SECONDS * MAX_RENDITION_FPS),
            "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709",
            # Frames as the graph gives them, at their own timestamps: the MP4 muxer's default is a
            # constant rate at the source's nominal one, which duplicates a variable-frame-rate
            # source's frames up to it, and the encoder's default time base, 1/that rate, moved
            # every frame onto its grid and dropped those that met on it (a stream nominally 24 fps
            # lost a frame in five of its 30 fps stretches). x264 is told the cap's rate, from which
            # it sets the level.
            "-fps_mode", "vfr", "-enc_time_base:v", "-1", "-r", str(MAX_RENDITION_FPS),
            "-map_metadata", "-1", "-map_chapters", "-1", "-movflags", "+faststart", "-f", "mp4",
            str(out_dir / f"{rung.name}.mp4"),
        ]
    return args


ProgressCallback = Callable[[float], Awaitable[bool]]


class Cancelled(Exception):
    """The progress callback said the run is no longer wanted (its media was deleted or superseded)."""


async def transcode(
    source_path: Path,
    mime: str,
    source: Source,
    out_dir: Path,
    *,
    limits: VideoLimits,
    timeout_seconds: float,
    on_progress: ProgressCallback,
    threads: int = 0,
    niceness: int = 10,
) -> list[Rendition]:
    """Every rendition of the source into out_dir, with ffmpeg as a subprocess.

    on_progress gets the fraction done (0-1) as ffmpeg reports it, about twice a second;
    when it returns False the subprocess is killed and Cancelled raised. Past
    timeout_seconds, in all with the decode that names an error the run did not, ffmpeg is killed
    and the run fails for good ("processing timed out").
    A frame past limits' size, or a run past limits' memory, fails it for good too ("video too
    large"), and a stream that does not decode ("corrupt video"); a thread or an encoder that
    does not start fails the attempt (ImagingError). The renditions end at limits' duration
    whatever the source holds.
    """
    planned = plan(source)
    try:
        # One limit for the run and the decode that may follow it: each with its own, a run could last
        # twice its limit, past the video job's timeout.
        async with asyncio.timeout(timeout_seconds):
            async with _ffmpeg(command(source_path, mime, source, planned, out_dir, limits, threads), limits, niceness,
                               stdout=asyncio.subprocess.PIPE) as process:
                errors = await _follow(process, source.duration_seconds, on_progress)
            _not_killed(process)
            if process.returncode != 0:
                # Which check refused the stream, ffmpeg says only in its log, and -xerror's stop at a
                # decoding error not even there (a decoder says nothing of a failed allocation, VP9's
                # nothing of much of its corrupt data): the streams are then decoded alone and to the
                # end, and ffmpeg names each error on the way.
                raise (
                    _failure(errors)
                    or _failure(await _decoding_log(source_path, mime, source, limits, threads, niceness))
                    or ImagingError("ffmpeg failed without a word, and the decoders alone did not fail")
                )
    except TimeoutError:
        raise PermanentImagingError(TIMED_OUT) from None
    made = []
    for item in planned:
        path = out_dir / f"{item.rung.name}.mp4"
        size = path.stat().st_size
        made.append(Rendition(item.rung.name, path, item.width, item.height, size, bitrate(size, source.duration_seconds)))
    return made


def _ffmpeg(
    args: list[str], limits: VideoLimits, niceness: int, *, stdout: int
) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """ffmpeg run with args, its log on a pipe, bounded (_bounded). Niced, so that the photo pool's
    processes get the cores first, and capped, so that one source cannot take the host's memory: by
    nice(1) and prlimit(1), which exec ffmpeg in the same process, rather than a preexec_fn, Python
    code between fork and exec that deadlocks when another thread held a lock (an allocator's) at
    the fork."""
    return _bounded([*_capped(limits), "nice", "-n", str(niceness), *args], stdout=stdout, stderr=asyncio.subprocess.PIPE)


@contextlib.asynccontextmanager
async def _bounded(args: list[str], *, stdout: int, stderr: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """An FFmpeg tool run with args in a session of its own, killed with everything it started on any
    exit from the block, a cancelled or timed-out one's included. Its own session, so that a kill
    reaches nothing else, and so that a signal to the worker's process group (a Ctrl-C in its
    terminal, which the worker answers with a drain that cancels its jobs to be retried) does not
    reach it: it died of it, and its source was refused as corrupt.

    A worker killed outright (SIGKILL, the OOM killer) runs no block's exit: the tool gets the
    kernel's parent-death signal instead, set by setpriv(1) before it execs the rest, since a
    preexec_fn is Python code between fork and exec (see _ffmpeg). The kernel sends it when the
    thread that started the tool exits, not the process: here the event loop's, which forks it
    (asyncio's subprocess transport and uvloop's alike) and lasts as long as the worker."""
    process = await asyncio.create_subprocess_exec(
        "setpriv", "--pdeathsig", "KILL", "--", *args, stdout=stdout, stderr=stderr, start_new_session=True
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def _not_killed(process: asyncio.subprocess.Process) -> None:
    """Raises when an FFmpeg tool was killed by a signal we did not send (the OOM killer): the same
    bytes may pass next time, so the attempt fails, not the media."""
    if process.returncode is not None and process.returncode < 0:
        raise ImagingError("processing failed")


def _failure(log: bytes) -> ImagingError | None:
    """What the log of a failed ffmpeg run says went wrong; None when it says nothing."""
    if _FRAME_TOO_LARGE in log:
        return PermanentImagingError(VIDEO_TOO_LARGE)
    if _INVALID_PICTURE not in log and any(sign in log for sign in _OUT_OF_MEMORY):
        return PermanentImagingError(VIDEO_TOO_LARGE)
    if any(sign in log for sign in _COULD_NOT_START):
        # ffmpeg's last word, for the log of the attempt.
        return ImagingError("ffmpeg could not start: " + log.decode(errors="replace").strip().rsplit("\n", 1)[-1])
    # Anything else it names is a stream it cannot decode.
    return PermanentImagingError(CORRUPT_VIDEO) if log.strip() else None


async def _decoding_log(source_path: Path, mime: str, source: Source, limits: VideoLimits, threads: int, niceness: int) -> bytes:
    """The log of ffmpeg decoding the renditions' streams as the transcode does, under the same cap,
    but alone and without stopping at an error (no -xerror), so that it names each one."""
    streams = [index for index in (source.video_index, source.audio_index) if index is not None]
    args = [
        "ffmpeg", "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
        *_decoding(source_path, mime, limits, threads),
        *(arg for index in streams for arg in ("-map", f"0:{index}")), "-f", "null", "-",
    ]
    async with _ffmpeg(args, limits, niceness, stdout=asyncio.subprocess.DEVNULL) as process:
        assert process.stderr is not None
        log = await _tail(process.stderr)
        await process.wait()
    return log


async def _follow(process: asyncio.subprocess.Process, duration_seconds: float, on_progress: ProgressCallback) -> bytes:
    """Reports ffmpeg's progress until it exits; returns the end of its log."""
    assert process.stdout is not None
    assert process.stderr is not None
    # Read all along: ffmpeg would stall on a full stderr pipe.
    errors = asyncio.create_task(_tail(process.stderr))
    try:
        async for line in process.stdout:
            key, _, value = line.decode(errors="replace").strip().partition("=")
            # out_time_us is microseconds (out_time_ms is too, despite its name).
            if key == "out_time_us" and value.lstrip("-").isdigit() and duration_seconds > 0:
                done = min(1.0, max(0.0, int(value) / 1e6 / duration_seconds))
                if not await on_progress(done):
                    raise Cancelled()
        await process.wait()
        return await errors
    finally:
        errors.cancel()


async def _tail(stream: asyncio.StreamReader, keep: int = 1 << 16) -> bytes:
    # -xerror stops ffmpeg at the first error, so the message that says why is among the last.
    tail = b""
    while chunk := await stream.read(1 << 16):
        tail = (tail + chunk)[-keep:]
    return tail
