"""Test videos made at run time with Debian's ffmpeg (nothing large is committed), and
the checks every rendition must pass: probed and decoded, not trusted."""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import zlib
from pathlib import Path

from PIL import Image

HLG = ["-color_primaries", "bt2020", "-color_trc", "arib-std-b67", "-colorspace", "bt2020nc"]
PQ = ["-color_primaries", "bt2020", "-color_trc", "smpte2084", "-colorspace", "bt2020nc"]
BT2020_SDR = ["-color_primaries", "bt2020", "-color_trc", "bt2020-10", "-colorspace", "bt2020nc"]


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def _testsrc(size: str, seconds: float, rate: int = 30) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]


def _tone(seconds: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]


def _hevc10(colour: list[str], transfer: str, preset: str = "medium", x265: str = "") -> list[str]:
    return [
        "-c:v", "libx265", "-preset", preset, "-pix_fmt", "yuv420p10le", "-tag:v", "hvc1",
        "-x265-params", f"log-level=error:colorprim=bt2020:transfer={transfer}:colormatrix=bt2020nc{x265}", *colour,
    ]


def h264(path: Path, size: str = "320x240", seconds: float = 1.0, *, audio: bool = True, rate: int = 30,
         faststart: bool = True) -> Path:
    ffmpeg(*_testsrc(size, seconds, rate), *(_tone(seconds) if audio else []),
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           *(["-c:a", "aac", "-shortest"] if audio else []),
           *(["-movflags", "+faststart"] if faststart else []), str(path))
    return path


def anamorphic(path: Path) -> Path:
    """480x360 stored pixels that are 4:3 wide each: shown as 640x360."""
    ffmpeg(*_testsrc("480x360", 1.0), "-vf", "setsar=4/3", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", str(path))
    return path


def hlg_rotated_mov(path: Path, size: str = "320x240", seconds: float = 1.0) -> Path:
    """An iPhone-like clip: HEVC 10-bit HLG tagged hvc1 in a .mov, sound, a 90° display matrix."""
    plain = path.with_suffix(".plain.mov")
    ffmpeg(*_testsrc(size, seconds), *_tone(seconds), *_hevc10(HLG, "arib-std-b67"), "-c:a", "aac", "-shortest", str(plain))
    # Debian's ffmpeg 5.1 writes the display matrix from the rotate tag only when copying.
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(path))
    plain.unlink()
    return path


def hdr(path: Path, colour: list[str], transfer: str, size: str = "320x240", seconds: float = 1.0,
        preset: str = "medium", x265: str = "") -> Path:
    ffmpeg(*_testsrc(size, seconds), *_hevc10(colour, transfer, preset, x265), str(path))
    return path


def bars(path: Path, size: str, *, matrix: str = "", full_range: bool = False, seconds: float = 0.5) -> Path:
    """SMPTE colour bars in H.264 whose YCbCr is in `matrix` (ffprobe's color_space name; "" for
    an untagged file in BT.709 if HD, BT.601 if SD, as players assume) and range, and tagged so."""
    swscale = {"bt709": "bt709", "smpte170m": "bt601", "bt470bg": "bt601"}
    hd = int(size.split("x")[0]) >= 1280
    encode = swscale[matrix] if matrix else ("bt709" if hd else "bt601")
    tags = ["-colorspace", matrix, "-color_primaries", matrix, "-color_trc", "smpte170m" if matrix != "bt709" else "bt709"]
    ffmpeg("-f", "lavfi", "-i", f"smptebars=size={size}:rate=30:duration={seconds}",
           "-vf", f"scale=out_color_matrix={encode}:out_range={'pc' if full_range else 'tv'},"
                  f"format={'yuvj420p' if full_range else 'yuv420p'}",
           "-c:v", "libx264", "-preset", "ultrafast", *(tags if matrix else []),
           *(["-color_range", "pc" if full_range else "tv"] if matrix else []), str(path))
    return path


def bt2020_sdr_bars(path: Path, size: str = "640x480") -> Path:
    """SMPTE colour bars with BT.2020 primaries, matrix and 10-bit SDR transfer, in HEVC Main 10."""
    # lavfi's bars are untagged BT.601 YCbCr, which zscale must be told.
    ffmpeg("-f", "lavfi", "-i", f"smptebars=size={size}:rate=30:duration=0.5",
           "-vf", "zscale=pin=bt709:tin=bt709:min=170m:rin=tv:p=bt2020:t=bt2020-10:m=bt2020nc:r=tv,format=yuv420p10le",
           *_hevc10(["-color_primaries", "bt2020", "-color_trc", "bt2020-10", "-colorspace", "bt2020nc"], "bt2020-10"),
           str(path))
    return path


