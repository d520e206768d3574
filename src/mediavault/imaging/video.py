"""Videos to H.264 renditions with Debian's ffmpeg, run as a supervised subprocess.

Why a subprocess and not PyAV: PyAV's wheel has libx264 but no zscale (libzimg), which
the HDR tone-mapping chain needs; and the ffmpeg CLI is the reference the renditions are
measured against, so running it is that reference's speed by construction. A subprocess
is also the unit of cancellation: killing it stops the work at once, whatever the
decoder was doing. See docs/video.md for the ladder and its encoder settings.

Every fact the limits are checked against comes from ffprobe reading the container
(headers only); ffmpeg decodes nothing before the source has passed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from mediavault.imaging.errors import CORRUPT_VIDEO, UNSUPPORTED_FORMAT, ImagingError, PermanentImagingError

# The one demuxer each sniffed type may reach (mp4 and mov share FFmpeg's mov demuxer),
# and only local files: no playlists, no network protocols.
DEMUXERS = {"video/mp4": "mov", "video/quicktime": "mov", "video/webm": "matroska"}
_PROTOCOLS = "file,pipe"
# Decoders the renditions may be made from, as ffprobe names the codecs.
VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1"})

VIDEO_TOO_LONG = "video too long"
VIDEO_TOO_LARGE = "video too large"
VIDEO_TOO_SMALL = "video too small"
FRAME_RATE_TOO_HIGH = "frame rate too high"
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
# The frame rate no rendition exceeds: 60 fps sources are halved.
MAX_RENDITION_FPS = 30


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on a source video, checked from its container before anything is decoded."""

    max_duration_seconds: float = 600.0
    max_long_side: int = 4096
    max_frame_rate: float = 240.0


@dataclass(frozen=True)
class Rung:
    """One rendition: its name, its short side, and the encoder's quality target and cap."""

    name: str
    short_side: int
    crf: int
    maxrate_bps: int
    audio_bps: int

    @property
    def bufsize_bits(self) -> int:
        # Two seconds of the cap: a buffer a phone's player fills before it starts.
        return 2 * self.maxrate_bps


LADDER = (
    Rung("360p", 360, crf=24, maxrate_bps=1_000_000, audio_bps=96_000),
    Rung("720p", 720, crf=23, maxrate_bps=3_500_000, audio_bps=128_000),
    Rung("1080p", 1080, crf=23, maxrate_bps=6_500_000, audio_bps=128_000),
)
# x264's speed/size trade-off for every rung; faster presets lose quality at the same CRF.
X264_PRESET = "veryfast"
# Frames x264 looks ahead for rate control (veryfast's own is 10). Each frame held costs
# memory in every rung's encoder; at 5 the 1080p HDR ladder stays under the worker's
# memory goal (bench/README.md) and x264 also spends a little less CPU.
X264_LOOKAHEAD_FRAMES = 5


@dataclass(frozen=True)
class Source:
    """What ffprobe read from the container's headers."""

    codec: str
    coded_width: int
    coded_height: int
    # Upright and in square pixels: the size the video is shown at.
    width: int
    height: int
    rotation: int
    duration_seconds: float
    frame_rate: float
    has_audio: bool
    transfer: str

    @property
    def is_hdr(self) -> bool:
        return self.transfer in HDR_TRANSFERS


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
    """The rungs the source gets: the first always, the others when the source reaches them; never upscaled."""
    short, long = min(source.width, source.height), max(source.width, source.height)
    planned = []
    for index, rung in enumerate(ladder):
        if index and short < rung.short_side:
            break
        scale = min(1.0, rung.short_side / short)
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
    for side in stream.get("side_data_list", ()):
        if "rotation" in side:
            return int(side["rotation"])
    return int(stream.get("tags", {}).get("rotate", 0))


