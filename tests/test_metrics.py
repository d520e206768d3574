"""What a server and a worker export on METRICS_ADDR, each as operators run it: a subprocess of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import job_key_prefix
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mediavault import db, devservers, metrics
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.media.v1 import media_pb2_grpc
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import CORPUS
from tests.faults import PrivateRedis
from tests.helpers import begin, serve_environment, settled, upload
from tests.test_deploy import (
    ALERTS_FILE,
    ALERTS_TEST_FILE,
    DASHBOARD_FILE,
    SUFFIXES,
    check_names,
    dashboard_queries,
    known_metrics,
    load_yaml,
    source_literals,
)
from tests.test_shutdown import free_port, serving
from tests.test_supervisor import scrape
from tests.workers.test_transcode import start_worker
from workers.maintenance import JOBS

SERVER_GAUGES = {"mediavault_database_up", "mediavault_server_db_connections_in_use", "mediavault_server_db_connections_max"}
WORKER_GAUGES = {"mediavault_worker_redis_up", "mediavault_ledger_mismatches", "mediavault_heavy_reservation_accounts"}
# No cleanup run of a worker here may touch the session's database.
JOBS_OFF = {f"MEDIAVAULT_JOBS__{name.upper()}__ENABLED": "false" for name in JOBS}
PHOTO = CORPUS / "images/formats/hopper.jpg"


async def test_a_server_exports_its_own_gauges_and_none_of_the_workers(database_url, redis_url, tmp_path: Path):
    async with (
        serve_environment(database_url, redis_url, tmp_path / "blobs", MEDIAVAULT_METRICS_ADDR=f"127.0.0.1:{free_port()}") as env,
        serving(env),
    ):
        samples = await scrape(env)
    assert samples["mediavault_database_up"] == [({}, 1.0)]
    # A lone server is slot 0; its pool opens the default DB_POOL_MAX_SIZE.
    assert samples["mediavault_server_db_connections_max"] == [({"slot": "0"}, 10.0)]
    assert not WORKER_GAUGES & set(samples), {name: samples[name] for name in WORKER_GAUGES & set(samples)}


async def test_each_server_process_exports_its_database_pool_held_full_and_how_long_calls_waited_for_it(
    exported_database, redis_url, tmp_path: Path, auth
):
    """`serve --processes 2` with pools of 2 connections: calls blocked on a locked table hold every
    connection of both processes, the calls behind them wait, and the supervisor's /metrics shows
    each process's pool full, by slot, then its waits once the lock goes."""
    pool_size, channels = 2, 16
    async with (
        serve_environment(
            exported_database, redis_url, tmp_path / "blobs",
            MEDIAVAULT_METRICS_ADDR=f"127.0.0.1:{free_port()}", MEDIAVAULT_DB_POOL_MAX_SIZE=str(pool_size),
        ) as env,
        serving(env, processes=2) as (supervisor, port),
    ):
        md = auth(f"user-{uuid.uuid4().hex[:12]}")

        async def summary_on_a_channel_of_its_own() -> int:
            # A connection of its own, which the kernel gives either process: with 16, each gets
            # the 2 calls that fill its pool but for a chance of 1 in 1900.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                reply = await storage_pb2_grpc.StorageServiceStub(channel).GetStorageSummary(
                    pb.GetStorageSummaryRequest(), metadata=md, timeout=60
                )
                return reply.summary.quota_bytes

        def in_use(samples) -> dict[str, float]:
            return {labels["slot"]: value for labels, value in samples.get("mediavault_server_db_connections_in_use", [])}

        # Both processes started (a start-up reads the frozen accounts, which the lock would hold up).
        await scrape_until(
            env, supervisor, lambda samples: len(samples.get("mediavault_server_db_connections_max", [])) == 2, "started both"
        )
        holder = await asyncpg.connect(exported_database)
        try:
            async with holder.transaction():
                await holder.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
                calls = [asyncio.create_task(summary_on_a_channel_of_its_own()) for _ in range(channels)]
                full = await scrape_until(
                    env, supervisor, lambda samples: in_use(samples) == {"0": pool_size, "1": pool_size}, "filled both pools"
                )
                # Every call past the first 2 of each process waits for a connection longer than this.
                await asyncio.sleep(1)
        finally:
            await holder.close()
        answered = await asyncio.gather(*calls)
        idle = await scrape_until(env, supervisor, lambda samples: in_use(samples) == {"0": 0, "1": 0}, "freed both pools")

    assert all(quota > 0 for quota in answered)
    assert sorted(full["mediavault_server_db_connections_max"], key=str) == [({"slot": "0"}, 2.0), ({"slot": "1"}, 2.0)]
    assert sorted(idle["mediavault_server_db_connections_max"], key=str) == [({"slot": "0"}, 2.0), ({"slot": "1"}, 2.0)]
    waits = {labels["le"]: count for labels, count in idle["mediavault_db_connection_wait_seconds_bucket"]}
    [(_, acquired)] = idle["mediavault_db_connection_wait_seconds_count"]
    assert acquired >= channels
    assert acquired - waits["1.0"] >= channels - 2 * pool_size, waits