def colour_tagged(path: Path, **tags: str) -> Path:
    """0.5 s of 320x240 H.264 tagged with only the colour fields given, as ffmpeg names its options
    (color_trc, color_primaries, colorspace): the others are left unspecified."""
    ffmpeg(*_testsrc("320x240", 0.5), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           *(arg for key, value in tags.items() for arg in (f"-{key}", value)), str(path))
    return path


def bar_colours(path: Path) -> list[tuple[int, int, int]]:
    """The RGB of the seven top bars of the first frame, decoded as a player reads the file's tags:
    its matrix (untagged: BT.709 if HD, else BT.601), its range, and BT.2020 primaries moved to BT.709."""
    stream = probe(path)["streams"][0]
    width, height = stream["width"], stream["height"]
    untagged = "bt709" if width >= 1280 or height >= 720 else "bt601"
    matrix = {"bt709": "bt709", "smpte170m": "bt601", "bt470bg": "bt601"}.get(stream.get("color_space", ""), untagged)
    to_rgb = f"scale=in_color_matrix={matrix}:in_range={'pc' if stream.get('color_range') == 'pc' else 'tv'},format=rgb24"
    if stream.get("color_primaries") == "bt2020":
        to_rgb = "zscale=p=bt709:t=bt709:m=bt709:r=tv,scale=in_color_matrix=bt709:in_range=tv,format=rgb24"
    rgb = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-vf", to_rgb, "-f", "rawvideo", "-"],
                         check=True, capture_output=True).stdout
    row = height // 3 * width
    return [tuple(rgb[3 * (row + width * (2 * i + 1) // 14):][:3]) for i in range(7)]


def vfr(path: Path) -> Path:
    """Frames dropped unevenly, timestamps kept: 30 fps, then 10, then 30."""
    ffmpeg(*_testsrc("320x240", 1.5), "-vf", "select='lt(t,0.5)+gt(t,1)+not(mod(n,3))'", "-fps_mode", "vfr",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path))
    return path


def gapped_picture(path: Path, seconds: float = 12.0, at: float = 2.0, gap: float = 6.0) -> Path:
    """320x240 H.264 of `seconds` at 30 fps with no frame for `gap` seconds from `at`: a phone's
    variable frame rate across a pause (timestamps kept)."""
    ffmpeg(*_testsrc("320x240", seconds), "-vf", f"select='lt(t,{at})+gte(t,{at + gap})'", "-fps_mode", "vfr",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path))
    return path


def bursts(path: Path, size: str = "1920x1080", seconds: float = 1.0) -> Path:
    """A phone's variable frame rate: 60 fps bursts (12 frames a second) between every fifth frame of
    60 kept, so the nominal rate (r_frame_rate) is 60 and the average about 22."""
    ffmpeg(*_testsrc(size, seconds, 60), "-vf", "select='lt(mod(n,60),12)+not(mod(n,5))'", "-fps_mode", "vfr",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path))
    return path


def stretches(path: Path, *rates: int, seconds: float = 2.0) -> Path:
    """A phone's variable frame rate: 320x240 video, `seconds` at each of `rates` fps in turn, every
    frame at its own time on a 600 Hz clock (an iPhone's .mov timescale; Matroska keeps milliseconds).
    H.264, but VP9 in a .webm (as Android and browsers record)."""
    inputs = [arg for rate in rates for arg in _testsrc("320x240", seconds, rate)]
    graph = "".join(f"[{i}:v]settb=1/600[s{i}];" for i in range(len(rates)))
    graph += "".join(f"[s{i}]" for i in range(len(rates))) + f"concat=n={len(rates)}:v=1[v]"
    timescale = ["-video_track_timescale", "600"] if path.suffix == ".mov" else []
    codec = ["libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"] if path.suffix == ".webm" else ["libx264", "-preset", "ultrafast"]
    ffmpeg(*inputs, "-filter_complex", graph, "-map", "[v]", "-fps_mode", "passthrough", "-enc_time_base", "1/600",
           "-c:v", *codec, "-pix_fmt", "yuv420p", *timescale, str(path))
    return path


def packed_sound(path: Path, seconds: float, rate: int) -> Path:
    """A 64x64 video at 1 fps in Matroska beside PCM sound of one sample a packet: `rate` packets a second."""
    ffmpeg(*_testsrc("64x64", seconds, 1), "-f", "lavfi", "-i", f"anullsrc=r={rate}:cl=mono", "-t", str(seconds),
           "-af", "asetnsamples=n=1", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           "-c:a", "pcm_s16le", str(path))
    return path


def black_lead_in(path: Path, seconds_black: float = 2.0) -> Path:
    """Black for the first seconds, then a bright test picture."""
    ffmpeg("-f", "lavfi", "-i", f"color=black:size=320x240:rate=30:duration={seconds_black}",
           *_testsrc("320x240", 1.0), "-filter_complex", "[0:v][1:v]concat=n=2:v=1[v]", "-map", "[v]",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path))
    return path


