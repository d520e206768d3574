"""What a server and a worker export on METRICS_ADDR, each as operators run it: a subprocess of its own."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp

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