async def test_every_use_of_a_pool_counts_how_long_it_waited_for_a_connection_given_up_or_not(make_settings):
    pool = await db.create_pool(make_settings(db_pool_min_size=1, db_pool_max_size=2))

    def waits() -> tuple[float, float]:
        """Waits counted, and those of them longer than 0.1 s."""
        counted = REGISTRY.get_sample_value("mediavault_db_connection_wait_seconds_count") or 0.0
        quick = REGISTRY.get_sample_value("mediavault_db_connection_wait_seconds_bucket", {"le": "0.1"}) or 0.0
        return counted, counted - quick

    try:
        counted, slow = waits()
        async with pool.acquire() as connection:
            assert await connection.fetchval("SELECT 1") == 1
        await pool.release(await pool.acquire())
        assert await pool.fetchval("SELECT 2") == 2
        await pool.execute("SELECT 3")
        # At least: the session's server and worker, in this process, count their own waits alike.
        assert waits()[0] >= counted + 4
        async with pool.acquire(), pool.acquire():
            with pytest.raises(TimeoutError):
                await pool.acquire(timeout=0.2)
            with pytest.raises(TimeoutError):
                async with pool.acquire(timeout=0.2):
                    pass
        after = waits()
        assert after[0] >= counted + 8
        assert after[1] >= slow + 2
    finally:
        await db.close_pool(pool)


async def test_a_worker_exports_its_own_gauges_and_none_of_the_servers(make_settings, user_id):
    env = {"MEDIAVAULT_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
    worker = start_worker(make_settings(queue_name=f"metrics:{user_id}"), **env, **JOBS_OFF)
    try:
        samples = await scrape_until(env, worker, lambda samples: "mediavault_worker_redis_up" in samples, "reported a poll of Redis")
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait)
    assert samples["mediavault_worker_redis_up"] == [({}, 1.0)]
    # The audit's gauges appear with the worker's first audit, never as a 0 it did not find.
    assert not (SERVER_GAUGES | WORKER_GAUGES - {"mediavault_worker_redis_up"}) & set(samples), samples.keys()


