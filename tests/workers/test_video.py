"""transcode_video over real gRPC, PostgreSQL, Redis, the blob listener and both worker queues."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest
from arq.connections import RedisSettings
from arq.connections import create_pool as create_arq_pool
from arq.jobs import Job
from PIL import Image

from mediavault.config import Settings
from mediavault.imaging import video as videos
from mediavault.imaging.decode import NEAR_BLACK_LUMA
from mediavault.jobs import enqueue_video, transcode_job_id
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.media.v1 import media_pb2_grpc
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests import videos as make
from tests.conftest import CORPUS, running, running_worker
from tests.faults import proxied
from tests.helpers import fetch, retry_scheduled, settled, upload
from tests.workers.test_transcode import children_of, is_alive, start_worker
from workers.video import limits as video_limits
from workers.worker import health_check_key


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clips")


async def test_an_iphone_video_completes_with_renditions_metadata_and_ranges(storage, media, auth, user_id, worker, clips):
    md = auth(user_id)
    source = make.hlg_rotated_mov(clips / "iphone.mov", size="640x480")
    done = await upload(storage, md, source.read_bytes(), filename="IMG_0001.MOV", content_type="video/quicktime")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert item.kind == mpb.MEDIA_KIND_VIDEO
    assert (item.width, item.height) == (480, 640), "shown upright"
    assert abs(item.duration_seconds - 1.0) < 0.05
    assert item.frame_rate == 30.0
    assert item.has_audio
    assert item.source_codec == "hevc"
    assert item.processing_progress == 0, "nothing runs any more"
    assert {v.name for v in item.variants} == {"poster", "thumbnail", "preview"}
    assert [(r.name, r.width, r.height, r.content_type) for r in item.renditions] == [("360p", 360, 480, "video/mp4")]
    rendition = item.renditions[0]

    status, body, headers = await fetch(rendition.url)
    assert status == 200
    assert headers["Content-Type"] == "video/mp4"
    assert len(body) == rendition.size_bytes
    assert rendition.bitrate == pytest.approx(rendition.size_bytes * 8 / item.duration_seconds, rel=0.05)
    played = clips / "played.mp4"
    played.write_bytes(body)
    make.check_rendition(played, width=360, height=480, duration=1.0, audio=True)
    # Players seek with byte ranges.
    status, part, headers = await fetch(rendition.url, {"Range": "bytes=100-199"})
    assert status == 206
    assert part == body[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(body)}"
    assert headers["Content-Type"] == "video/mp4"

    feed = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
    shown = next(m for m in feed.media if m.media_id == done.media_id)
    assert [(r.name, r.size_bytes) for r in shown.renditions] == [(rendition.name, rendition.size_bytes)]
    assert shown.duration_seconds == item.duration_seconds

    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    # Every stored format counts: each poster variant and its alternates (AVIF), and the rendition.
    stored = sum(v.size_bytes + sum(a.size_bytes for a in v.alternatives) for v in item.variants)
    assert summary.derived_bytes == stored + rendition.size_bytes
    assert summary.used_bytes == source.stat().st_size, "derived bytes do not count against the quota"


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda d: make.claims(d / "long.mp4", make.h264(d / "short.mp4"), 36000), "video too long"),
        (lambda d: make.truncated(d / "cut.mp4", make.h264(d / "whole.mp4", faststart=False)), "corrupt video"),
        (lambda d: make.tiny(d / "dot.mp4"), "video too small"),
        (lambda d: make.dubbed(d / "adpcm.mov", ("adpcm_ima_qt", 44100)), "unsupported format"),
        # A voice memo uploaded as video/mp4: sound alone, no video, nothing corrupt.
        (lambda d: make.sound_only(d / "memo.m4a"), "unsupported format"),
    ],
    ids=["claims-10h", "truncated", "1x1", "adpcm-sound", "sound-only"],
)
async def test_refused_videos_fail_once_with_their_reason(storage, media, auth, user_id, worker, tmp_path, build, reason):
    md = auth(user_id)
    data = build(tmp_path).read_bytes()
    done = await upload(storage, md, data, filename="clip.mp4", content_type="video/mp4")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_FAILED
    assert item.processing_error == reason
    assert item.attempts == 1, "never retried"
    assert not item.renditions


async def test_a_video_whose_original_is_gone_retries_with_backoff_then_fails(make_settings, auth, user_id, pool, tmp_path):
    settings = make_settings(queue_name=f"video-retry-test:{user_id}", transcode_retry_base_seconds=0.2)
    async with (
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        media = media_pb2_grpc.MediaServiceStub(channel)
        md = auth(user_id)
        done = await upload(storage, md, make.h264(tmp_path / "clip.mp4").read_bytes(), filename="clip.mp4",
                            content_type="video/mp4")
        # Gone before any worker runs: every attempt of the video job meets a blob store fault.
        key = await pool.fetchval("SELECT object_key FROM media WHERE media_id = $1::uuid", done.media_id)
        (settings.blob_dir / key).unlink()
        async with running_worker(settings):
            assert await retry_scheduled(pool, done.media_id), "a transient failure schedules the next attempt"
            item = await settled(media, md, done.media_id, timeout=30)
    assert item.processing_status == mpb.PROCESSING_STATUS_FAILED
    assert (item.attempts, item.processing_error) == (3, "processing failed, try again later")
    assert not item.renditions
    assert not item.variants


async def test_photos_pass_a_transcoding_video_and_deleting_it_cancels_the_transcode(
    make_settings, auth, user_id, pool, clips
):
    settings = make_settings(queue_name=f"video-cancel:{user_id}", video_ffmpeg_threads=1)
    source = make.h264(clips / "long.mp4", "1280x720", 10.0, audio=False)
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        media = media_pb2_grpc.MediaServiceStub(channel)
        md = auth(user_id)
        done = await upload(storage, md, source.read_bytes(), filename="long.mp4", content_type="video/mp4")
        async with running_worker(settings):
            progress = []
            deadline = time.monotonic() + 60
            while not progress or progress[-1] < 5:
                assert time.monotonic() < deadline, "no progress reported"
                item = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media
                if item.processing_progress:
                    progress.append(item.processing_progress)
                await asyncio.sleep(0.05)
            assert progress == sorted(progress)
            assert progress[-1] < 100
            assert _ffmpeg_running()
            # The video holds no place on the photo queue: a photo completes while it transcodes.
            photo = await upload(storage, md, (CORPUS / "images/camera/jolla.jpg").read_bytes(), filename="jolla.jpg")
            assert (await settled(media, md, photo.media_id)).processing_status == mpb.PROCESSING_STATUS_COMPLETE
            item = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media
            assert item.processing_status == mpb.PROCESSING_STATUS_PROCESSING
            await media.DeleteMedia(mpb.DeleteMediaRequest(media_id=done.media_id), metadata=md)
            deadline = time.monotonic() + 5
            while _ffmpeg_running():
                assert time.monotonic() < deadline, "ffmpeg still runs after the media was deleted"
                await asyncio.sleep(0.05)
        hex_id = done.media_id.replace("-", "")
        assert not list((Path(settings.blob_dir) / "variants" / hex_id[:2] / hex_id).rglob("*.*"))
        assert await pool.fetchval("SELECT count(*) FROM media_variants WHERE media_id = $1::uuid", done.media_id) == 0


def _looped(clips: Path, seconds: int = 300) -> Path:
    """Minutes of the corpus's clip, looped: ffmpeg is still on it seconds after it starts."""
    source = clips / f"looped-{seconds}.mp4"
    if not source.exists():
        make.ffmpeg("-stream_loop", "-1", "-i", str(CORPUS / "video/realshort.mp4"), "-t", str(seconds), "-map", "0:v",
                    "-c", "copy", str(source))
    return source


