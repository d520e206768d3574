"""imaging.video: probing and limits from the container, the ladder, and renditions checked by decoding."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mediavault.imaging import ImagingError, PermanentImagingError, transcode
from mediavault.imaging import video as videos
from mediavault.imaging.decode import NEAR_BLACK_LUMA, decode_poster
from mediavault.imaging.pipeline import transcode_poster
from mediavault.imaging.spec import DEFAULT_LIMITS
from tests import videos as make
from tests.conftest import CORPUS
from tests.imaging.helpers import mean_difference
from tests.workers.test_transcode import children_of

_DEFAULT_LIMITS = videos.VideoLimits()
_TWO_SECONDS = videos.VideoLimits(max_duration_seconds=2.0)


async def _always(_done: float) -> bool:
    return True


async def _transcode(path: Path, mime: str, out: Path, limits: videos.VideoLimits = _DEFAULT_LIMITS):
    source = await videos.probe(path, mime, limits)
    out.mkdir(exist_ok=True)
    made = await videos.transcode(path, mime, source, out, limits=limits, timeout_seconds=60, on_progress=_always, threads=1)
    return source, made


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clips")


async def test_iphone_hlg_hevc_rotated_becomes_upright_sdr_h264(clips):
    source_path = make.hlg_rotated_mov(clips / "iphone.mov")
    source, made = await _transcode(source_path, "video/quicktime", clips / "iphone")
    assert (source.codec, source.is_hdr, source.has_audio) == ("hevc", True, True)
    # 320x240 frames with a quarter turn are shown 240x320; below 360p, nothing is upscaled.
    assert (source.width, source.height) == (240, 320)
    assert [(r.name, r.width, r.height) for r in made] == [("360p", 240, 320)]
    stream = make.check_rendition(made[0].path, width=240, height=320, duration=1.0, audio=True)
    assert (stream["color_transfer"], stream["color_primaries"]) == ("bt709", "bt709")
    assert made[0].size_bytes == made[0].path.stat().st_size
    assert made[0].bitrate > 0


@pytest.mark.parametrize(
    ("name", "colour", "transfer", "x265"),
    [
        ("hlg", make.HLG, "arib-std-b67", ""),
        ("pq", make.PQ, "smpte2084", ""),
        # HLG said only in an alternative-transfer-characteristics SEI (18: HLG), as some cameras
        # write it: the stream's transfer is BT.2020's SDR one, its frames' HLG.
        ("hlg-sei", make.BT2020_SDR, "bt2020-10", ":atc-sei=18"),
    ],
)
async def test_hdr_is_tone_mapped_like_the_zscale_reference(clips, name, colour, transfer, x265):
    source_path = make.hdr(clips / f"{name}.mp4", colour, transfer, x265=x265)
    source, made = await _transcode(source_path, "video/mp4", clips / name)
    assert source.is_hdr
    reference = clips / f"{name}-reference.mp4"
    make.ffmpeg("-i", str(source_path), "-vf", "zscale=t=linear,tonemap=hable,zscale=t=bt709:m=bt709:p=bt709,format=yuv420p",
                "-c:v", "libx264", "-crf", "12", str(reference))
    assert make.ssim(made[0].path, reference) >= 0.90
    ours, theirs = make.mean_saturation(made[0].path), make.mean_saturation(reference)
    assert abs(ours - theirs) <= 0.15 * theirs, (ours, theirs)
    # Not merely decodable: an untouched HLG/PQ signal shown as SDR is grey and washed out.
    washed = clips / f"{name}-untouched.mp4"
    make.ffmpeg("-i", str(source_path), "-pix_fmt", "yuv420p", "-c:v", "libx264", "-crf", "12", str(washed))
    assert make.ssim(washed, reference) < make.ssim(made[0].path, reference)


@pytest.mark.parametrize(
    "build",
    [
        # An Android phone's: full range, BT.601 (bt470bg), yuvj420p.
        lambda d: make.bars(d / "android.mp4", "1280x720", matrix="bt470bg", full_range=True),
        lambda d: make.bars(d / "sd.mp4", "640x480", matrix="smpte170m"),
        lambda d: make.bt2020_sdr_bars(d / "bt2020.mp4"),
        # Untagged: BT.709 in HD, BT.601 in SD, as players read them.
        lambda d: make.bars(d / "untagged-hd.mp4", "1280x720"),
        lambda d: make.bars(d / "untagged-sd.mp4", "640x480"),
    ],
    ids=["bt601-full-range", "bt601-limited", "bt2020-sdr", "untagged-hd", "untagged-sd"],
)
async def test_colours_of_a_source_not_in_bt709_are_the_renditions_colours(tmp_path, build):
    source_path = build(tmp_path)
    _, made = await _transcode(source_path, "video/mp4", tmp_path / "out")
    expected = make.bar_colours(source_path)
    for rendition in made:
        stream = make.probe(rendition.path)["streams"][0]
        assert (stream["color_space"], stream["color_primaries"], stream["color_range"]) == ("bt709", "bt709", "tv")
        shown = make.bar_colours(rendition.path)
        assert all(abs(a - b) <= 6 for bar, seen in zip(expected, shown, strict=True) for a, b in zip(bar, seen, strict=True)), (
            expected, shown)


@pytest.mark.parametrize(
    ("size", "rungs"),
    [
        ("320x240", [("360p", 320, 240)]),
        ("480x360", [("360p", 480, 360)]),
        ("720x1280", [("360p", 360, 640), ("720p", 720, 1280)]),
        ("1920x1080", [("360p", 640, 360), ("720p", 1280, 720), ("1080p", 1920, 1080)]),
    ],
)
async def test_the_ladder_follows_the_source_and_never_upscales(clips, size, rungs):
    seconds = 0.5 if size == "1920x1080" else 1.0
    source_path = make.h264(clips / f"{size}.mp4", size, seconds)
    _, made = await _transcode(source_path, "video/mp4", clips / size)
    assert [(r.name, r.width, r.height) for r in made] == rungs
    for rendition in made:
        make.check_rendition(rendition.path, width=rendition.width, height=rendition.height, duration=seconds, audio=True)


def _shown(width: int, height: int) -> videos.Source:
    return videos.Source(codec="h264", video_index=0, audio_index=None, coded_width=width, coded_height=height, width=width,
                         height=height, rotation=0, duration_seconds=1.0, start_seconds=0.0, frame_rate=30.0, transfer="")


@pytest.mark.parametrize(
    ("width", "height", "sizes"),
    [
        (1440, 1080, [(480, 360), (960, 720), (1440, 1080)]),
        (2400, 1000, [(640, 266), (1280, 534), (1920, 800)]),
        (1300, 300, [(640, 148), (1280, 296)]),
        (3840, 2160, [(640, 360), (1280, 720), (1920, 1080)]),
        (1080, 2400, [(288, 640), (576, 1280), (864, 1920)]),
    ],
)
def test_every_rung_fits_its_16_9_box_either_way_up(width, height, sizes):
    assert [(p.width, p.height) for p in videos.plan(_shown(width, height))] == sizes


async def test_a_tall_screen_recordings_1080p_rung_is_within_level_4(clips):
    _, made = await _transcode(make.h264(clips / "screen.mp4", "1080x2400", 0.5, audio=False), "video/mp4", clips / "screen")
    assert [(r.name, r.width, r.height) for r in made] == [("360p", 288, 640), ("720p", 576, 1280), ("1080p", 864, 1920)]
    for rendition in made:
        make.check_rendition(rendition.path, width=rendition.width, height=rendition.height, duration=0.5, audio=False)
    assert make.probe(made[-1].path)["streams"][0]["level"] <= 40


async def test_anamorphic_pixels_become_square(clips):
    source, made = await _transcode(make.anamorphic(clips / "anamorphic.mp4"), "video/mp4", clips / "anamorphic")
    assert (source.coded_width, source.width, source.height) == (480, 640, 360)
    make.check_rendition(made[0].path, width=640, height=360, duration=1.0, audio=False)


async def test_a_silent_source_gives_silent_renditions(clips):
    _, made = await _transcode(make.h264(clips / "silent.mp4", audio=False), "video/mp4", clips / "silent")
    make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=False)


async def test_sixty_fps_is_halved_and_vfr_keeps_its_length(clips):
    _, made = await _transcode(make.h264(clips / "60.mp4", rate=60, audio=False), "video/mp4", clips / "60")
    stream = make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=False)
    assert stream["avg_frame_rate"] == "30/1"
    source, made = await _transcode(make.vfr(clips / "vfr.mp4"), "video/mp4", clips / "vfr")
    make.check_rendition(made[0].path, width=320, height=240, duration=source.duration_seconds, audio=False)
    # Under the cap, every frame is kept at its time, none duplicated to a constant rate.
    assert make.frame_count(made[0].path) == make.frame_count(clips / "vfr.mp4")


async def test_a_variable_frame_rate_source_is_capped_by_its_bursts_not_its_average(clips):
    source_path = make.bursts(clips / "bursts.mp4")
    source, made = await _transcode(source_path, "video/mp4", clips / "bursts")
    assert make.probe(source_path)["streams"][0]["r_frame_rate"] == "60/1"
    assert source.frame_rate < videos.MAX_RENDITION_FPS, "the average, as Media.frame_rate reports it"
    times = make.frame_times(source_path)
    for rendition in made:
        make.check_rendition(rendition.path, width=rendition.width, height=rendition.height,
                             duration=source.duration_seconds, audio=False)
        kept = make.frame_times(rendition.path)
        # The bursts thinned to the cap; every frame kept at its own time, none duplicated.
        assert min(b - a for a, b in zip(kept, kept[1:], strict=False)) >= videos.MIN_FRAME_INTERVAL_SECONDS - 0.001
        assert set(kept) <= set(times)
        assert len(set(kept)) == len(kept)
        # A frame the cap's interval or more after the one before it is never dropped.
        assert {b for a, b in zip(times, times[1:], strict=False) if b - a >= 1 / videos.MAX_RENDITION_FPS} <= set(kept)
    # At 1080p, 30 fps is level 4.0; 60 fps would be 4.2, past what many phones decode.
    assert make.probe(made[-1].path)["streams"][0]["level"] <= 40


async def test_an_edit_list_past_the_end_of_its_media_ends_where_the_media_ends(clips):
    # A second of frames under an edit, and headers, of three seconds: ffmpeg, as players, ends the
    # video where its media ends, and the facts and the bitrate are those of that second.
    path = make.edited(clips / "edit-past-end.mp4", make.h264(clips / "edit-1s.mp4"), start=0.0, seconds=3.0)
    assert float(make.probe(path)["format"]["duration"]) == 3.0
    source, made = await _transcode(path, "video/mp4", clips / "edit-past-end")
    assert source.duration_seconds == pytest.approx(1.0, abs=0.05)
    make.check_rendition(made[0].path, width=320, height=240, duration=source.duration_seconds, audio=True)
    assert make.frame_count(made[0].path) == 30
    assert made[0].bitrate == pytest.approx(made[0].size_bytes * 8 / 1.0, rel=0.05)
    poster = transcode_poster(made[0].path, "video/mp4")
    assert (poster.width, poster.height) == (320, 240)


async def test_a_sound_that_its_edit_list_shows_none_of_is_no_sound(clips):
    # The sound's one edit starts after its second of samples and lasts 3 s. ffmpeg keeps its last
    # packet, which its demuxer takes to last as long as the edit, and the decoder drops its samples:
    # the renditions were silent while the source was said to have sound, and as long as that
    # packet's stretched end.
    plain = make.h264(clips / "sound-edited.mp4")
    path = make.edited(clips / "sound-edit-after.mp4", plain, start=2.0, seconds=3.0, track=1)
    source, made = await _transcode(path, "video/mp4", clips / "sound-edit-after")
    assert (source.has_audio, source.audio_index) == (False, None)
    assert source.duration_seconds == pytest.approx(1.0, abs=0.01)
    make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=False)
    # An edit that starts inside the sound's media still has half a second of it heard.
    path = make.edited(clips / "sound-edit-inside.mp4", plain, start=0.5, seconds=0.5, track=1)
    source, made = await _transcode(path, "video/mp4", clips / "sound-edit-inside")
    assert source.has_audio
    make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=True)
    sound = next(s for s in make.probe(made[0].path)["streams"] if s["codec_type"] == "audio")
    assert float(sound["duration"]) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(
    ("name", "mime"), [("stretches.mov", "video/quicktime"), ("stretches.mkv", "video/webm"), ("stretches.webm", "video/webm")]
)
async def test_a_variable_frame_rate_source_keeps_every_frame_at_its_time(clips, name, mime):
    # 24 fps, then 30, as a phone's clip that sped up when the light came back. The MOV's nominal
    # rate (r_frame_rate) is 120, the rate all its timestamps fit on: its renditions were made at a
    # constant 30 fps, the 24 fps stretch's frames duplicated. The H.264 Matroska file's header
    # average is its clock's 1000 fps: it was refused as "frame rate too high". The VP9 WebM's rates
    # are both 24, its first frames': the encoder's clock ran at 24 fps, and one frame in five of the
    # 30 fps stretch, meeting another on it, was dropped.
    path = make.stretches(clips / name, 24, 30)
    source, made = await _transcode(path, mime, clips / name.replace(".", "-"))
    for rendition in made:
        make.check_rendition(rendition.path, width=320, height=240, duration=source.duration_seconds, audio=False)
        assert make.frame_times(rendition.path) == make.frame_times(path)
        # A keyframe every 2 s of the frames' time, whatever their rate.
        assert {0.0, 2.0} <= set(make.frame_times(rendition.path, keyframes=True))
    # The frames' mean rate, start to start: 107 intervals in 3.97 s.
    assert source.frame_rate == pytest.approx((48 + 60 - 1) / (4 - 1 / 30), abs=0.01)


async def test_keyframes_after_a_gap_in_the_frames_come_2_s_apart(clips):
    # No frame from 2 s to 8 s. Keyframes were forced at every 2 s since 0, counted (gte(t,n_forced*2)):
    # the frames at 8.0, 8.033, 8.067 and 8.1 s were all forced, until the count caught up with their time.
    path = make.gapped_picture(clips / "gapped-picture.mp4")
    assert make.frame_times(path)[59:61] == [1.967, 8.0]
    _, made = await _transcode(path, "video/mp4", clips / "gapped-picture")
    for rendition in made:
        assert [t for t in make.frame_times(rendition.path, keyframes=True) if t >= 8.0] == [8.0, 10.0]


async def test_a_webm_that_states_no_duration_is_measured_from_its_packets(clips):
    # The corpus file is Matroska written live: no duration in its header.
    source, made = await _transcode(CORPUS / "video/test.webm", "video/webm", clips / "webm")
    assert 3.0 < source.duration_seconds < 3.2
    for rendition in made:
        make.check_rendition(rendition.path, width=rendition.width, height=rendition.height,
                             duration=source.duration_seconds, audio=source.has_audio)


@pytest.mark.parametrize(
    "tags",
    [
        {"color_trc": "smpte2084"},
        {"color_trc": "arib-std-b67", "colorspace": "bt2020nc"},
        {"color_trc": "arib-std-b67", "color_primaries": "bt2020"},
        {"color_trc": "bt709", "color_primaries": "bt2020"},
    ],
    ids=["pq-alone", "hlg-without-primaries", "hlg-without-matrix", "bt2020-sdr-without-matrix"],
)
async def test_an_hdr_or_bt2020_source_that_leaves_out_its_primaries_or_matrix_is_read_as_bt2020(clips, tags):
    # zscale finds no path from unspecified primaries or matrix: the whole run failed, "corrupt video",
    # though every frame decodes. Left out, they are BT.2020's, the same renditions as when tagged so.
    name = "-".join(tags.values())
    source, made = await _transcode(make.colour_tagged(clips / f"{name}.mp4", **tags), "video/mp4", clips / name)
    make.check_rendition(made[0].path, width=320, height=240, duration=0.5, audio=False)
    tagged = make.colour_tagged(clips / f"{name}-all.mp4", **{"color_primaries": "bt2020", "colorspace": "bt2020nc", **tags})
    _, reference = await _transcode(tagged, "video/mp4", clips / f"{name}-all")
    assert make.ssim(made[0].path, reference[0].path) > 0.99


@pytest.mark.parametrize(
    ("build", "limits", "reason"),
    [
        (lambda d: make.claims(d / "long.mp4", make.h264(d / "short.mp4"), 36000), videos.VideoLimits(), videos.VIDEO_TOO_LONG),
        # Headers that understate: the packets hold 4 s.
        (lambda d: make.claims(d / "1s.mp4", make.h264(d / "4s.mp4", "64x48", 4.0, rate=10), 1), _TWO_SECONDS, videos.VIDEO_TOO_LONG),
        (lambda d: make.claims(d / "0s.mp4", make.h264(d / "4s.mp4", "64x48", 4.0, rate=10), 0), _TWO_SECONDS, videos.VIDEO_TOO_LONG),
        (lambda d: make.truncated(d / "cut.mp4", make.h264(d / "whole.mp4", faststart=False)), videos.VideoLimits(), "corrupt video"),
        (lambda d: make.tiny(d / "dot.mp4"), videos.VideoLimits(), videos.VIDEO_TOO_SMALL),
        # 16 px high itself, but 2 px in the 360p rendition's 640 px box.
        (lambda d: make.h264(d / "strip.mp4", "4096x16"), videos.VideoLimits(), videos.VIDEO_TOO_SMALL),
        (lambda d: make.h264(d / "wide.mp4"), videos.VideoLimits(max_long_side=300), videos.VIDEO_TOO_LARGE),
        (lambda d: make.h264(d / "fast.mp4", rate=60), videos.VideoLimits(max_frame_rate=50), videos.FRAME_RATE_TOO_HIGH),
        (lambda d: _write(d / "text.mp4", b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 100), videos.VideoLimits(), "corrupt video"),
        # Sound only in a codec off the allow-list: its decoder is never reached.
        (lambda d: make.dubbed(d / "adpcm.mov", ("adpcm_ima_qt", 44100)), videos.VideoLimits(), "unsupported format"),
        # The video's one edit starts after its second of frames: nothing of it is shown. ffmpeg made
        # renditions of the sound alone, and the poster failed once their work was done.
        (lambda d: make.edited(d / "edit-after.mp4", make.h264(d / "edited.mp4"), start=2.0, seconds=1.0), videos.VideoLimits(),
         "corrupt video"),
    ],
    ids=["claims-10h", "claims-1s-holds-4s", "claims-0s-holds-4s", "truncated", "1x1", "4096x16", "too-large", "too-fast", "garbage",
         "adpcm-sound", "edit-after-the-media"],
)
async def test_refused_from_the_container_before_decoding(tmp_path, build, limits, reason):
    path = build(tmp_path)
    with pytest.raises(PermanentImagingError) as refused:
        await videos.probe(path, "video/mp4", limits)
    assert refused.value.message == reason


@pytest.mark.parametrize(
    ("name", "codec", "cover", "mime"),
    [("memo.m4a", "aac", False, "video/mp4"), ("song.m4a", "aac", True, "video/mp4"), ("memo.webm", "libopus", False, "video/webm")],
    ids=["m4a", "m4a-with-cover", "opus-webm"],
)
async def test_sound_alone_is_an_unsupported_format_not_a_corrupt_video(tmp_path, name, codec, cover, mime):
    # Well formed, and sniffed as MP4 or WebM like a video; it was refused as "corrupt video".
    path = make.sound_only(tmp_path / name, codec, cover=cover)
    with pytest.raises(PermanentImagingError) as refused:
        await videos.probe(path, mime, _DEFAULT_LIMITS)
    assert refused.value.message == "unsupported format"


async def test_a_source_of_more_packets_than_the_limits_allow_is_refused(tmp_path):
    # 8,000 one-sample PCM packets in 1 s, where 10 s of sound may hold 4,000: each one would
    # cost the worker a line to parse, and a file of millions of them seconds of its CPU.
    path = make.packed_sound(tmp_path / "packed.mkv", 1.0, 8_000)
    with pytest.raises(PermanentImagingError) as refused:
        await videos.probe(path, "video/webm", videos.VideoLimits(max_duration_seconds=10.0))
    assert refused.value.message == videos.TOO_MANY_PACKETS


def _ffprobes() -> list[int]:
    return [pid for pid in children_of(os.getpid()) if _command(pid) == "ffprobe"]


@contextlib.contextmanager
def _never_written(path: Path):
    """A pipe nobody writes to: ffprobe waits to open it, a probe that never ends by itself."""
    os.mkfifo(path)
    try:
        yield path
    finally:
        # Whatever a failed assertion left behind would wait for ever.
        for pid in _ffprobes():
            os.kill(pid, signal.SIGKILL)


async def test_a_cancelled_probe_leaves_no_ffprobe_running(tmp_path):
    with _never_written(tmp_path / "never.mp4") as never:
        probing = asyncio.create_task(videos.probe(never, "video/mp4", _DEFAULT_LIMITS))
        while not _ffprobes():
            await asyncio.sleep(0.01)
        probing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probing
        assert not _ffprobes()


def _fed(fifo: Path, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError), fifo.open("wb") as reader:
        reader.write(data)


async def _waiting_run(probing: asyncio.Task, fifo: Path, data: bytes, run: int) -> int:
    """The ffprobe of a probe's run number `run`, from 0, waiting for its source: the probe reads it
    from a pipe, fed to each run before."""
    seen: set[int] = set()
    while True:
        while not (new := set(_ffprobes()) - seen):
            assert not probing.done(), probing
            await asyncio.sleep(0.01)
        if len(seen) == run:
            return new.pop()
        # Runs are one after the other: a new ffprobe means the last has exited, and no longer reads.
        seen |= new
        await asyncio.to_thread(_fed, fifo, data)


@pytest.mark.parametrize("run", [0, 1, 2], ids=["stated", "presented", "frame-transfer"])
async def test_a_probe_cancelled_in_any_of_its_runs_leaves_no_ffprobe_running(clips, tmp_path, run):
    """Each ffprobe run of a BT.2020 source that states an SDR transfer (three: its headers, its
    packets, its first frame's transfer)."""
    data = make.bt2020_sdr_bars(clips / "probed.mp4", size="320x240").read_bytes()
    with _never_written(tmp_path / "fed.mp4") as fifo:
        probing = asyncio.create_task(videos.probe(fifo, "video/mp4", _DEFAULT_LIMITS))
        await _waiting_run(probing, fifo, data, run)
        probing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probing
        assert not _ffprobes()


@pytest.mark.parametrize("run", [0, 1, 2], ids=["stated", "presented", "frame-transfer"])
async def test_an_ffprobe_killed_by_someone_else_fails_the_attempt_not_the_media(clips, tmp_path, run):
    """The host's OOM killer, say: the same bytes may pass next time, as they do for ffmpeg."""
    data = make.bt2020_sdr_bars(clips / "probed.mp4", size="320x240").read_bytes()
    with _never_written(tmp_path / "fed.mp4") as fifo:
        probing = asyncio.create_task(videos.probe(fifo, "video/mp4", _DEFAULT_LIMITS))
        os.kill(await _waiting_run(probing, fifo, data, run), signal.SIGKILL)
        with pytest.raises(ImagingError) as failed:
            await probing
    assert not isinstance(failed.value, PermanentImagingError), failed.value.message


async def test_the_probes_time_limit_is_one_over_all_its_runs(clips, tmp_path):
    """A BT.2020 source that states an SDR transfer is probed three times, its first frame last."""
    data = make.bt2020_sdr_bars(clips / "probed.mp4", size="320x240").read_bytes()
    with _never_written(tmp_path / "fed.mp4") as fifo:
        probing = asyncio.create_task(videos.probe(fifo, "video/mp4", videos.VideoLimits(max_probe_seconds=4.0)))
        await _waiting_run(probing, fifo, data, 2)
        with pytest.raises(PermanentImagingError) as refused:
            await probing
    assert refused.value.message == videos.PROBE_TIMED_OUT
    assert not _ffprobes()


async def test_the_probe_runs_under_the_memory_cap(tmp_path):
    """ffprobe's demuxer allocates what a container's tables claim: it runs under the cap ffmpeg does."""
    with _never_written(tmp_path / "never.mp4") as never:
        probing = asyncio.create_task(videos.probe(never, "video/mp4", _DEFAULT_LIMITS))
        while not (running := _ffprobes()):
            await asyncio.sleep(0.01)
        limits = Path(f"/proc/{running[0]}/limits").read_text().splitlines()
        probing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probing
    assert [line.split()[3] for line in limits if line.startswith("Max data size")] == [str(_DEFAULT_LIMITS.max_memory_bytes)]


async def test_a_probe_past_its_time_limit_fails_for_good_and_leaves_no_ffprobe_running(tmp_path):
    with _never_written(tmp_path / "never.mp4") as never, pytest.raises(PermanentImagingError) as refused:
        await videos.probe(never, "video/mp4", videos.VideoLimits(max_probe_seconds=0.5))
    assert refused.value.message == videos.PROBE_TIMED_OUT
    assert not _ffprobes()


# A worker whose terminal's Ctrl-C (a signal to its whole process group) it handles itself, by a
# drain that cancels its jobs to be retried, as run_workers does: here it does nothing, and the
# probe goes on to the verdict of its own time limit.
_PROBING_WORKER = """
import asyncio, signal, sys
from pathlib import Path
from mediavault.imaging import PermanentImagingError
from mediavault.imaging import video as videos

async def main():
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, lambda: None)
    try:
        await videos.probe(Path(sys.argv[1]), "video/mp4", videos.VideoLimits(max_probe_seconds=float(sys.argv[2])))
    except PermanentImagingError as refused:
        print(refused.message)

asyncio.run(main())
"""


async def test_a_signal_to_the_workers_process_group_does_not_end_its_probe(tmp_path):
    """A Ctrl-C in the worker's terminal reaches every process of its group: an ffprobe among them
    died of it, and the media was FAILED "corrupt video" by the signal meant for the worker's drain."""
    never = tmp_path / "never.mp4"
    os.mkfifo(never)
    worker = subprocess.Popen([sys.executable, "-c", _PROBING_WORKER, str(never), "3"], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    probes: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not (probes := [pid for pid in children_of(worker.pid) if _command(pid) == "ffprobe"]):
            assert time.monotonic() < deadline, "the worker started no ffprobe"
            await asyncio.sleep(0.01)
        os.killpg(worker.pid, signal.SIGINT)
        out, _ = await asyncio.to_thread(worker.communicate, timeout=30)
    finally:
        # Whatever a failed assertion left behind would wait for ever, the ffprobe in its session too.
        worker.kill()
        for pid in probes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert out.strip() == videos.PROBE_TIMED_OUT


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def test_a_cancelled_run_kills_ffmpeg_at_once(clips):
    source_path = make.h264(clips / "cancel.mp4", "1280x720", 4.0, audio=False)
    source = await videos.probe(source_path, "video/mp4", videos.VideoLimits())
    seen: list[float] = []

    async def cancel_at_first_report(done: float) -> bool:
        seen.append(done)
        return False

    with pytest.raises(videos.Cancelled):
        await videos.transcode(source_path, "video/mp4", source, clips, limits=videos.VideoLimits(), timeout_seconds=60, on_progress=cancel_at_first_report)
    assert len(seen) == 1
    assert seen[0] < 1.0


async def test_a_transcode_past_its_time_limit_fails_for_good(clips):
    source_path = make.h264(clips / "slow.mp4", "1280x720", 4.0, audio=False)
    source = await videos.probe(source_path, "video/mp4", videos.VideoLimits())
    with pytest.raises(PermanentImagingError) as refused:
        await videos.transcode(source_path, "video/mp4", source, clips, limits=videos.VideoLimits(), timeout_seconds=0.05, on_progress=_always)
    assert refused.value.message == "processing timed out"


@pytest.mark.parametrize(
    ("build", "threads", "megabytes"),
    [
        # x264 says its malloc failed.
        (lambda d: make.h264(d / "capped-1080.mp4", "1920x1080", 0.5, audio=False), 1, 64),
        # HEVC's frame threads fail to start, and ffmpeg says nothing at all.
        (lambda d: make.hdr(d / "capped-4k.mp4", make.HLG, "arib-std-b67", size="3840x2160", seconds=0.25,
                            preset="ultrafast"), 0, 128),
    ],
    ids=["1080p-x264", "4k-hevc-silent"],
)
async def test_a_run_past_its_memory_cap_fails_for_good_as_too_large_and_leaves_no_process(
    tmp_path, build, threads, megabytes
):
    source_path = build(tmp_path)
    capped = videos.VideoLimits(max_memory_bytes=megabytes * 1024 * 1024)
    source = await videos.probe(source_path, "video/mp4", capped)
    with pytest.raises(PermanentImagingError) as refused:
        await videos.transcode(source_path, "video/mp4", source, tmp_path, limits=capped, timeout_seconds=60,
                               on_progress=_always, threads=threads)
    assert refused.value.message == videos.VIDEO_TOO_LARGE
    # The session's other children (servers that fixtures started) are not this run's.
    assert not [pid for pid in children_of(os.getpid()) if _command(pid) in ("ffmpeg", "prlimit", "nice")]


async def test_a_stream_that_fails_to_decode_without_a_word_is_corrupt_not_too_large(clips):
    # ffmpeg's -xerror stops at VP9's refusal of this frame and its log says nothing: under the
    # memory cap, that silence was taken for an allocation that failed ("video too large").
    path = make.broken_frame(clips / "broken-frame.webm", make.vp9(clips / "whole.webm"))
    silent = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "null", "-"], capture_output=True)
    assert (silent.returncode, silent.stderr) == (1, b"")
    source = await videos.probe(path, "video/webm", _DEFAULT_LIMITS)
    (clips / "broken-frame").mkdir()
    with pytest.raises(PermanentImagingError) as refused:
        await videos.transcode(path, "video/webm", source, clips / "broken-frame", limits=_DEFAULT_LIMITS,
                               timeout_seconds=60, on_progress=_always, threads=1)
    assert refused.value.message == "corrupt video"