def parse_probe(report: dict, last_packet_end: float | None = None) -> Source:
    """ffprobe's JSON (streams and format) as a Source; PermanentImagingError when it holds no usable video.

    last_packet_end stands in for the duration of a container that states none (a
    Matroska file written live, say).
    """
    streams = report.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")), None)
    if video is None or not video.get("width") or not video.get("height"):
        raise PermanentImagingError(CORRUPT_VIDEO)
    codec = video.get("codec_name", "")
    if codec not in VIDEO_CODECS:
        raise PermanentImagingError(UNSUPPORTED_FORMAT)
    coded_width, coded_height = int(video["width"]), int(video["height"])
    aspect = _ratio(video.get("sample_aspect_ratio")) or Fraction(1)
    width, height = coded_width * aspect, Fraction(coded_height)
    rotation = _rotation(video)
    if rotation % 180:
        width, height = height, width
    rate = _ratio(video.get("avg_frame_rate")) or _ratio(video.get("r_frame_rate"))
    durations = [float(d) for d in (report.get("format", {}).get("duration"), video.get("duration")) if d not in (None, "N/A")]
    if not durations and last_packet_end is not None:
        durations = [last_packet_end]
    if not durations or rate is None:
        raise PermanentImagingError(CORRUPT_VIDEO)
    return Source(
        codec=codec,
        coded_width=coded_width,
        coded_height=coded_height,
        width=max(1, round(width)),
        height=max(1, round(height)),
        rotation=rotation,
        duration_seconds=max(durations),
        frame_rate=float(rate),
        has_audio=any(s.get("codec_type") == "audio" for s in streams),
        transfer=video.get("color_transfer", ""),
    )


def check(source: Source, limits: VideoLimits) -> None:
    """Refuses a source past the limits, with the reason the uploader sees."""
    if source.duration_seconds > limits.max_duration_seconds:
        raise PermanentImagingError(VIDEO_TOO_LONG)
    if max(source.coded_width, source.coded_height, source.width, source.height) > limits.max_long_side:
        raise PermanentImagingError(VIDEO_TOO_LARGE)
    if min(source.width, source.height) < MIN_SIDE:
        raise PermanentImagingError(VIDEO_TOO_SMALL)
    if source.frame_rate > limits.max_frame_rate:
        raise PermanentImagingError(FRAME_RATE_TOO_HIGH)


async def probe(path: Path, mime: str, limits: VideoLimits) -> Source:
    """The source's facts from its container, checked against the limits."""
    report = await _ffprobe(path, mime, "-show_streams", "-show_format")
    if not _has_duration(report):
        # No stated duration: the end of the video's last packet, found by reading the
        # packets' timestamps (demuxing only; nothing is decoded).
        packets = await _ffprobe(path, mime, "-select_streams", "v:0", "-show_entries", "packet=pts_time,duration_time")
        ends = [float(p["pts_time"]) + float(p.get("duration_time", 0) or 0)
                for p in packets.get("packets", ()) if p.get("pts_time") not in (None, "N/A")]
        source = parse_probe(report, max(ends, default=None))
    else:
        source = parse_probe(report)
    check(source, limits)
    return source


def _has_duration(report: dict) -> bool:
    return report.get("format", {}).get("duration") not in (None, "N/A") or any(
        s.get("duration") not in (None, "N/A") for s in report.get("streams", ()) if s.get("codec_type") == "video"
    )