def tiny(path: Path) -> Path:
    """A 1x1 video (4:4:4, which H.264 allows at odd sizes)."""
    ffmpeg("-f", "lavfi", "-i", "color=red:size=16x16:rate=30:duration=0.5", "-vf", "scale=1:1", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p", str(path))
    return path


def vp9(path: Path, seconds: float = 1.0) -> Path:
    """320x240 VP9 in WebM, as Android and browsers record, encoded the same way every time (one thread)."""
    ffmpeg(*_testsrc("320x240", seconds), "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-threads", "1",
           "-pix_fmt", "yuv420p", str(path))
    return path


def broken_frame(path: Path, source: Path, frame: int = 10) -> Path:
    """source (WebM) with 16 bytes of a frame's compressed data, 8 bytes in, zeroed: a frame VP9's
    decoder refuses without a word in FFmpeg's log, every container byte left intact."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pos", "-of", "csv=p=0",
                          str(source)], check=True, capture_output=True, text=True).stdout
    # A block's data starts after its track number, timecode and flags (4 bytes).
    start = int(out.split()[frame].strip(",")) + 4 + 8
    data = bytearray(source.read_bytes())
    data[start:start + 16] = bytes(16)
    path.write_bytes(bytes(data))
    return path


def truncated(path: Path, source: Path) -> Path:
    """The first half of an MP4 whose index (moov) comes last: the index is gone."""
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _boxes(data: bytes | bytearray, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """The ISO BMFF boxes between start and end: (type, start, end) each."""
    found = []
    while start < end:
        size, kind = struct.unpack_from(">I4s", data, start)
        found.append((kind, start, start + size))
        start += size
    return found


def claims(path: Path, source: Path, seconds: float) -> Path:
    """source with every duration its headers state (mvhd, tkhd, mdhd; version 0) set to `seconds`,
    its sample table (every frame) left as it is."""
    data = bytearray(source.read_bytes())

    def rewrite(start: int, end: int, movie_timescale: int = 0) -> None:
        for kind, at, box_end in _boxes(data, start, end):
            if kind in (b"mvhd", b"mdhd"):
                # size, type, version/flags, creation, modification, timescale, duration
                timescale = struct.unpack_from(">I", data, at + 20)[0]
                struct.pack_into(">I", data, at + 24, int(timescale * seconds))
                if kind == b"mvhd":
                    movie_timescale = timescale
            elif kind == b"tkhd":
                # ... creation, modification, track id, reserved, duration (in the movie's timescale)
                struct.pack_into(">I", data, at + 28, int(movie_timescale * seconds))
            elif kind in (b"moov", b"trak", b"mdia"):
                rewrite(at + 8, box_end, movie_timescale)

    rewrite(0, len(data))
    path.write_bytes(bytes(data))
    return path


def _child(data: bytes | bytearray, start: int, end: int, kind: bytes) -> tuple[int, int]:
    """The first box of that type between start and end: (start, end)."""
    return next((at, box_end) for found, at, box_end in _boxes(data, start, end) if found == kind)


def edited(path: Path, source: Path, start: float, seconds: float, track: int = 0) -> Path:
    """source (made by `h264`: ffmpeg gives each track an edit list of one edit) with the edit of its
    track number `track` (0: the video's, 1: the sound's) starting `start` seconds into the track's
    media and lasting `seconds`, past the media's end if asked, and the track's and the movie's
    durations (tkhd, mvhd; version 0) stretched to match."""
    data = bytearray(source.read_bytes())
    moov = _child(data, 0, len(data), b"moov")
    mvhd = _child(data, moov[0] + 8, moov[1], b"mvhd")
    trak = [(at, end) for kind, at, end in _boxes(data, moov[0] + 8, moov[1]) if kind == b"trak"][track]
    edts = _child(data, trak[0] + 8, trak[1], b"edts")
    elst = _child(data, edts[0] + 8, edts[1], b"elst")
    mdia = _child(data, trak[0] + 8, trak[1], b"mdia")
    mdhd = _child(data, mdia[0] + 8, mdia[1], b"mdhd")
    movie_timescale = struct.unpack_from(">I", data, mvhd[0] + 20)[0]
    media_timescale = struct.unpack_from(">I", data, mdhd[0] + 20)[0]
    # elst: size, type, version/flags, entry count; then each edit's duration (the movie's
    # timescale), where it starts in the media (the media's timescale) and its rate.
    assert struct.unpack_from(">II", data, elst[0] + 8) == (0, 1)
    edit = round(seconds * movie_timescale)
    struct.pack_into(">Ii", data, elst[0] + 16, edit, round(start * media_timescale))
    struct.pack_into(">I", data, _child(data, trak[0] + 8, trak[1], b"tkhd")[0] + 28, edit)
    struct.pack_into(">I", data, mvhd[0] + 24, max(edit, struct.unpack_from(">I", data, mvhd[0] + 24)[0]))
    path.write_bytes(bytes(data))
    return path


def turned(path: Path, source: Path, degrees: float | None) -> Path:
    """source with its video track's matrix (tkhd, version 0) turning the picture by `degrees`, any
    angle, as a hostile or odd writer may store it; None for an all-zero matrix, which turns nothing."""
    data = bytearray(source.read_bytes())
    turn = math.radians(degrees or 0.0)
    cos, sin = (0, 0) if degrees is None else (round(math.cos(turn) * 65536), round(math.sin(turn) * 65536))

    def rewrite(start: int, end: int) -> None:
        for kind, at, box_end in _boxes(data, start, end):
            if kind == b"tkhd":
                # size, type, version/flags, creation, modification, track id, reserved, duration,
                # reserved (8), layer, group, volume, reserved: then a, b, u, c, d, v, x, y, w.
                struct.pack_into(">9i", data, at + 48, cos, sin, 0, -sin, cos, 0, 0, 0, 1 << 30)
            elif kind in (b"moov", b"trak"):
                rewrite(at + 8, box_end)

    rewrite(0, len(data))
    path.write_bytes(bytes(data))
    return path


def cover_first(path: Path, source: Path) -> Path:
    """source with a cover picture (a red 64x64 PNG) whose stream comes before the video's: the
    cover's box (moov/udta) moved in front of the first trak, so FFmpeg's demuxer numbers it 0."""
    cover = path.with_suffix(".png")
    ffmpeg("-f", "lavfi", "-i", "color=red:size=64x64", "-frames:v", "1", str(cover))
    covered = path.with_suffix(".covered.mp4")
    ffmpeg("-i", str(source), "-i", str(cover), "-map", "0", "-map", "1", "-c", "copy", "-disposition:v:1", "attached_pic",
           str(covered))
    data = covered.read_bytes()
    out = bytearray()
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind != b"moov":
            out += data[start:end]
            continue
        children = _boxes(data, start + 8, end)
        udta = [c for c in children if c[0] == b"udta"]
        rest = [c for c in children if c[0] != b"udta"]
        first_trak = next(i for i, c in enumerate(rest) if c[0] == b"trak")
        # The same boxes in another order: moov keeps its size, so every chunk offset stays right.
        out += data[start:start + 8] + b"".join(data[s:e] for _, s, e in rest[:first_trak] + udta + rest[first_trak:])
    path.write_bytes(bytes(out))
    cover.unlink()
    covered.unlink()
    return path


def blank_png(path: Path, side: int) -> Path:
    """A black side x side RGB PNG, written row by row: a few hundred KB that decode to side² x 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + side * 3)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def with_stream(path: Path, source: Path, *extra: str) -> Path:
    """source with one more stream, the output of ffmpeg's input and encoding arguments extra, copied
    into path beside the source's streams (the extra one last)."""
    ffmpeg("-i", str(source), *extra, "-map", "0", "-map", "1", "-c:v:0", "copy", "-c:a", "copy", str(path))
    return path