async def test_a_run_and_the_decode_that_names_its_error_share_one_time_limit(clips, monkeypatch):
    # The run stops at the broken frame without a word, and the streams are decoded again to name the
    # error. That decode had a time limit of its own: a run could last twice its limit, past the video
    # queue's job timeout for the longest videos, where arq cancelled it and left the media PROCESSING. Each ffmpeg
    # here starts 2 s late, so the two runs together outlast the 3 s limit and each alone does not.
    path = make.broken_frame(clips / "broken-late.webm", make.vp9(clips / "whole-late.webm"))
    source = await videos.probe(path, "video/webm", _DEFAULT_LIMITS)
    (clips / "broken-late").mkdir()
    capped = videos._capped
    monkeypatch.setattr(videos, "_capped", lambda limits: ["sh", "-c", 'sleep 2 && exec "$@"', "sh", *capped(limits)])
    started = time.monotonic()
    with pytest.raises(PermanentImagingError) as refused:
        await videos.transcode(path, "video/webm", source, clips / "broken-late", limits=_DEFAULT_LIMITS,
                               timeout_seconds=3, on_progress=_always, threads=1)
    assert refused.value.message == "processing timed out"
    assert time.monotonic() - started < 3.5


@pytest.mark.parametrize("processes", [1, 3], ids=["decoder-threads", "encoder-threads"])
async def test_a_thread_that_cannot_start_fails_the_attempt_not_the_media(monkeypatch, processes):
    # A limit on the processes and threads of ffmpeg's user, not its memory, refuses its threads
    # (EAGAIN): with one process, the decoder's frame threads; with three, x264's, and its encoder
    # does not open. Both were FAILED "video too large" for good, where the host is what failed.
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        work.chmod(0o777)
        source_path = make.h264(work / "threads.mp4")
        source_path.chmod(0o644)
        source = await videos.probe(source_path, "video/mp4", _DEFAULT_LIMITS)
        # RLIMIT_NPROC binds no process of root's: as root, ffmpeg runs as nobody.
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        monkeypatch.setattr(videos, "_capped", lambda limits: [
            *user, "prlimit", f"--nproc={processes}", f"--data={limits.max_memory_bytes}", "--"
        ])
        with pytest.raises(ImagingError) as failed:
            await videos.transcode(source_path, "video/mp4", source, work, limits=_DEFAULT_LIMITS, timeout_seconds=60,
                                   on_progress=_always, threads=2)
    assert not isinstance(failed.value, PermanentImagingError), failed.value.message
    assert failed.value.message.startswith("ffmpeg could not start: ")