async def test_a_worker_exports_its_job_slots_in_use_and_their_most(make_settings, storage, auth, user_id, pool):
    # A worker process of its own: in this one, the session's worker sets the same series.
    settings = make_settings(queue_name=f"slot-metrics:{user_id}")
    md = auth(user_id)
    media_ids = [(await upload(storage, md, PHOTO.read_bytes(), filename=f"{i}.jpg")).media_id for i in range(3)]
    # A version of their own, as ReprocessMedia makes: whatever the session's worker does with the
    # uploads' own transcodes (run, running or never), only this test's jobs can claim them.
    await pool.execute(
        "UPDATE media SET variants_version = 1, processing_status = 'pending' WHERE media_id = ANY($1::uuid[])", media_ids
    )

    def slots(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> dict[str, float]:
        return {labels["queue"]: value for labels, value in samples.get(f"mediavault_worker_job_slots_{name}", [])}

    env = {"MEDIAVAULT_METRICS_ADDR": f"127.0.0.1:{free_port()}", "MEDIAVAULT_JOB_TIMEOUT_SECONDS": "60"}
    worker = start_worker(settings, **env, **JOBS_OFF)
    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name)
    try:
        idle = await scrape_until(env, worker, lambda samples: slots(samples, "in_use").get("photo") == 0, "polled")
        async with pool.acquire() as conn, conn.transaction():
            # Each job's claim waits for these locks on its media row: two fill the photo
            # worker's two slots (one transcoding process), the third waits in the queue.
            await conn.execute("SELECT 1 FROM media WHERE media_id = ANY($1::uuid[]) FOR UPDATE", media_ids)
            for media_id in media_ids:
                await redis.enqueue_job("transcode_media", media_id, 1)
            await scrape_until(env, worker, lambda samples: slots(samples, "in_use").get("photo") == 2, "filled its slots")
            await asyncio.sleep(1)
            full = slots(await scrape(env), "in_use")["photo"]
            assert await redis.zcard(settings.queue_name) == 3, "every job still queued or running"
        await scrape_until(env, worker, lambda samples: slots(samples, "in_use").get("photo") == 0, "freed its slots")
        async with asyncio.timeout(60):
            while (rows := await pool.fetch("SELECT processing_status FROM media WHERE media_id = ANY($1::uuid[])", media_ids)) and any(
                row["processing_status"] != "complete" for row in rows
            ):
                await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
        worker.terminate()
        await asyncio.to_thread(worker.wait)
    assert slots(idle, "max") == {"photo": 2, "video": settings.video_workers}
    assert full == 2


