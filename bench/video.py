"""Video renditions: mediavault's ladder beside Debian's ffmpeg CLI, and photos while a video transcodes.

Sources are made at run time with Debian's ffmpeg from its testsrc2 pattern (moving
colour bars, a clock and gradients): a --seconds long 1920x1080 30 fps HEVC 10-bit
HLG clip with sound (as an iPhone records), the same clip as 8-bit SDR H.264, and a
--long-seconds 1080p H.264 clip for the photo-latency part.

  ladder     mediavault.imaging.video (ffprobe, limits, then the ffmpeg subprocess with
             its progress pipe) making the full ladder of the HLG clip, in a subprocess
             pinned to one core with threads=1; timed from the probe to the last
             rendition written, beside the same ffmpeg command (same filter graph and
             encoder settings, no progress pipe) run straight from the CLI on the same
             core; --repeat runs each, alternated, medians compared
             (goal: mediavault at most 1.15x the CLI's time). The goal compares CPU
             seconds (mediavault's: its Python process during the run, ffprobe and
             ffmpeg; the CLI's: ffmpeg), which a machine shared with other work leaves
             intact; the wall-clock ratio is reported beside it
  realtime   seconds of video per CPU second (user + system of ffmpeg and ffprobe) of
             mediavault's ladder
  rss        peak RSS of the ffmpeg process making the ladder (goal under 400 MB)
  ssim       the 720p rung made from the SDR clip against that clip downscaled to
             1280x720 with Lanczos (FFmpeg's ssim filter, all planes; goal >= 0.95)
  photos     a stack (server and `mediavault worker`, default settings: the video queue
             apart, ffmpeg niced, all cores): a phone JPEG's finalize -> COMPLETE latency
             with nothing else running, then while the long clip transcodes
             (goal: p50 under 2 s while the video transcodes)

Prints one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

CORE = 0
# The corpus beside the checkout (../shared/corpus), or where MEDIAVAULT_TEST_CORPUS says.
CORPUS = Path(os.environ.get("MEDIAVAULT_TEST_CORPUS") or BENCH_DIR.parents[1] / "shared" / "corpus")
PHOTO = CORPUS / "images" / "camera" / "jolla.jpg"


def log(message: str) -> None:
    print(f"[video] {message}", file=sys.stderr, flush=True)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def make_sources(directory: Path, seconds: float, long_seconds: float) -> tuple[Path, Path, Path]:
    pattern = ["-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={seconds}"]
    tone = ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    hlg = directory / "hlg.mov"
    ffmpeg(*pattern, *tone, "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le", "-tag:v", "hvc1",
           "-x265-params", "log-level=error:colorprim=bt2020:transfer=arib-std-b67:colormatrix=bt2020nc",
           "-color_primaries", "bt2020", "-color_trc", "arib-std-b67", "-colorspace", "bt2020nc",
           "-c:a", "aac", "-shortest", str(hlg))
    sdr = directory / "sdr.mp4"
    ffmpeg(*pattern, *tone, "-c:v", "libx264", "-preset", "ultrafast", "-crf", "12", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-shortest", str(sdr))
    long = directory / "long.mp4"
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={long_seconds}",
           "-f", "lavfi", "-i", f"sine=frequency=440:duration={long_seconds}",
           "-c:v", "libx264", "-preset", "ultrafast", "-crf", "23", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
           "-movflags", "+faststart", str(long))
    return hlg, sdr, long


def _pin() -> None:
    os.sched_setaffinity(0, {CORE})


def one_mediavault_run(source: Path, mime: str, out: Path) -> dict:
    """Runs in the pinned subprocess: probe + ladder, as the video worker does."""
    from mediavault.imaging import video as videos

    async def progress(_done: float) -> bool:
        return True

    async def run() -> tuple[float, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        limits = videos.VideoLimits()
        probed = await videos.probe(source, mime, limits)
        await videos.transcode(source, mime, probed, out, limits=limits, timeout_seconds=3600, on_progress=progress, threads=1,
                               niceness=0)
        return time.perf_counter() - started, time.process_time() - cpu_started

    seconds, own_cpu = asyncio.run(run())
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": seconds, "cpu_seconds": own_cpu + children.ru_utime + children.ru_stime,
            "python_cpu_seconds": own_cpu, "ffmpeg_rss_mb": children.ru_maxrss / 1024}


def mediavault_run(source: Path, mime: str, out: Path) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--one-run", str(source), mime, str(out)],
        check=True, capture_output=True, text=True, preexec_fn=_pin,
    )
    return json.loads(completed.stdout)


def cli_command(source: Path, mime: str, out: Path) -> list[str]:
    """The command mediavault runs, without its progress pipe: the same graph and encoder settings."""
    from mediavault.imaging import video as videos

    limits = videos.VideoLimits()
    probed = asyncio.run(videos.probe(source, mime, limits))
    args = videos.command(source, mime, probed, videos.plan(probed), out, limits, threads=1)
    at = args.index("-progress")
    return args[:at] + args[at + 2 :]


def cli_run(args: list[str]) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=_pin)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"ffmpeg exited with {process.returncode}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "ffmpeg_rss_mb": usage.ru_maxrss / 1024}


def ssim_720p(sdr: Path, out: Path) -> float:
    mediavault_run(sdr, "video/mp4", out)
    report = subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-i", str(out / "720p.mp4"), "-i", str(sdr), "-lavfi",
         "[1:v]scale=1280:720:flags=lanczos[reference];[0:v][reference]ssim", "-f", "null", "-"],
        check=True, capture_output=True, text=True,
    ).stderr
    return float(report.rsplit("All:", 1)[1].split()[0])


async def photo_latencies(target: str, secret: str, runs: int, long_video: Path | None) -> tuple[list[float], dict]:
    import hashlib

    import aiohttp
    import grpc

    from mediavault.auth import Authenticator
    from mediavault.media.v1 import media_pb2, media_pb2_grpc
    from mediavault.storage.v1 import storage_pb2, storage_pb2_grpc

    metadata = (("authorization", f"Bearer {Authenticator(secret).issue('bench-video', ['user'])}"),)
    photo = PHOTO.read_bytes()
    video_state: dict = {}
    async with grpc.aio.insecure_channel(target) as channel, aiohttp.ClientSession() as http:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        media = media_pb2_grpc.MediaServiceStub(channel)

        async def upload(data: bytes, name: str, content_type: str) -> str:
            begun = await storage.BeginUpload(
                storage_pb2.BeginUploadRequest(filename=name, content_type=content_type, size_bytes=len(data),
                                               sha256=hashlib.sha256(data).hexdigest()), metadata=metadata)
            async with http.put(begun.upload_url, data=data, headers=dict(begun.upload_headers)) as response:
                response.raise_for_status()
            done = await storage.FinalizeUpload(storage_pb2.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=metadata)
            return done.media_id

        async def get(media_id: str):
            return (await media.GetMedia(media_pb2.GetMediaRequest(media_id=media_id), metadata=metadata)).media

        video_id = None
        if long_video is not None:
            video_id = await upload(long_video.read_bytes(), "long.mp4", "video/mp4")
            while (await get(video_id)).processing_progress < 1:
                await asyncio.sleep(0.05)
        latencies = []
        for _ in range(runs):
            media_id = await upload(photo, "jolla.jpg", "image/jpeg")
            started = time.perf_counter()
            while (item := await get(media_id)).processing_status != media_pb2.PROCESSING_STATUS_COMPLETE:
                if item.processing_status == media_pb2.PROCESSING_STATUS_FAILED:
                    raise RuntimeError(item.processing_error)
                await asyncio.sleep(0.005)
            latencies.append(time.perf_counter() - started)
        if video_id is not None:
            item = await get(video_id)
            video_state = {"progress_after_photos": item.processing_progress,
                           "still_transcoding": item.processing_status == media_pb2.PROCESSING_STATUS_PROCESSING}
    return latencies, video_state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--long-seconds", type=float, default=60.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--photos", type=int, default=15)
    parser.add_argument("--target", help="ignored: this benchmark starts its own stack")
    parser.add_argument("--jwt-secret", help="ignored")
    parser.add_argument("--one-run", nargs=3, metavar=("SOURCE", "MIME", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        source, mime, out = args.one_run
        print(json.dumps(one_mediavault_run(Path(source), mime, Path(out))))
        return 0

    from stack import bench_stack

    with tempfile.TemporaryDirectory(prefix="mediavault-bench-video-") as scratch:
        directory = Path(scratch)
        log("making sources")
        hlg, sdr, long = make_sources(directory, args.seconds, args.long_seconds)
        ours_dir, theirs_dir = directory / "ours", directory / "theirs"
        ours_dir.mkdir()
        theirs_dir.mkdir()
        command = cli_command(hlg, "video/quicktime", theirs_dir)
        ours, theirs = [], []
        for run in range(args.repeat):
            log(f"ladder run {run + 1}/{args.repeat}")
            ours.append(mediavault_run(hlg, "video/quicktime", ours_dir))
            theirs.append(cli_run(command))
        rungs = sorted(p.stem for p in ours_dir.glob("*.mp4"))
        sdr_dir = directory / "sdr"
        sdr_dir.mkdir()
        log("ssim of the 720p rung")
        ssim = ssim_720p(sdr, sdr_dir)
        log("photo latency, idle then while the long video transcodes")
        with bench_stack(with_worker=True) as stack:
            idle, _ = asyncio.run(photo_latencies(stack.target, stack.jwt_secret, args.photos, None))
            busy, video_state = asyncio.run(photo_latencies(stack.target, stack.jwt_secret, args.photos, long))

    ours_s = statistics.median(r["seconds"] for r in ours)
    theirs_s = statistics.median(r["seconds"] for r in theirs)
    cpu = statistics.median(r["cpu_seconds"] for r in ours)
    cli_cpu = statistics.median(r["cpu_seconds"] for r in theirs)
    ratio = cpu / cli_cpu
    rss = max(r["ffmpeg_rss_mb"] for r in ours)
    busy_p50 = statistics.median(busy)
    result = {
        "bench": "video",
        "source": f"{args.seconds:g} s 1920x1080 30 fps HEVC 10-bit HLG + AAC (testsrc2), one core, threads=1",
        "rungs": rungs,
        "ladder_seconds": {"mediavault": round(ours_s, 2), "ffmpeg_cli": round(theirs_s, 2),
                           "runs": {"mediavault": [round(r["seconds"], 2) for r in ours],
                                    "ffmpeg_cli": [round(r["seconds"], 2) for r in theirs]}},
        "ladder_cpu_seconds": {"mediavault": round(cpu, 2), "ffmpeg_cli": round(cli_cpu, 2),
                               "mediavault_python": round(statistics.median(r["python_cpu_seconds"] for r in ours), 3),
                               "runs": {"mediavault": [round(r["cpu_seconds"], 2) for r in ours],
                                        "ffmpeg_cli": [round(r["cpu_seconds"], 2) for r in theirs]}},
        "mediavault_vs_cli_cpu": round(ratio, 3),
        "mediavault_vs_cli_wall": round(ours_s / theirs_s, 3),
        "realtime_factor": round(args.seconds / cpu, 3),
        "ffmpeg_peak_rss_mb": {"mediavault": round(rss, 1), "ffmpeg_cli": round(max(r["ffmpeg_rss_mb"] for r in theirs), 1)},
        "ssim_720p_vs_source": round(ssim, 4),
        "photo_finalize_to_complete_ms": {
            "idle_p50": round(statistics.median(idle) * 1000, 1),
            "while_video_p50": round(busy_p50 * 1000, 1),
            "while_video_max": round(max(busy) * 1000, 1),
            "n": len(busy),
            **video_state,
        },
        "goals": {
            "ladder_at_most_1_15x_cli": ratio <= 1.15,
            "peak_rss_under_400mb": rss < 400,
            "ssim_720p_at_least_0_95": ssim >= 0.95,
            "photo_p50_under_2s_while_video": busy_p50 < 2.0,
        },
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