async def test_ffmpeg_runs_under_its_memory_cap(clips):
    source_path = make.h264(clips / "cap.mp4", "640x360", 2.0, audio=False)
    source = await videos.probe(source_path, "video/mp4", _DEFAULT_LIMITS)
    seen: set[str] = set()

    async def look(_done: float) -> bool:
        for pid in children_of(os.getpid()):
            if _command(pid) == "ffmpeg":
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    seen.update(line.split()[3] for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                                if line.startswith("Max data size"))
        return True

    await videos.transcode(source_path, "video/mp4", source, clips, limits=_DEFAULT_LIMITS, timeout_seconds=60,
                           on_progress=look, threads=1)
    assert seen == {str(_DEFAULT_LIMITS.max_memory_bytes)}


def test_the_poster_skips_a_black_lead_in(clips):
    path = make.black_lead_in(clips / "fade.mp4")
    still = decode_poster(path, "video/mp4", DEFAULT_LIMITS)
    assert still.image.convert("L").resize((32, 32)).getextrema()[1] > 200
    assert sum(still.image.convert("L").resize((32, 32)).get_flattened_data()) / 1024 > NEAR_BLACK_LUMA


def test_an_all_black_start_past_the_search_window_gives_the_first_frame(clips):
    path = make.black_lead_in(clips / "long-fade.mp4", seconds_black=4.0)
    still = decode_poster(path, "video/mp4", DEFAULT_LIMITS)
    assert still.image.convert("L").getextrema()[1] < NEAR_BLACK_LUMA


