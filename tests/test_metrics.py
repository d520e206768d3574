"""What a server and a worker export on METRICS_ADDR, each as operators run it: a subprocess of its own."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from mediavault import metrics
from tests.helpers import serve_environment
from tests.test_shutdown import free_port, serving
from tests.test_supervisor import scrape
from tests.workers.test_transcode import start_worker
from workers.maintenance import JOBS

SERVER_GAUGES = {"mediavault_database_up"}
WORKER_GAUGES = {"mediavault_worker_redis_up", "mediavault_ledger_mismatches", "mediavault_heavy_reservation_accounts"}
# No cleanup run of a worker here may touch the session's database.
JOBS_OFF = {f"MEDIAVAULT_JOBS__{name.upper()}__ENABLED": "false" for name in JOBS}


async def test_a_server_exports_its_own_gauges_and_none_of_the_workers(database_url, redis_url, tmp_path: Path):
    async with (
        serve_environment(database_url, redis_url, tmp_path / "blobs", MEDIAVAULT_METRICS_ADDR=f"127.0.0.1:{free_port()}") as env,
        serving(env),
    ):
        samples = await scrape(env)
    assert samples["mediavault_database_up"] == [({}, 1.0)]
    assert not WORKER_GAUGES & set(samples), {name: samples[name] for name in WORKER_GAUGES & set(samples)}


async def test_a_worker_exports_its_own_gauges_and_none_of_the_servers(make_settings, user_id):
    env = {"MEDIAVAULT_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
    worker = start_worker(make_settings(queue_name=f"metrics:{user_id}"), **env, **JOBS_OFF)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            assert worker.poll() is None, "the worker exited"
            assert asyncio.get_running_loop().time() < deadline, "the worker never reported a poll of Redis"
            with contextlib.suppress(aiohttp.ClientConnectionError):
                samples = await scrape(env)
                if "mediavault_worker_redis_up" in samples:
                    break
            await asyncio.sleep(0.1)
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait)
    assert samples["mediavault_worker_redis_up"] == [({}, 1.0)]
    # The audit's gauges appear with the worker's first audit, never as a 0 it did not find.
    assert not (SERVER_GAUGES | WORKER_GAUGES - {"mediavault_worker_redis_up"}) & set(samples), samples.keys()


def bucket_landed_in(histogram: MetricWrapperBase, seconds: float, **labels: str) -> float:
    """The upper bound of the bucket an observation of `seconds` lands in (inf: none but +Inf)."""
    name = histogram._name

    def counts() -> dict[float, float]:
        return {
            float(sample.labels["le"]): sample.value
            for family in REGISTRY.collect()
            if family.name == name
            for sample in family.samples
            if sample.name == f"{name}_bucket" and all(sample.labels[key] == value for key, value in labels.items())
        }

    before = counts()
    histogram.labels(**labels).observe(seconds)
    return min(le for le, count in counts().items() if count > before.get(le, 0))


def test_video_transcodes_of_minutes_land_in_buckets_of_their_own_scale(make_settings):
    settings = make_settings()
    longest = settings.video_timeout_seconds(settings.video_max_duration_seconds)
    # bench/README.md, video: the ladder runs at about a quarter of real time (its
    # realtime_factor), so a short clip takes a minute or two and the longest video four times
    # VIDEO_MAX_DURATION_SECONDS; the slowest one that finishes takes its whole limit.
    for seconds in (80.0, 4 * settings.video_max_duration_seconds, longest):
        upper = bucket_landed_in(metrics.TRANSCODE_SECONDS, seconds, kind="video")
        assert seconds <= upper <= 2 * seconds, (seconds, upper)


@pytest.mark.parametrize("seconds", [45.0, 420.0, 1500.0])
def test_client_streaming_uploads_of_minutes_land_in_buckets_of_their_own_scale(seconds):
    # A video of up to MAX_VIDEO_BYTES sent over a mobile link takes minutes.
    upper = bucket_landed_in(metrics.RPC_LATENCY, seconds, service="StorageService", method="UploadContent")
    assert seconds <= upper <= 2 * seconds, upper