async def test_a_transcode_stops_when_its_media_expires_mid_run(make_settings, auth, user_id, pool, clips):
    settings = make_settings(queue_name=f"video-expires:{user_id}", video_ffmpeg_threads=1)
    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            done = await upload(storage, auth(user_id), _looped(clips).read_bytes(), filename="looped.mp4",
                                content_type="video/mp4", retention=pb.RETENTION_EPHEMERAL)
            progress = "SELECT processing_progress FROM media WHERE media_id = $1::uuid"
            async with running_worker(settings):
                deadline = time.monotonic() + 60
                while not await pool.fetchval(progress, done.media_id):
                    assert time.monotonic() < deadline, "no progress reported"
                    await asyncio.sleep(0.05)
                await pool.execute("UPDATE media SET expires_at = now() - interval '1 second' WHERE media_id = $1::uuid",
                                   done.media_id)
                # Its next progress report finds the media gone, as a claim would: the render is for no one.
                deadline = time.monotonic() + 5
                while _ffmpeg_running():
                    assert time.monotonic() < deadline, "ffmpeg still runs after the media expired"
                    await asyncio.sleep(0.05)
                job = Job(f"video:{transcode_job_id(uuid.UUID(done.media_id), 0)}", redis, _queue_name=settings.video_queue)
                assert await job.result(timeout=30) == "cancelled"
    finally:
        await redis.aclose()
    assert await pool.fetchval("SELECT count(*) FROM media_variants WHERE media_id = $1::uuid", done.media_id) == 0