def _command(pid: int) -> str:
    """The process's command name; empty once it has exited (a child listed a moment ago may be gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


async def test_an_ffmpeg_killed_by_someone_else_fails_the_attempt_not_the_media(clips):
    source_path = make.h264(clips / "oom.mp4", "1280x720", 4.0, audio=False)
    source = await videos.probe(source_path, "video/mp4", videos.VideoLimits())

    async def kill_ffmpeg(_done: float) -> bool:
        for pid in children_of(os.getpid()):
            if _command(pid) == "ffmpeg":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return True

    with pytest.raises(ImagingError) as failed:
        await videos.transcode(source_path, "video/mp4", source, clips, limits=videos.VideoLimits(), timeout_seconds=60, on_progress=kill_ffmpeg)
    assert not isinstance(failed.value, PermanentImagingError), "the OOM killer's victim is retried"


async def test_ffmpeg_runs_niced_in_a_session_of_its_own(clips):
    source_path = make.h264(clips / "niced.mp4", "640x360", 2.0, audio=False)
    source = await videos.probe(source_path, "video/mp4", _DEFAULT_LIMITS)
    seen: set[tuple[int, bool]] = set()

    async def look(_done: float) -> bool:
        for pid in children_of(os.getpid()):
            if _command(pid) == "ffmpeg":
                # /proc/<pid>/stat after the name: state, ppid, pgrp, session, ..., nice (the 17th).
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    seen.add((int(fields[16]), int(fields[3]) == pid))
        return True

    await videos.transcode(
        source_path, "video/mp4", source, clips, limits=_DEFAULT_LIMITS, timeout_seconds=60, on_progress=look, niceness=7
    )
    assert seen == {(7 + os.nice(0), True)}


def test_a_video_is_refused_as_bytes_and_its_poster_made_from_its_file(clips):
    path = make.h264(clips / "poster.mp4", "640x360", 1.0, audio=False)
    with pytest.raises(PermanentImagingError) as refused:
        transcode(path.read_bytes(), "video/mp4")
    assert refused.value.message == "unsupported format"
    result = transcode_poster(path, "video/mp4")
    assert result.kind == "video"
    assert (result.width, result.height) == (640, 360)
    assert sorted(v.name for v in result.variants) == ["poster", "preview", "thumbnail"]


_POSTER_PEAK_RSS = """
import resource, sys
from pathlib import Path
from mediavault.imaging.pipeline import transcode_poster
result = transcode_poster(Path(sys.argv[1]), "video/mp4")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, result.variants[0].data.hex())
"""


def test_a_posters_memory_does_not_grow_with_what_follows_the_first_frames(clips):
    # A long video's bytes after its first seconds are never read into memory: here 256 MiB of a
    # top-level free box after the media data (sparse on disk), which the poster must not cost.
    short = make.h264(clips / "short.mp4", "640x360", 1.0, audio=False)
    padded = clips / "padded.mp4"
    tail = 256 * 1024 * 1024
    with padded.open("wb") as f:
        f.write(short.read_bytes())
        f.write((tail + 8).to_bytes(4, "big") + b"free")
        f.truncate(f.tell() + tail)

    def poster(path: Path) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-c", _POSTER_PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
        peak_kib, picture = done.stdout.split()
        return int(peak_kib), picture

    short_peak, short_poster = poster(short)
    padded_peak, padded_poster = poster(padded)
    assert padded_poster == short_poster
    assert padded_peak - short_peak < 32 * 1024, (short_peak, padded_peak)


async def test_a_cover_picture_stored_before_the_video_is_not_what_the_renditions_show(clips):
    video = make.h264(clips / "uncovered.mp4", audio=False)
    source, made = await _transcode(make.cover_first(clips / "cover-first.mp4", video), "video/mp4", clips / "cover-first")
    make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=False)
    assert make.frame_count(made[0].path) == 30
    # The video's test pattern, not the red cover.
    assert make.ssim(made[0].path, video) >= 0.9
    assert (source.video_index, source.codec) == (1, "h264")


async def test_the_renditions_end_at_the_duration_limit_whatever_the_probe_let_through(clips):
    path = make.h264(clips / "four.mp4", "64x48", 4.0, audio=False, rate=10)
    source = await videos.probe(path, "video/mp4", videos.VideoLimits())
    (clips / "cut-at-limit").mkdir()
    made = await videos.transcode(path, "video/mp4", source, clips / "cut-at-limit", limits=_TWO_SECONDS, timeout_seconds=60,
                                  on_progress=_always, threads=1)
    make.check_rendition(made[0].path, width=64, height=48, duration=2.0, audio=False)


async def test_a_frame_past_the_size_limit_inside_the_stream_is_refused(clips):
    # A frame exactly at the limit decodes, though FFmpeg counts its width rounded up (200 -> 256).
    limits = videos.VideoLimits(max_long_side=200)
    _, made = await _transcode(make.h264(clips / "square.mp4", "200x200", 0.5, audio=False), "video/mp4", clips / "square", limits)
    make.check_rendition(made[0].path, width=200, height=200, duration=0.5, audio=False)
    # The container and the first SPS say 160x120; a later SPS switches to 320x240.
    path = make.size_switch(clips / "switch.mp4", "160x120", "320x240")
    source = await videos.probe(path, "video/mp4", limits)
    assert (source.coded_width, source.coded_height) == (160, 120)
    (clips / "switch").mkdir()
    with pytest.raises(PermanentImagingError) as refused:
        await videos.transcode(path, "video/mp4", source, clips / "switch", limits=limits, timeout_seconds=60,
                               on_progress=_always, threads=1)
    assert refused.value.message == videos.VIDEO_TOO_LARGE


async def test_sound_is_taken_only_from_an_allow_listed_codec(clips):
    only_tta = make.dubbed(clips / "tta.mkv", ("tta", 44100))
    with pytest.raises(PermanentImagingError) as refused:
        await videos.probe(only_tta, "video/webm", videos.VideoLimits())
    assert refused.value.message == "unsupported format"
    # An AAC track beside it does not help: FFmpeg would open TTA's decoder on the file to probe it.
    with pytest.raises(PermanentImagingError) as refused:
        await videos.probe(make.dubbed(clips / "tta-aac.mkv", ("tta", 22050), ("aac", 48000)), "video/webm", _DEFAULT_LIMITS)
    assert refused.value.message == "unsupported format"
    # Of two allowed tracks the first is the one the renditions carry.
    source, made = await _transcode(make.dubbed(clips / "mp3-aac.mkv", ("mp3", 22050), ("aac", 48000)), "video/webm",
                                    clips / "mp3-aac")
    assert (source.video_index, source.audio_index) == (0, 1)
    make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=True)
    assert [s["sample_rate"] for s in make.probe(made[0].path)["streams"] if s["codec_type"] == "audio"] == ["22050"]


async def test_a_sound_no_ffmpeg_decoder_reads_is_dropped_beside_an_allowed_one_and_refused_alone(clips):
    beside = make.unknown_codec(clips / "aac-apac.mov", make.dubbed(clips / "aac-pcm.mov", ("aac", 44100), ("pcm_s16le", 22050)),
                                b"sowt")
    streams = make.probe(beside)["streams"]
    assert [(s["codec_type"], s.get("codec_name")) for s in streams] == [("video", "h264"), ("audio", "aac"), ("audio", None)]
    source, made = await _transcode(beside, "video/quicktime", clips / "aac-apac")
    assert (source.audio_index, source.audio_sample_rate) == (1, 44100)
    make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=True)
    alone = make.unknown_codec(clips / "apac.mov", make.dubbed(clips / "pcm.mov", ("pcm_s16le", 22050)), b"sowt")
    with pytest.raises(PermanentImagingError) as refused:
        await videos.probe(alone, "video/quicktime", _DEFAULT_LIMITS)
    assert refused.value.message == "unsupported format"


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (192000, "48000"), (96000, "48000"), (88200, "48000"), (48000, "48000"), (22050, "22050"), (8000, "8000"),
        # AAC has a 7.35 kHz rate, which ffmpeg's encoder kept and phones do not play.
        (7350, "8000"),
        # A rate AAC does not have: ffmpeg's encoder took the nearest it has, 32 kHz, below the sound's.
        (37800, "44100"),
    ],
)
async def test_sound_is_resampled_to_a_rate_every_phone_plays_losing_none_of_it(clips, rate, expected):
    source_path = make.dubbed(clips / f"pcm-{rate}.mov", ("pcm_s24le", rate))
    _, made = await _transcode(source_path, "video/quicktime", clips / f"pcm-{rate}")
    make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=True)
    assert [s["sample_rate"] for s in make.probe(made[0].path)["streams"] if s["codec_type"] == "audio"] == [expected]


@pytest.mark.parametrize(
    ("name", "mime", "channels"),
    [("ten.mkv", "video/webm", 10), ("ten.mov", "video/quicktime", 10), ("twenty-five.mkv", "video/webm", 25)],
)
async def test_a_sound_of_channels_ffmpeg_has_no_layout_for_is_heard_from_its_first_two(clips, name, mime, channels):
    # No layout stated, and ffmpeg guesses one only for 1 to 8, 16 and 24 channels: it could not mix
    # the others down to stereo, and the run failed as "corrupt video". The renditions' left and right
    # are the first two channels, each as it is.
    path = make.many_channels(clips / name, channels)
    assert "channel_layout" not in make.probe(path)["streams"][1]
    source, made = await _transcode(path, mime, clips / name.replace(".", "-"))
    assert source.has_audio
    make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=True)
    assert make.channel_levels(made[0].path) == pytest.approx(make.channel_levels(path)[:2], abs=1.0)
    assert not make.silences(made[0].path)


async def test_a_sound_that_starts_after_the_video_is_heard_at_its_time_by_every_player(clips):
    # The tone starts 2 s into the video, behind an empty edit. The renditions' sound started there
    # too, behind an empty edit of its own, which players that ignore MP4 edit lists (as Android's
    # Stagefright long did) skip: they played the tone from the start, 2 s early.
    path = make.late_sound(clips / "late-sound.mp4", delay=2.0)
    assert make.silences(path)[0][1] == pytest.approx(2.0, abs=0.01), "the source's tone is heard from 2 s"
    _, made = await _transcode(path, "video/mp4", clips / "late-sound")
    make.check_rendition(made[0].path, width=320, height=240, duration=3.0, audio=True)
    sound = next(s for s in make.probe(made[0].path)["streams"] if s["codec_type"] == "audio")
    assert float(sound["start_time"]) == 0.0
    # Silence, then the tone at its time, whether the player applies the edit list (which leaves out
    # the encoder's priming, 1024 samples) or not.
    assert make.silences(made[0].path)[0] == (0.0, pytest.approx(2.0, abs=0.01))
    assert make.silences(made[0].path, edit_lists=False)[0] == (0.0, pytest.approx(2.0 + 1024 / 44100, abs=0.01))


@pytest.mark.parametrize(
    ("name", "mime", "degrees"),
    [("late-picture.mkv", "video/webm", None), ("late-picture.mp4", "video/mp4", None), ("late-picture.mov", "video/quicktime", 90)],
)
async def test_a_picture_that_starts_after_the_sound_is_shown_at_its_time_by_every_player(clips, name, mime, degrees):
    # The picture starts 1 s after the sound: a Matroska track whose first block comes later, an MP4
    # empty edit. The renditions' video started there too, behind an empty edit, which players that
    # ignore MP4 edit lists (many Android and web players) skip: they showed the picture 1 s early.
    # Turned a quarter by the display matrix, its first frame is held upright as the others are.
    path = make.late_picture(clips / name, delay=1.0)
    if degrees is not None:
        path = make.turned(clips / f"turned-{name}", path, degrees)
    width, height = make.autorotated_size(path)
    assert (width, height) == ((240, 320) if degrees else (320, 240))
    times = make.frame_times(path)
    assert times[0] >= 1.0
    first = make.picture(path, times[0])
    assert mean_difference(first, make.picture(path, 2.0)) > 8, "the test picture moves"
    source, made = await _transcode(path, mime, clips / name.replace(".", "-"))
    for rendition in made:
        make.check_rendition(rendition.path, width=width, height=height, duration=source.duration_seconds, audio=True)
        assert [float(s["start_time"]) for s in make.probe(rendition.path)["streams"]] == [0.0, 0.0]
        assert all(media_time != -1 for edits in make.edit_lists(rendition.path) for _, media_time in edits)
        # The first frame is held from 0 until the picture starts, then every frame comes at its time.
        kept = make.frame_times(rendition.path)
        assert kept[0] == 0.0
        assert [t for t in kept if t > times[0]] == times[1:]
        assert mean_difference(make.picture(rendition.path, 0.5), first) <= 4
        assert mean_difference(make.picture(rendition.path, 2.0), make.picture(path, 2.0)) <= 4
        # A player that ignores the edit list shows every frame later by x264's B-frame delay only.
        ignoring = make.frame_times(rendition.path, edit_lists=False)
        assert max(b - a for a, b in zip(kept, ignoring, strict=True)) <= 0.1
    # Where the probe found the picture's start.
    assert source.first_frame_seconds == pytest.approx(times[0], abs=0.001)


async def test_a_picture_that_starts_long_after_the_sound_is_held_on_its_first_frame_not_encoded_again_and_again(clips):
    # The corpus's clip 20 s after its sound. Its first frame was held from 0 in copies at 30 fps: 600
    # frames of one picture that the scaler and x264 worked through. Three copies at the cap's rate now
    # (x264's B-frame delay is read from the third frame), the last lasting until the picture starts.
    path = make.delayed_picture(clips / "late-20s.mp4", CORPUS / "video/realshort.mp4", 20.0)
    times = make.frame_times(path)
    assert times[0] == 20.0
    source, made = await _transcode(path, "video/mp4", clips / "late-20s")
    (rendition,) = made
    make.check_rendition(rendition.path, width=320, height=240, duration=source.duration_seconds, audio=True)
    assert make.frame_times(rendition.path) == [0.0, 0.033, 0.067, *times]
    assert make.frame_count(rendition.path) == len(times) + 3
    first = make.picture(path, times[0])
    assert mean_difference(make.picture(rendition.path, 10.0), first) <= 4
    assert mean_difference(make.picture(rendition.path, 19.9), first) <= 4
    # A player that ignores the edit list shows every frame later by x264's B-frame delay only.
    ignoring = make.frame_times(rendition.path, edit_lists=False)
    assert max(b - a for a, b in zip(make.frame_times(rendition.path), ignoring, strict=True)) <= 0.1


async def test_a_sound_that_stops_and_starts_again_keeps_its_time_in_the_renditions(clips):
    # A tone that stops at 1 s and starts again at 3 s. The renditions' sound had no gap: a player
    # plays the samples one after the other, and heard the second half 2 s early.
    path = make.gapped_sound(clips / "gapped-sound.mp4", at=1.0, gap=2.0)
    _, made = await _transcode(path, "video/mp4", clips / "gapped-sound")
    make.check_rendition(made[0].path, width=320, height=240, duration=4.0, audio=True)
    gaps = [(start, end) for start, end in make.silences(made[0].path) if end - start > 1]
    assert gaps == [(pytest.approx(1.0, abs=0.05), pytest.approx(3.0, abs=0.05))]


async def test_a_source_with_a_stream_no_allowed_decoder_reads_is_refused_before_anything_decodes_it(clips):
    # An MPEG-4 Part 2 picture stream beside the H.264 video: the renditions would not use it, but
    # FFmpeg's stream analysis would decode its first frame.
    video = make.h264(clips / "plain.mp4", audio=False)
    extra = make.with_stream(clips / "mpeg4-beside.mp4", video, *make._testsrc("64x48", 1.0, 5), "-c:v:1", "mpeg4")
    assert [s["codec_name"] for s in make.probe(extra)["streams"]] == ["h264", "mpeg4"]
    with pytest.raises(PermanentImagingError) as refused:
        await videos.probe(extra, "video/mp4", _DEFAULT_LIMITS)
    assert refused.value.message == "unsupported format"


_PROBE_AND_TRANSCODE_PEAK_RSS = """
import asyncio, resource, sys
from pathlib import Path
from mediavault.imaging import video as videos