def size_switch(path: Path, first: str, then: str) -> Path:
    """H.264 in MP4 whose first SPS (what the container reports) is `first`, and whose stream then
    switches to `then` with an SPS of its own, as concatenated camera streams or a hostile file do."""
    parts = []
    for size in (first, then):
        part = path.with_suffix(f".{size}.h264")
        ffmpeg(*_testsrc(size, 0.5), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-f", "h264", str(part))
        parts.append(part)
    joined = path.with_suffix(".h264")
    joined.write_bytes(b"".join(part.read_bytes() for part in parts))
    ffmpeg("-f", "h264", "-framerate", "30", "-i", str(joined), "-c", "copy", str(path))
    for part in (*parts, joined):
        part.unlink()
    return path


def dubbed(path: Path, *tracks: tuple[str, int]) -> Path:
    """1 s of 320x240 H.264 with one sound track per (codec, sample rate), in that order; the
    container is path's suffix's (.mkv for Matroska, .mov for QuickTime)."""
    sounds = [arg for _, rate in tracks for arg in ("-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration=1")]
    maps = [arg for i in range(len(tracks) + 1) for arg in ("-map", str(i))]
    codecs = [arg for i, (codec, _) in enumerate(tracks) for arg in (f"-c:a:{i}", codec)]
    ffmpeg(*_testsrc("320x240", 1.0), *sounds, *maps, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           *codecs, str(path))
    return path


def many_channels(path: Path, channels: int) -> Path:
    """1 s of 320x240 H.264 beside 16-bit PCM of `channels` channels, each a tone of its own (220 Hz,
    440, ...), and no channel layout stated; the container is path's suffix's (.mkv, .mov)."""
    tones = "|".join(f"0.5*sin({220 * (i + 1)}*2*PI*t)" for i in range(channels))
    ffmpeg(*_testsrc("320x240", 1.0), "-f", "lavfi", "-i", f"aevalsrc={tones}:s=48000:d=1", "-c:v", "libx264", "-preset",
           "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "pcm_s16le", str(path))
    return path


def late_sound(path: Path, seconds: float = 3.0, delay: float = 2.0) -> Path:
    """320x240 H.264 of `seconds` with a 1 s tone in AAC from `delay` seconds in: ffmpeg's muxer puts an
    empty edit before the sound's."""
    ffmpeg(*_testsrc("320x240", seconds), "-itsoffset", str(delay), *_tone(1.0), "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", "-c:a", "aac", str(path))
    return path


def late_picture(path: Path, seconds: float = 3.0, delay: float = 1.0) -> Path:
    """A 440 Hz tone in AAC of `seconds`, beside 320x240 H.264 from `delay` seconds in to the end: in MP4
    or QuickTime behind an empty edit, in Matroska a track whose first block comes later. The frames
    as they come (for MP4, ffmpeg would fill the delay with copies of the first frame)."""
    ffmpeg("-itsoffset", str(delay), *_testsrc("320x240", seconds - delay), *_tone(seconds), "-c:v", "libx264", "-preset",
           "ultrafast", "-pix_fmt", "yuv420p", "-fps_mode", "passthrough", "-c:a", "aac", str(path))
    return path


def delayed_picture(path: Path, source: Path, delay: float) -> Path:
    """source's video, its frames copied as they are, from `delay` seconds in, beside a 440 Hz tone in
    AAC from 0 to its end: in MP4 behind an empty edit."""
    seconds = delay + float(probe(source)["format"]["duration"])
    ffmpeg("-itsoffset", str(delay), "-i", str(source), *_tone(seconds), "-map", "0:v", "-map", "1:a", "-c:v", "copy",
           "-c:a", "aac", str(path))
    return path


def late_black_lead_in(path: Path, delay: float = 2.0, seconds_black: float = 2.0) -> Path:
    """A 440 Hz tone in AAC, beside 320x240 H.264 from `delay` seconds in that is black for its first
    `seconds_black`, then a bright test picture for 2 s: in MP4 behind an empty edit."""
    ffmpeg("-f", "lavfi", "-i", f"color=black:size=320x240:rate=30:duration={seconds_black}", *_testsrc("320x240", 2.0),
           *_tone(delay + seconds_black + 2.0), "-filter_complex", f"[0:v][1:v]concat=n=2:v=1,setpts=PTS+{delay}/TB[v]",
           "-map", "[v]", "-map", "2:a", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           "-fps_mode", "passthrough", "-c:a", "aac", str(path))
    return path


def gapped_sound(path: Path, seconds: float = 4.0, at: float = 1.0, gap: float = 2.0) -> Path:
    """320x240 H.264 of `seconds` with a tone in AAC that stops at `at` seconds and starts again `gap`
    seconds later: its timestamps jump, which MP4 can only say with a packet that lasts `gap` longer
    than its samples."""
    ffmpeg(*_testsrc("320x240", seconds), *_tone(seconds - gap), "-filter_complex",
           f"[1:a]asetpts='if(gte(T,{at}),PTS+{gap}/TB,PTS)'[a]", "-map", "0:v", "-map", "[a]",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path))
    return path


def sound_only(path: Path, codec: str = "aac", *, cover: bool = False) -> Path:
    """1 s of a tone and nothing else in path's container (.m4a, as a phone's voice memo; .webm), with a
    cover picture (a red 64x64 PNG, attached) if asked."""
    ffmpeg(*_tone(1.0), "-c:a", codec, str(path))
    if cover:
        picture = path.with_suffix(".png")
        ffmpeg("-f", "lavfi", "-i", "color=red:size=64x64", "-frames:v", "1", str(picture))
        bare = path.with_suffix(f".bare{path.suffix}")
        path.rename(bare)
        ffmpeg("-i", str(bare), "-i", str(picture), "-map", "0", "-map", "1", "-c", "copy", "-disposition:v:0", "attached_pic",
               str(path))
        picture.unlink()
        bare.unlink()
    return path


def silences(path: Path, *, edit_lists: bool = True) -> list[tuple[float, float]]:
    """The stretches of path's sound quieter than -50 dB for 10 ms or more, (start, end) in seconds,
    as ffmpeg decodes it; with edit_lists False, as a player that ignores MP4 edit lists plays it (every
    sample, from the track's start)."""
    log = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", *([] if edit_lists else ["-ignore_editlist", "1"]),
                          "-i", str(path), "-map", "0:a", "-af", "silencedetect=noise=-50dB:duration=0.01", "-f", "null", "-"],
                         check=True, capture_output=True, text=True).stderr
    starts = [float(value) for value in re.findall(r"silence_start: (\S+)", log)]
    ends = [float(value) for value in re.findall(r"silence_end: (\S+)", log)]
    return list(zip(starts, ends, strict=False))