async def test_a_worker_exports_how_long_the_oldest_job_of_each_queue_has_waited(make_settings, user_id, redis_url):
    settings = make_settings(queue_name=f"metrics-oldest:{user_id}")
    env = {"MEDIAVAULT_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
    arq = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        # With every cleanup job disabled no worker serves the cron queue, and every worker samples it all the same.
        due = datetime.now(UTC) - timedelta(minutes=20)
        job = await arq.enqueue_job("cron:audit_accounts", _queue_name=settings.cron_queue, _defer_until=due)
        assert job is not None
        worker = start_worker(settings, **env, **JOBS_OFF)
        try:
            samples = await scrape_until(
                env, worker, lambda samples: "mediavault_queue_oldest_waiting_seconds" in samples, "exported the queues' waits"
            )
        finally:
            worker.terminate()
            await asyncio.to_thread(worker.wait)
        await arq.delete(settings.cron_queue, job_key_prefix + job.job_id)
    finally:
        await arq.aclose()
    waited = {labels["queue"]: value for labels, value in samples["mediavault_queue_oldest_waiting_seconds"]}
    assert waited.keys() == {"photo", "video", "cron"}, waited
    assert 20 * 60 <= waited["cron"] < 21 * 60, waited
    assert waited["photo"] == waited["video"] == 0, waited


async def scrape_until(env: dict[str, str], process, done, what: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples of the /metrics of process (a worker, or a supervisor of servers) once
    done(samples) holds, within a minute (a worker samples the queues every 15 s)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        assert process.poll() is None, "the process exited"
        assert asyncio.get_running_loop().time() < deadline, f"the process never {what}"
        with contextlib.suppress(aiohttp.ClientConnectionError):
            samples = await scrape(env)
            if done(samples):
                return samples
        await asyncio.sleep(0.2)


def waits_of_every_queue(samples: dict[str, list[tuple[dict[str, str], float]]]) -> bool:
    # The sampler sets each queue's series in turn: a scrape may come between two of them.
    return {labels["queue"] for labels, _ in samples.get("mediavault_queue_oldest_waiting_seconds", [])} == {"photo", "video", "cron"}


async def test_a_worker_whose_redis_stops_answering_exports_no_queue_wait_and_the_time_of_its_last_sample(make_settings, user_id):
    redis = PrivateRedis()
    redis.start()
    try:
        settings = make_settings(redis_url=redis.url, queue_name=f"metrics-stale:{user_id}")
        arq = await create_pool(RedisSettings.from_dsn(redis.url))
        try:
            # A cron job 20 minutes overdue, which no worker takes with every cleanup job disabled.
            due = datetime.now(UTC) - timedelta(minutes=20)
            assert await arq.enqueue_job("cron:audit_accounts", _queue_name=settings.cron_queue, _defer_until=due) is not None
        finally:
            await arq.aclose()
        env = {"MEDIAVAULT_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
        # The worker waits for Redis longer than this test does, as it would through a failover.
        worker = start_worker(settings, **env, **JOBS_OFF, MEDIAVAULT_WORKER_REDIS_OUTAGE_SECONDS="600")
        try:
            sampled = await scrape_until(env, worker, waits_of_every_queue, "sampled the queues")
            redis.stop()
            stopped = time.time()
            gone = await scrape_until(
                env, worker, lambda samples: "mediavault_queue_oldest_waiting_seconds" not in samples,
                "stopped exporting the wait it sampled before Redis stopped",
            )
            redis.start()
            back = await scrape_until(env, worker, waits_of_every_queue, "sampled again")
        finally:
            worker.terminate()
            await asyncio.to_thread(worker.wait)
    finally:
        redis.close()
    waited = {labels["queue"]: value for labels, value in sampled["mediavault_queue_oldest_waiting_seconds"]}
    assert 20 * 60 <= waited["cron"] < 21 * 60, waited
    assert "mediavault_queue_depth" not in gone, gone["mediavault_queue_depth"]
    [(_, last_sample)] = gone["mediavault_queue_sampled_timestamp_seconds"]
    assert last_sample <= stopped
    assert gone["mediavault_worker_redis_up"] == [({}, 0.0)]
    # The restarted Redis is empty: nothing waits, and the sample is of now.
    assert {labels["queue"]: value for labels, value in back["mediavault_queue_oldest_waiting_seconds"]} == {
        "photo": 0, "video": 0, "cron": 0
    }
    [(_, resumed)] = back["mediavault_queue_sampled_timestamp_seconds"]
    assert resumed > stopped


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


@pytest.fixture
async def exported_database(postgres_admin_url: str) -> AsyncIterator[str]:
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_exported")
    yield dsn
    await devservers.drop_database(postgres_admin_url, dsn)


async def metric_families(metrics_addr: str) -> dict[str, Metric]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{metrics_addr}/metrics") as response:
        assert response.status == 200
        return {family.name: family for family in text_string_to_metric_families(await response.text())}


def sample_labels(families: dict[str, Metric]) -> dict[str, set[str]]:
    """Sample name -> the label names its samples carry, for every sample of the families."""
    labels: dict[str, set[str]] = {}
    for family in families.values():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


async def test_every_metric_the_rules_and_docs_name_is_exported_by_a_running_server_and_worker(
    exported_database, redis_url, tmp_path, auth, user_id, make_settings
):
    """A rule on a metric that is never exported never fires, a panel on one stays empty: what the
    alerting rules, their unit tests and the dashboard's panels read, and the metrics table of
    docs/operations.md, checked against the /metrics of a
    `mediavault serve` and a `mediavault worker` that served an upload, a transcode, a formats job, a
    feed page, events and an audit."""
    server_addr, worker_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    async with serve_environment(exported_database, redis_url, tmp_path / "blobs", MEDIAVAULT_METRICS_ADDR=server_addr) as env:
        settings = make_settings(
            database_url=exported_database, queue_name=env["MEDIAVAULT_QUEUE_NAME"], blob_dir=tmp_path / "blobs"
        )
        jobs = {**JOBS_OFF, "MEDIAVAULT_JOBS__AUDIT_ACCOUNTS__ENABLED": "true"}
        # Two processes: prometheus-client's multiprocess mode exports only the series a process wrote.
        async with serving({**env, "MEDIAVAULT_RATE_LIMITS": "on"}, processes=2) as (_, port):
            worker = start_worker(settings, MEDIAVAULT_METRICS_ADDR=worker_addr, **jobs)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    storage = storage_pb2_grpc.StorageServiceStub(channel)
                    media = media_pb2_grpc.MediaServiceStub(channel)
                    md = auth(user_id)
                    done = await upload(storage, md, PHOTO.read_bytes())
                    cancelled = await begin(storage, md, PHOTO.read_bytes(), filename="cancelled.jpg")
                    await storage.FailUpload(pb.FailUploadRequest(upload_id=cancelled.upload.upload_id), metadata=md)
                    await settled(media, md, done.media_id)
                    await media.GetMedia(mpb.GetMediaRequest(media_id=done.media_id, accept=["image/webp"]), metadata=md)
                    await media.ListFeed(mpb.ListFeedRequest(), metadata=md)
                    events = mpb.RecordEventsRequest()
                    events.events.add(event_type=mpb.USAGE_EVENT_TYPE_IMPRESSION, media_id=done.media_id, surface="feed")
                    await media.RecordEvents(events, metadata=md)
                arq = await create_pool(RedisSettings.from_dsn(redis_url))
                try:
                    await arq.enqueue_job("cron:audit_accounts", _queue_name=settings.cron_queue)
                finally:
                    await arq.aclose()
                deadline = asyncio.get_running_loop().time() + 60
                while True:
                    assert worker.poll() is None, "the worker exited"
                    worker_families = await metric_families(worker_addr)
                    exported = sample_labels(worker_families)
                    if {"mediavault_formats_made_total", "mediavault_ledger_mismatches"} <= set(exported):
                        break
                    assert asyncio.get_running_loop().time() < deadline, f"the worker exported only {sorted(exported)}"
                    await asyncio.sleep(0.2)
                server_families = await metric_families(server_addr)
            finally:
                worker.terminate()
                await asyncio.to_thread(worker.wait)

    exported = {name: labels for role in (server_families, worker_families) for name, labels in sample_labels(role).items()}
    exported["up"] = set()  # Prometheus's own, for every target
    literals = source_literals()
    for rule in load_yaml(ALERTS_FILE)["groups"]:
        for each in rule["rules"]:
            check_names(each["expr"], exported, literals)
    for unit_test in load_yaml(ALERTS_TEST_FILE)["tests"]:
        for series in unit_test["input_series"]:
            check_names(series["series"], exported, literals)
    chartable = exported_or_declared(exported, [*server_families.values(), *worker_families.values()])
    for panel_query in dashboard_queries(json.loads(DASHBOARD_FILE.read_text())).values():
        check_names(panel_query, chartable, literals)

    families = {**server_families, **worker_families}
    documented = documented_metrics()
    defined = {
        wrapper._name + ("_total" if wrapper._type == "counter" else "")
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
    } | {gauge.name for gauge in vars(metrics).values() if isinstance(gauge, metrics.SetGauge)}
    assert set(documented) == defined, "every metric mediavault.metrics defines has its row in the table"
    for name, (kind, labels, conditional) in documented.items():
        family = families.get(name.removesuffix("_total") if kind == "counter" else name)
        assert family is not None, f"{name}: documented, exported by neither the server nor the worker"
        assert family.type == kind, f"{name}: documented as a {kind}, exported as a {family.type}"
        sample = f"{name}_count" if kind == "histogram" else name
        if sample in exported:
            assert labels <= exported[sample] <= labels | conditional, (
                f"{name}: documented with labels {labels} (and {conditional}), exported with {exported[sample]}"
            )


def exported_or_declared(exported: dict[str, set[str]], families: list[Metric]) -> dict[str, set[str]]:
    """The exported samples' names and labels, plus those of the families exported without a sample yet.

    A panel may chart what no event of a run made: a labelled counter's family is exported from
    start-up, its first series with its first event (a Redis fallback); its labels are the code's.
    """
    declared = known_metrics()
    names = dict(exported)
    for family in families:
        for name in (family.name + suffix for suffix in SUFFIXES[family.type]):
            if name not in names:
                names[name] = declared[name]
    return names


def documented_metrics() -> dict[str, tuple[str, set[str], set[str]]]:
    """The table of docs/operations.md "Metrics": name -> (type, label names, label names in
    parentheses, which a mode adds: `pid` under `--processes N`)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    table = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(mediavault_[a-z_]+)` \| (\w+) \|([^|]*)\|", table, re.MULTILINE)
    label = re.compile(r"`([a-z_]+)`")
    return {
        name: (kind, set(label.findall(re.sub(r"\([^)]*\)", "", labels))), set(label.findall("".join(re.findall(r"\([^)]*\)", labels)))))
        for name, kind, labels in rows
    }