async def main():
    limits = videos.VideoLimits()
    source = await videos.probe(Path(sys.argv[1]), "video/mp4", limits)
    async def going_on(done):
        return True
    made = await videos.transcode(Path(sys.argv[1]), "video/mp4", source, Path(sys.argv[2]), limits=limits,
                                  timeout_seconds=60, on_progress=going_on, threads=1)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, made[0].width, made[0].height)

asyncio.run(main())
"""


def _peak_of_ffmpeg(path: Path, out: Path) -> tuple[int, tuple[int, int]]:
    """ffprobe's and ffmpeg's peak RSS in KiB (the larger, ffmpeg's) making path's renditions into out
    with threads=1, and the first rendition's size."""
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", _PROBE_AND_TRANSCODE_PEAK_RSS, str(path), str(out)],
                          capture_output=True, text=True, check=True)
    peak_kib, width, height = done.stdout.split()
    return int(peak_kib), (int(width), int(height))


def test_a_cover_picture_costs_the_probe_and_the_renditions_no_decode_of_its_size(clips):
    # A 64 MP black PNG cover is 200 KB in the file and 192 MiB decoded: ffprobe may decode a cover
    # only within -max_pixels, and ffmpeg, which never maps it, does not decode it at all.
    video = make.h264(clips / "bare.mp4", audio=True)
    cover = make.blank_png(clips / "blank.png", 8192)
    covered = make.with_stream(clips / "big-cover.mp4", video, "-i", str(cover), "-c:v:1", "copy",
                               "-disposition:v:1", "attached_pic")

    def peak_of_ffmpeg(path: Path, out: Path) -> int:
        peak_kib, first = _peak_of_ffmpeg(path, out)
        assert first == (320, 240)
        return peak_kib

    bare_peak = peak_of_ffmpeg(video, clips / "bare")
    covered_peak = peak_of_ffmpeg(covered, clips / "big-cover")
    assert covered_peak - bare_peak < 32 * 1024, (bare_peak, covered_peak)