def edit_lists(path: Path) -> list[list[tuple[int, int]]]:
    """Each track's MP4 edit list (elst; version 0 or 1), in track order: (duration, media time) per
    edit, the media time -1 for an empty edit (time in which the track shows nothing)."""
    data = path.read_bytes()
    moov = _child(data, 0, len(data), b"moov")
    lists = []
    for kind, start, end in _boxes(data, moov[0] + 8, moov[1]):
        if kind != b"trak":
            continue
        edits = []
        for found, at, edts_end in _boxes(data, start + 8, end):
            if found == b"edts":
                elst = _child(data, at + 8, edts_end, b"elst")
                version, count = data[elst[0] + 8], struct.unpack_from(">I", data, elst[0] + 12)[0]
                entry = ">Qq" if version else ">Ii"
                edits = [struct.unpack_from(entry, data, elst[0] + 16 + i * (struct.calcsize(entry) + 4)) for i in range(count)]
        lists.append(edits)
    return lists


def picture(path: Path, seconds: float) -> Image.Image:
    """What path shows at `seconds` (its first frame from then on, edit lists applied), at 80x60 in RGB
    read as its colour tags say."""
    pixels = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-ss", str(seconds), "-frames:v", "1", "-vf",
                             "scale=80:60,format=rgb24", "-f", "rawvideo", "-"], check=True, capture_output=True).stdout
    return Image.frombytes("RGB", (80, 60), pixels)


