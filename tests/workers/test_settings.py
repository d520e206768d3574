"""The arq worker as `mediavault worker` builds it, on real Redis: start-up fills ctx and the cron job runs."""

from __future__ import annotations

import uuid

import pytest
from arq import create_pool
from pydantic import ValidationError

from mediavault.config import JobsConfig
from mediavault.imaging import pool_size
from mediavault.storage.v1 import storage_pb2 as pb
from tests.conftest import CORPUS
from tests.helpers import begin, fake_jpeg
from workers.settings import _schedule, shutdown, startup, worker_settings
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


@pytest.mark.parametrize("every_seconds", [2700, 5400, 18000])
def test_a_schedule_that_does_not_divide_the_hour_or_the_day_is_refused(every_seconds):
    with pytest.raises(ValidationError, match="every_seconds"):
        JobsConfig(audit_accounts={"every_seconds": every_seconds})


@pytest.mark.parametrize("every_seconds", [60, 300, 900, 1800, 3600, 7200, 21600, 43200])
def test_an_accepted_schedule_runs_evenly_spaced(every_seconds):
    minutes, hours = _schedule(JobsConfig(audit_accounts={"every_seconds": every_seconds}).audit_accounts.every_seconds)
    runs = sorted(hour * 60 + minute for hour in (hours or range(24)) for minute in minutes)
    gaps = {later - earlier for earlier, later in zip(runs, [*runs[1:], runs[0] + 24 * 60], strict=True)}
    assert gaps == {every_seconds // 60}