@pytest.mark.parametrize("value", ["zz", "90"])
async def test_a_rotate_tag_turns_nothing_as_it_turns_nothing_in_ffmpeg(clips, value):
    # ffmpeg's autorotate reads the display matrix only: the frames stay 320x240 whatever the tag says.
    source, made = await _transcode(make.tagged(clips / f"rotate-{value}.mkv", "rotate", value), "video/webm",
                                    clips / f"rotate-{value}")
    assert (source.rotation, source.width, source.height) == (0, 320, 240)
    make.check_rendition(made[0].path, width=320, height=240, duration=1.0, audio=False)


@pytest.mark.parametrize("degrees", [90, -90, 45, 89.3, 89.6, None], ids=str)
async def test_the_renditions_are_shaped_as_ffmpeg_turns_the_frames(clips, degrees):
    # ffmpeg's autorotate turns the frames a quarter only when the display matrix's angle, rounded to
    # a degree, is one (89.6 is, 89.3 is not); any other angle is drawn turned inside the frame's own
    # size, and a matrix without an angle (all zero) turns nothing. The renditions' shape must be that
    # of the frames they are scaled from, or the picture is squeezed.
    source_path = make.turned(clips / f"turned-{degrees}.mp4", make.h264(clips / "unturned.mp4", "640x360", audio=False),
                              degrees)
    shown = make.autorotated_size(source_path)
    source, made = await _transcode(source_path, "video/mp4", clips / f"turned-{degrees}")
    assert (source.width, source.height) == shown
    make.check_rendition(made[0].path, width=shown[0], height=shown[1], duration=1.0, audio=False)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda video: video.update(width="wide"),
        lambda video: video.update(sample_aspect_ratio="wide:1"),
        lambda video: video.update(side_data_list=[{"displaymatrix": "a quarter", "rotation": 90}]),
        lambda video: video.pop("index"),
        lambda video: video.update(duration=["1.0"]),
    ],
    ids=["width", "aspect-ratio", "rotation", "no-index", "duration"],
)
def test_a_malformed_probe_report_is_a_corrupt_video_not_a_crash(clips, spoil):
    report = make.probe(make.h264(clips / "report.mp4", audio=False))
    spoil(report["streams"][0])
    with pytest.raises(PermanentImagingError) as refused:
        videos.parse_probe(report)
    assert refused.value.message == "corrupt video"