async def test_a_worker_killed_mid_transcode_leaves_no_ffmpeg_nor_pool_process(make_settings, auth, user_id, pool, clips):
    source = _looped(clips)
    settings = make_settings(queue_name=f"video-kill:{user_id}")
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        done = await upload(storage, auth(user_id), source.read_bytes(), filename="looped.mp4", content_type="video/mp4")
        worker = start_worker(settings, MEDIAVAULT_VIDEO_FFMPEG_THREADS="1")
        try:
            deadline = time.monotonic() + 60
            while "ffmpeg" not in (started := _descendants(worker.pid)).values():
                assert time.monotonic() < deadline, "the worker never started ffmpeg"
                await asyncio.sleep(0.02)
            worker.send_signal(signal.SIGKILL)
        finally:
            worker.wait()
        assert await pool.fetchval("SELECT processing_status FROM media WHERE media_id = $1::uuid", done.media_id) == "processing"
    # ffmpeg, the pools' processes and multiprocessing's resource tracker: a transcode left running
    # would keep a core busy for up to its time limit, beside the replacement worker's run of it.
    deadline = time.monotonic() + 5
    try:
        while survivors := {pid: name for pid, name in started.items() if is_alive(pid)}:
            assert time.monotonic() < deadline, f"outlived the killed worker: {survivors}"
            await asyncio.sleep(0.05)
    finally:
        # Not left to run on after a failure.
        for pid in filter(is_alive, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_the_temp_files_of_a_worker_killed_mid_transcode_are_removed_by_the_next_to_start(
    make_settings, auth, user_id, pool, clips, tmp_path
):
    settings = make_settings(queue_name=f"video-temp:{user_id}")
    # Workers sharing one temp dir, as on one host: one lives on (on a queue of its own, idle, so
    # that it takes no job of the other's), one is killed mid-transcode, one starts after.
    env = {"MEDIAVAULT_VIDEO_FFMPEG_THREADS": "1", "TMPDIR": str(tmp_path)}
    workers: list[subprocess.Popen] = []
    started: dict[int, str] = {}

    async def healthy(worker_settings, worker: subprocess.Popen) -> None:
        async with asyncio.timeout(120):
            while not await redis.exists(health_check_key(worker_settings.queue_name, worker.pid)):
                assert worker.poll() is None, "the worker exited"
                await asyncio.sleep(0.05)

    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            living_settings = make_settings(queue_name=f"video-temp-living:{user_id}")
            living = start_worker(living_settings, **env)
            workers.append(living)
            await healthy(living_settings, living)
            [living_folder] = [path for path in tmp_path.iterdir() if path.is_dir()]
            living_files = sorted(path.name for path in tmp_path.iterdir())

            original = _looped(clips).read_bytes()
            await upload(storage, auth(user_id), original, filename="looped.mp4", content_type="video/mp4")
            killed = start_worker(settings, **env)
            workers.append(killed)
            # A worker's start, its download and probe of the clip: slow beside a full run on two cores.
            deadline = time.monotonic() + 180
            while "ffmpeg" not in (descendants := _descendants(killed.pid)).values():
                assert time.monotonic() < deadline, "the worker never started ffmpeg"
                await asyncio.sleep(0.02)
            started.update(descendants)
            [source] = [path for path in tmp_path.rglob("source") if path.stat().st_size == len(original)]
            killed.send_signal(signal.SIGKILL)
            killed.wait()
            next_one = start_worker(settings, **env)
            workers.append(next_one)
            await healthy(settings, next_one)
            assert not source.exists(), "the killed worker's original is left on disk"
            assert living_folder.is_dir(), "a living worker's folder was touched"
            assert living.poll() is None
            assert set(living_files) <= {path.name for path in tmp_path.iterdir()}
            for worker in (living, next_one):
                worker.terminate()
            async with asyncio.timeout(60):
                while any(worker.poll() is None for worker in (living, next_one)):
                    await asyncio.sleep(0.05)
        # A worker that exits leaves nothing behind.
        assert not list(tmp_path.iterdir())
    finally:
        await redis.aclose()
        for worker in workers:
            worker.kill()
            worker.wait()
        for pid in filter(is_alive, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> dict[int, str]:
    """Every process below pid, by its command's name."""
    found = {}
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            found[child] = Path(f"/proc/{child}/comm").read_text().strip()
        found.update(_descendants(child))
    return found


# What asyncpg sends to end a transaction: a simple Query message.
COMMIT = b"Q\x00\x00\x00\x0cCOMMIT;\x00"


async def test_a_completion_whose_commit_reply_is_lost_keeps_the_videos_blobs(make_settings, auth, user_id, pool, clips):
    settings = make_settings(queue_name=f"video-commit-lost:{user_id}", transcode_retry_base_seconds=0.2)
    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        async with (
            proxied(settings.database_url) as proxy,
            running(settings) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        ):
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            md = auth(user_id)
            # The workers reach PostgreSQL through the proxy, the API server directly. Claims and
            # progress reports are single statements: the first COMMIT the workers send is the
            # video's completion, which PostgreSQL applies while the worker hears only a reset.
            proxy.cut_after_sent(COMMIT)
            async with running_worker(settings.model_copy(update={"database_url": proxy.url_for(settings.database_url)})):
                done = await upload(storage, md, make.h264(clips / "commit.mp4").read_bytes(), filename="commit.mp4",
                                    content_type="video/mp4")
                await asyncio.wait_for(proxy.cut.wait(), 60)
                job = Job(f"video:{transcode_job_id(uuid.UUID(done.media_id), 0)}", redis, _queue_name=settings.video_queue)
                # The fault was retried, and the retry found the run complete.
                assert await job.result(timeout=60) == "skipped"
    finally:
        await redis.aclose()
    row = await pool.fetchrow("SELECT processing_status, attempts FROM media WHERE media_id = $1::uuid", done.media_id)
    assert (row["processing_status"], row["attempts"]) == ("complete", 1)
    await _every_variant_is_stored(pool, settings.blob_dir, done.media_id)


async def test_a_run_superseded_by_its_twin_leaves_the_winners_blobs(make_settings, auth, user_id, pool, clips):
    settings = make_settings(queue_name=f"video-twins:{user_id}", video_workers=2)
    redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            md = auth(user_id)
            done = await upload(storage, md, make.h264(clips / "twins.mp4").read_bytes(), filename="twins.mp4",
                                content_type="video/mp4")
            media_id = uuid.UUID(done.media_id)
            # The stuck-media sweep re-queues a run under a new job id, and the first job may still
            # be running. Both are queued before any worker starts: the two runs of version 0
            # claim it together, and the second to finish finds the run complete.
            job_ids = [f"video:{transcode_job_id(media_id, 0, requeue)}" for requeue in (0, 1)]
            for requeue in (0, 1):
                await enqueue_video(redis, settings.video_queue, media_id, 0, transcode_job_id(media_id, 0, requeue))
            async with running_worker(settings):
                outcomes = [await Job(job_id, redis, _queue_name=settings.video_queue).result(timeout=60) for job_id in job_ids]
    finally:
        await redis.aclose()
    # The loser usually reaches complete() and is told it was superseded; on a slow machine a
    # progress report may find the winner's completion first and cancel it before it writes.
    # Either way the winner's blobs must all be there.
    assert sorted(outcomes) in (["complete", "superseded"], ["cancelled", "complete"])
    row = await pool.fetchrow("SELECT processing_status, attempts FROM media WHERE media_id = $1::uuid", done.media_id)
    assert (row["processing_status"], row["attempts"]) == ("complete", 2)
    await _every_variant_is_stored(pool, settings.blob_dir, done.media_id)


async def _every_variant_is_stored(pool, blob_dir: Path, media_id: str) -> None:
    rows = await pool.fetch("SELECT name, object_key, content_type FROM media_variants WHERE media_id = $1::uuid", media_id)
    assert {"poster", "thumbnail", "preview"} <= {r["name"] for r in rows}
    assert "video/mp4" in {r["content_type"] for r in rows}, "a rendition"
    missing = [r["object_key"] for r in rows if not (blob_dir / r["object_key"]).is_file()]
    assert not missing, "variant rows whose blobs are gone"


def _ffmpeg_running() -> bool:
    """Whether this process (whose event loop runs the workers) has an ffmpeg child alive."""
    for pid in children_of(os.getpid()):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "ffmpeg" and is_alive(pid):
                return True
        except OSError:
            continue
    return False


async def test_a_free_text_rotate_tag_neither_fails_nor_retries_the_video(storage, media, auth, user_id, worker, tmp_path):
    md = auth(user_id)
    data = make.tagged(tmp_path / "tagged.mkv", "rotate", "zz").read_bytes()
    done = await upload(storage, md, data, filename="clip.mkv", content_type="video/webm")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert item.attempts == 1
    assert (item.width, item.height) == (320, 240)


async def test_a_sound_that_its_edit_list_shows_none_of_is_no_sound_in_the_media_nor_its_renditions(
    storage, media, auth, user_id, worker, tmp_path
):
    md = auth(user_id)
    # The sound's edit starts after its second of samples: nothing of it is heard.
    source = make.edited(tmp_path / "edited.mp4", make.h264(tmp_path / "plain.mp4"), start=2.0, seconds=3.0, track=1)
    done = await upload(storage, md, source.read_bytes(), filename="clip.mp4", content_type="video/mp4")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert not item.has_audio
    assert item.duration_seconds == pytest.approx(1.0, abs=0.01)
    status, body, _ = await fetch(item.renditions[0].url)
    assert status == 200
    played = tmp_path / "played.mp4"
    played.write_bytes(body)
    make.check_rendition(played, width=320, height=240, duration=1.0, audio=False)


async def test_a_sound_of_ten_channels_and_no_layout_completes_with_its_first_two_as_stereo(
    storage, media, auth, user_id, worker, tmp_path
):
    md = auth(user_id)
    # A multitrack recorder's PCM: ffmpeg cannot mix 10 channels of no stated layout down to stereo,
    # and the video was FAILED "corrupt video".
    source = make.many_channels(tmp_path / "ten.mov", 10)
    done = await upload(storage, md, source.read_bytes(), filename="clip.mov", content_type="video/quicktime")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    assert item.has_audio
    status, body, _ = await fetch(item.renditions[0].url)
    assert status == 200
    played = tmp_path / "played.mp4"
    played.write_bytes(body)
    make.check_rendition(played, width=320, height=240, duration=1.0, audio=True)
    assert make.channel_levels(played) == pytest.approx(make.channel_levels(source)[:2], abs=1.0)


async def test_a_picture_that_starts_after_the_sound_with_a_black_fade_in_gets_a_poster_of_what_follows(
    storage, media, auth, user_id, worker, tmp_path
):
    md = auth(user_id)
    # The picture starts 2 s after the sound, black for its first 2 s. The smallest rendition holds its
    # first frame from 0 until it starts, and the poster search's first 3 s were those black copies and
    # 1 s of the black picture: the poster was black, where the same picture without the delay got its
    # test picture.
    source = make.late_black_lead_in(tmp_path / "late-fade.mp4")
    done = await upload(storage, md, source.read_bytes(), filename="clip.mp4", content_type="video/mp4")
    item = await settled(media, md, done.media_id)
    assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
    poster = next(v for v in item.variants if v.name == "poster")
    status, body, _ = await fetch(poster.url)
    assert status == 200
    luma = Image.open(io.BytesIO(body)).convert("L").resize((32, 32))
    assert sum(luma.get_flattened_data()) / 1024 > NEAR_BLACK_LUMA
    assert luma.getextrema()[1] > 200


def test_video_memory_limit_mb_is_ffmpegs_cap():
    assert video_limits(Settings(video_memory_limit_mb=300)).max_memory_bytes == 300 * 1024 * 1024
    assert video_limits(Settings(video_memory_limit_mb=0)).max_memory_bytes == 0


def test_unset_the_cap_grows_with_ffmpegs_threads():
    """Each thread's stack and codec buffers count: 4K HLG took 3177 MiB with 16 threads."""
    assert video_limits(Settings(video_ffmpeg_threads=16)).max_memory_bytes == 4096 * 1024 * 1024
    assert video_limits(Settings(video_ffmpeg_threads=1)).max_memory_bytes == 1216 * 1024 * 1024
    # Left to choose, ffmpeg's x264 takes 1.5 threads a core this process may run on.
    cores = len(os.sched_getaffinity(0))
    assert video_limits(Settings()).max_memory_bytes == (1024 + 192 * math.ceil(1.5 * cores)) * 1024 * 1024
    assert video_limits(Settings()).max_memory_bytes == videos.VideoLimits().max_memory_bytes
