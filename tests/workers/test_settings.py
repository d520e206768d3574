"""The arq worker as `mediavault worker` builds it, on real Redis: start-up fills ctx and the cron job runs."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from arq import create_pool
from pydantic import ValidationError

from mediavault.config import JobsConfig, Settings
from mediavault.imaging import pool_size
from mediavault.storage.v1 import storage_pb2 as pb
from tests.conftest import CORPUS
from tests.helpers import begin, fake_jpeg
from workers.settings import _schedule, cron_worker_settings, shutdown, startup, worker_settings
from workers.worker import Worker, queue_workers


async def test_the_cron_worker_runs_reclaim_with_its_own_resources_past_a_photo_backlog(server, redis_url, storage, auth, user_id, pool):
    md = auth(user_id)
    begun = await begin(storage, md, fake_jpeg(1000))
    await pool.execute("UPDATE uploads SET expires_at = now() - interval '1 minute' WHERE upload_id = $1::uuid", begun.upload.upload_id)

    settings = server.settings.model_copy(
        update={"redis_url": redis_url, "queue_name": f"mediavault-test:{uuid.uuid4().hex}", "jobs": JobsConfig()}
    )
    options = cron_worker_settings(settings)
    assert options is not None
    redis = await create_pool(options["redis_settings"], default_queue_name=settings.queue_name)
    try:
        # Every photo worker is busy: 50 transcodes wait, and none of them runs here.
        for n in range(50):
            await redis.enqueue_job("transcode_media", f"backlog-{n}", 0, _queue_name=settings.queue_name)
        # What arq's scheduler does at a tick, on the queue of the worker that has the cron jobs.
        assert await redis.enqueue_job("cron:reclaim_stale_uploads", _queue_name=settings.cron_queue) is not None
        worker = Worker(**options, burst=True, handle_signals=False)
        try:
            await worker.async_run()
        finally:
            await worker.close()
        assert await redis.zcard(settings.queue_name) == 50, "the cron worker takes no photo job"
    finally:
        await redis.delete(settings.queue_name)
        await redis.aclose()

    got = (await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=md)).upload
    assert got.state == pb.UPLOAD_STATE_EXPIRED


def test_the_cleanup_jobs_are_scheduled_on_the_cron_queue_alone(make_settings):
    settings = make_settings(queue_name="scheduled", jobs=JobsConfig(prune_telemetry={"enabled": False}))
    photos, videos, crons = queue_workers(settings)
    assert (photos.queue_name, videos.queue_name, crons.queue_name) == ("scheduled", "scheduled:video", "scheduled:cron")
    assert not photos.cron_jobs
    assert not videos.cron_jobs
    enabled = {f"cron:{name}" for name in JobsConfig.model_fields if name != "prune_telemetry"}
    assert {job.name for job in crons.cron_jobs} == enabled
    assert crons.max_jobs == len(enabled), "a long sweep does not hold up the ledger audit"
    assert make_settings(cron_queue_name="cleanup").cron_queue == "cleanup"


def test_with_every_cleanup_job_disabled_there_is_no_cron_worker(make_settings):
    disabled = {name: {"enabled": False} for name in JobsConfig.model_fields}
    assert [worker.queue_name for worker in queue_workers(make_settings(queue_name="none", jobs=JobsConfig(**disabled)))] == [
        "none",
        "none:video",
    ]


async def test_jpeg_planes_off_reaches_the_transcoding_processes(make_settings, monkeypatch):
    monkeypatch.setenv("MEDIAVAULT_IMAGING_JPEG_PLANES", "off")
    ctx = {"settings": make_settings(transcode_workers=1), "redis": None}
    try:
        await startup(ctx)
        result = await ctx["transcoder"].run((CORPUS / "images/camera/jolla.jpg").read_bytes(), "image/jpeg")
    finally:
        await shutdown(ctx)
    assert result.strategy == "pillow"


async def test_the_memory_limit_reaches_the_transcoding_processes(make_settings, monkeypatch):
    monkeypatch.setenv("MEDIAVAULT_TRANSCODE_MEMORY_LIMIT_MB", "300")
    ctx = {"settings": make_settings(transcode_workers=1), "redis": None}
    try:
        await startup(ctx)
        await ctx["transcoder"].prewarm()
        (worker,) = ctx["transcoder"]._idle
        limits = Path(f"/proc/{worker.pid}/limits").read_text()
        status = Path(f"/proc/{worker.pid}/status").read_text()
    finally:
        await shutdown(ctx)
    (line,) = [line for line in limits.splitlines() if line.startswith("Max data size")]
    soft, hard = (int(value) for value in line.split()[3:5])
    (held,) = [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmData:")]
    # 300 MB on top of what the process held when it started, which is at most what it holds now.
    assert soft == hard
    assert 250 * 1024 * 1024 < soft - held <= 300 * 1024 * 1024


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



@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        # The operator believes the sweep is off; it would go on quarantining blobs every night.
        (
            "MEDIAVAULT_JOBS__SWEEP_ORPHAN_BLOBS__ENABLE", "false",
            "MEDIAVAULT_JOBS__SWEEP_ORPHAN_BLOBS__ENABLE\n  names no setting; the closest is MEDIAVAULT_JOBS__SWEEP_ORPHAN_BLOBS__ENABLED",
        ),
        (
            "MEDIAVAULT_JOBS__PURGE_DELETD_MEDIA__AGE_SECONDS", "172800",
            "names no setting; the closest is MEDIAVAULT_JOBS__PURGE_DELETED_MEDIA [",
        ),
        # A job's fields as JSON reach no variable name to check: the job's model refuses them.
        ("MEDIAVAULT_JOBS__SWEEP_ORPHAN_BLOBS", '{"enable": false}', "jobs.sweep_orphan_blobs.enable"),
    ],
)
def test_a_misspelled_cleanup_job_setting_fails_start_up_naming_it(monkeypatch, variable, value, named):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=re.escape(named)):
        Settings()