def test_a_4k_hdr_source_is_tone_mapped_at_its_largest_rungs_size(clips):
    # The tone mapping works on float RGB frames (12 bytes a pixel). Run at the source's size before
    # the rungs' scalers, it held ffmpeg at 640 MiB for this 3840x2160 HLG clip (954 MiB at
    # 4096x4096); scaled to the 1080p rung first, 492 MiB, of which the HEVC decoder's own 4K frames
    # (decoding alone) are 257 MiB. Bound between the two, with room on either side.
    source_path = make.hdr(clips / "hlg-4k.mp4", make.HLG, "arib-std-b67", size="3840x2160", seconds=0.5,
                           preset="ultrafast")
    peak_kib, first = _peak_of_ffmpeg(source_path, clips / "hlg-4k")
    assert first == (640, 360)
    assert peak_kib < 560 * 1024, peak_kib
    top = clips / "hlg-4k" / "1080p.mp4"
    stream = make.check_rendition(top, width=1920, height=1080, duration=0.5, audio=False)
    assert (stream["color_space"], stream["color_transfer"], stream["color_primaries"]) == ("bt709", "bt709", "bt709")
    # The colours are the reference chain's, run at the source's size and then scaled: what differs
    # is only the order of the resampling and the tone mapping (SSIM 0.966; the reference chain run
    # on frames scaled first is 0.970 from it, and 0.994 from the rendition).
    reference = clips / "hlg-4k-reference.mp4"
    make.ffmpeg("-i", str(source_path), "-vf",
                "zscale=t=linear,tonemap=hable,zscale=t=bt709:m=bt709:p=bt709,format=yuv420p,scale=1920:1080",
                "-c:v", "libx264", "-crf", "12", str(reference))
    assert make.ssim(top, reference) >= 0.90
    ours, theirs = make.mean_saturation(top), make.mean_saturation(reference)
    assert abs(ours - theirs) <= 0.15 * theirs, (ours, theirs)
