"""The arq worker as `mediavault worker` builds it, on real Redis: start-up fills ctx and the cron job runs."""

from __future__ import annotations

import uuid

from arq import create_pool

from mediavault.config import JobsConfig
from mediavault.imaging import pool_size
from mediavault.storage.v1 import storage_pb2 as pb
from tests.conftest import CORPUS
from tests.helpers import begin, fake_jpeg
from workers.settings import shutdown, startup, worker_settings
from workers.worker import Worker


async def test_worker_runs_reclaim_with_its_own_resources(server, redis_url, storage, auth, user_id, pool):
    md = auth(user_id)
    begun = await begin(storage, md, fake_jpeg(1000))
    await pool.execute("UPDATE uploads SET expires_at = now() - interval '1 minute' WHERE upload_id = $1::uuid", begun.upload.upload_id)

    settings = server.settings.model_copy(
        update={"redis_url": redis_url, "queue_name": f"mediavault-test:{uuid.uuid4().hex}", "jobs": JobsConfig()}
    )
    options = worker_settings(settings)
    redis = await create_pool(options["redis_settings"], default_queue_name=settings.queue_name)
    try:
        assert await redis.enqueue_job("cron:reclaim_stale_uploads") is not None
        worker = Worker(**options, burst=True, handle_signals=False)
        try:
            await worker.async_run()
        finally:
            await worker.close()
    finally:
        await redis.aclose()

    got = (await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=md)).upload
    assert got.state == pb.UPLOAD_STATE_EXPIRED


async def test_jpeg_planes_off_reaches_the_transcoding_processes(make_settings, monkeypatch):
    monkeypatch.setenv("MEDIAVAULT_IMAGING_JPEG_PLANES", "off")
    ctx = {"settings": make_settings(transcode_workers=1), "redis": None}
    try:
        await startup(ctx)
        result = await ctx["transcoder"].run((CORPUS / "images/camera/jolla.jpg").read_bytes(), "image/jpeg")
    finally:
        await shutdown(ctx)
    assert result.strategy == "pillow"


def test_a_worker_takes_two_photo_jobs_per_transcoding_process(make_settings):
    # More would wait inside this worker while another one's processes stand idle.
    for processes, jobs in ((1, 2), (3, 6), (0, 2 * pool_size(None))):
        worker = Worker(**worker_settings(make_settings(transcode_workers=processes)), handle_signals=False)
        assert worker.max_jobs == jobs