async def _ffprobe(path: Path, mime: str, *what: str) -> dict:
    process = await asyncio.create_subprocess_exec(
        "ffprobe", "-v", "error", "-protocol_whitelist", _PROTOCOLS, "-f", DEMUXERS[mime],
        "-print_format", "json", *what, str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise PermanentImagingError(CORRUPT_VIDEO)
    try:
        report = json.loads(out or b"{}")
    except ValueError:
        raise PermanentImagingError(CORRUPT_VIDEO) from None
    return report if isinstance(report, dict) else {}


def command(source_path: Path, mime: str, source: Source, planned: list[Planned], out_dir: Path, threads: int) -> list[str]:
    """The ffmpeg command that makes every planned rendition in one decode."""
    chain = []
    if source.is_hdr:
        chain.append(TONEMAP_CHAIN)
    if source.frame_rate > MAX_RENDITION_FPS + 0.01:
        chain.append(f"fps={MAX_RENDITION_FPS}")
    # ffmpeg's autorotate has already turned the frames upright before this graph.
    chain.append(f"split={len(planned)}" + "".join(f"[s{i}]" for i in range(len(planned))))
    graph = "[0:v:0]" + ",".join(chain)
    for i, item in enumerate(planned):
        graph += f";[s{i}]scale={item.width}:{item.height}:flags=bicubic,setsar=1,format=yuv420p[v{i}]"
    gop = max(1, round(min(source.frame_rate, MAX_RENDITION_FPS) * 2))
    args = [
        "ffmpeg", "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-y",
        "-protocol_whitelist", _PROTOCOLS, "-threads", str(threads), "-f", DEMUXERS[mime], "-i", str(source_path),
        "-filter_complex_threads", str(threads), "-filter_complex", graph, "-progress", "pipe:1",
    ]
    for i, item in enumerate(planned):
        rung = item.rung
        args += ["-map", f"[v{i}]"]
        if source.has_audio:
            args += ["-map", "0:a:0", "-c:a", "aac", "-ac", "2", "-b:a", str(rung.audio_bps)]
        args += [
            "-c:v", "libx264", "-threads", str(threads), "-preset", X264_PRESET, "-rc-lookahead", str(X264_LOOKAHEAD_FRAMES),
            "-profile:v", "high",
            "-pix_fmt", "yuv420p", "-crf", str(rung.crf), "-maxrate", str(rung.maxrate_bps),
            "-bufsize", str(rung.bufsize_bits), "-g", str(gop),
            "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709",
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
    timeout_seconds: float,
    on_progress: ProgressCallback,
    threads: int = 0,
    niceness: int = 10,
) -> list[Rendition]:
    """Every rendition of the source into out_dir, with ffmpeg as a subprocess.

    on_progress gets the fraction done (0-1) as ffmpeg reports it, about twice a second;
    when it returns False the subprocess is killed and Cancelled raised. Past
    timeout_seconds it is killed and the run fails for good ("processing timed out").
    """
    planned = plan(source)
    process = await asyncio.create_subprocess_exec(
        *command(source_path, mime, source, planned, out_dir, threads),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        # Its own process group, so that a kill reaches nothing else; niced, so that the
        # photo pool's processes get the cores first.
        start_new_session=True, preexec_fn=lambda: os.nice(niceness),  # noqa: PLW1509
    )
    try:
        await asyncio.wait_for(_follow(process, source.duration_seconds, on_progress), timeout_seconds)
    except TimeoutError:
        raise PermanentImagingError("processing timed out") from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    if process.returncode is not None and process.returncode < 0:
        # Killed by a signal we did not send (the OOM killer): the same bytes may pass next time.
        raise ImagingError("processing failed")
    if process.returncode != 0:
        raise PermanentImagingError(CORRUPT_VIDEO)
    made = []
    for item in planned:
        path = out_dir / f"{item.rung.name}.mp4"
        size = path.stat().st_size
        made.append(Rendition(item.rung.name, path, item.width, item.height, size,
                              max(1, math.floor(size * 8 / max(source.duration_seconds, 0.001)))))
    return made


async def _follow(process: asyncio.subprocess.Process, duration_seconds: float, on_progress: ProgressCallback) -> None:
    assert process.stdout is not None
    async for line in process.stdout:
        key, _, value = line.decode(errors="replace").strip().partition("=")
        # out_time_us is microseconds (out_time_ms is too, despite its name).
        if key == "out_time_us" and value.lstrip("-").isdigit() and duration_seconds > 0:
            done = min(1.0, max(0.0, int(value) / 1e6 / duration_seconds))
            if not await on_progress(done):
                raise Cancelled()
    await process.wait()