def channel_levels(path: Path) -> list[float]:
    """The RMS level of each channel of path's sound in dBFS, as ffmpeg decodes it (-inf for silence)."""
    log = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:a", "-af", "astats=measure_overall=none",
                          "-f", "null", "-"], check=True, capture_output=True, text=True).stderr
    return [float(value) for value in re.findall(r"RMS level dB: (\S+)", log)]


def unknown_codec(path: Path, source: Path, fourcc: bytes, unknown: bytes = b"apac") -> Path:
    """source with the sample entry `fourcc` (once in the file) renamed `unknown`, a codec FFmpeg does
    not know (APAC, an iPhone's spatial audio, is not in Debian's FFmpeg 5.1)."""
    data = source.read_bytes()
    assert data.count(fourcc) == 1
    path.write_bytes(data.replace(fourcc, unknown))
    return path


def tagged(path: Path, key: str, value: str) -> Path:
    """1 s of 320x240 H.264 in Matroska whose video stream carries the tag key=value. ffmpeg turns a
    "rotate" tag into a display matrix or drops it, so the tag is written under a stand-in name of the
    same length and renamed in the file's bytes."""
    stand_in = "X" * len(key)
    ffmpeg(*_testsrc("320x240", 1.0), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           "-metadata:s:v:0", f"{stand_in}={value}", str(path))
    data = path.read_bytes()
    assert data.count(stand_in.encode()) == 1
    path.write_bytes(data.replace(stand_in.encode(), key.encode()))
    return path


def probe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_streams", "-show_format", str(path)],
                         check=True, capture_output=True).stdout
    return json.loads(out)


def rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", ()):
        if "rotation" in side:
            return int(side["rotation"])
    return int(stream.get("tags", {}).get("rotate", 0))


def autorotated_size(path: Path) -> tuple[int, int]:
    """The size of path's first frame as the ffmpeg CLI gives it, turned by its autorotate."""
    png = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-c:v", "png", "-f", "image2pipe", "-"],
                         check=True, capture_output=True).stdout
    # The PNG signature, then the IHDR chunk's length and type, then its width and height.
    width, height = struct.unpack_from(">II", png, 16)
    return width, height


def check_rendition(path: Path, *, width: int, height: int, duration: float, audio: bool) -> dict:
    """Asserts what every rendition must be, from ffprobe and a full decode; returns the video stream."""
    report = probe(path)
    video = [s for s in report["streams"] if s["codec_type"] == "video"]
    sound = [s for s in report["streams"] if s["codec_type"] == "audio"]
    assert len(video) == 1
    stream = video[0]
    assert stream["codec_name"] == "h264"
    assert stream["profile"] == "High"
    assert stream["pix_fmt"] == "yuv420p"
    assert (stream["width"], stream["height"]) == (width, height)
    assert stream.get("sample_aspect_ratio", "1:1") in ("1:1", "0:1")
    assert rotation(stream) == 0
    assert abs(float(report["format"]["duration"]) - duration) <= 0.1, report["format"]["duration"]
    assert float(stream["avg_frame_rate"].split("/")[0]) / float(stream["avg_frame_rate"].split("/")[1]) <= 30.01
    if audio:
        assert len(sound) == 1
        assert sound[0]["codec_name"] == "aac"
        assert sound[0]["profile"] == "LC"
        assert sound[0]["channels"] == 2
    else:
        assert not sound
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat"), "the index comes before the media data (+faststart)"
    # Every frame decodes without an error.
    subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "null", "-"], check=True)
    return stream


def frame_count(path: Path) -> int:
    """The video frames a full decode of path gives."""
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames", "-of", "csv=p=0", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout)


def frame_times(path: Path, *, keyframes: bool = False, edit_lists: bool = True) -> list[float]:
    """The times of path's video frames (or of its keyframes only), in order, to the millisecond, by
    their packets: nothing decoded. With edit_lists False, as a player that ignores MP4 edit lists
    shows them (from the track's start)."""
    out = subprocess.run(["ffprobe", "-v", "error", *([] if edit_lists else ["-ignore_editlist", "1"]), "-select_streams", "v:0", "-show_entries", "packet=pts_time,flags", "-of",
                          "csv=p=0", str(path)], check=True, capture_output=True, text=True).stdout
    packets = [line.split(",") for line in out.split() if line.strip(",")]
    return sorted(round(float(fields[0]), 3) for fields in packets if not keyframes or "K" in fields[1])


def ssim(a: Path, b: Path) -> float:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-i", str(a), "-i", str(b), "-lavfi", "ssim", "-f", "null", "-"],
                         check=True, capture_output=True, text=True).stderr
    return float(out.rsplit("All:", 1)[1].split()[0])


def mean_saturation(path: Path) -> float:
    """Mean HSV saturation (0-255) over every frame, decoded with PyAV."""
    import av

    total, count = 0.0, 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            hsv = frame.to_image().convert("HSV")
            saturation = hsv.getchannel("S")
            total += sum(saturation.get_flattened_data()) / (saturation.width * saturation.height)
            count += 1
    return total / count
