"""`mediavault serve --processes 2` as operators run it: a subprocess whose two children share the
gRPC and blob ports, each serving calls, replaced when killed, drained together on SIGTERM, and
counted together on the parent's metrics endpoint.

Which process served what is read from prometheus-client's per-process files, in the
PROMETHEUS_MULTIPROC_DIR the supervisor gave its children.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import boto3
import grpc
import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from mediavault import devservers, supervisor
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.helpers import begin, fake_jpeg, fetch, put, serve_environment
from tests.s3server import moto_server
from tests.test_shutdown import NOT_SERVING, SERVING, audit_ledger, free_port, health_status, serving

PROCESSES = 2
# Each channel is a connection of its own, which the kernel gives one of the listeners: with 16,
# all landing on the same process has a chance of one in 32768.
CHANNELS = 16
CALLS_PER_CHANNEL = 3
EXITS_WATCHED = 3


@pytest.fixture
async def supervised_database(postgres_admin_url: str) -> AsyncIterator[str]:
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_supervisor")
    yield dsn
    await devservers.drop_database(postgres_admin_url, dsn)


@pytest.fixture
async def environment(supervised_database: str, redis_url: str, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    async with serve_environment(
        supervised_database, redis_url, tmp_path / "blobs", MEDIAVAULT_METRICS_ADDR=f"127.0.0.1:{free_port()}"
    ) as env:
        yield env


def listening_children(process: subprocess.Popen[bytes], port: int) -> list[int]:
    """Pids of the supervisor's children that listen on the port."""
    pids = []
    for child in psutil.Process(process.pid).children():
        try:
            connections = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            pids.append(child.pid)
    return sorted(pids)


async def children_listening(process: subprocess.Popen[bytes], port: int, without: int = 0) -> list[int]:
    """Waits until PROCESSES children, none of them pid `without`, listen on the port."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        pids = listening_children(process, port)
        if len(pids) == PROCESSES and without not in pids:
            return pids
        assert process.poll() is None, "the supervisor exited"
        assert asyncio.get_running_loop().time() < deadline, f"listening: {pids}"
        await asyncio.sleep(0.05)


def metrics_dir_of(pid: int) -> Path:
    return Path(psutil.Process(pid).environ()["PROMETHEUS_MULTIPROC_DIR"])


def calls_by_process(metrics_dir: Path, method: str) -> dict[int, float]:
    """OK calls of one StorageService method each process counted, from its own metrics file."""
    calls = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        calls[pid] = sum(
            sample.value
            for family in MultiProcessCollector.merge([str(path)])
            if family.name == "mediavault_rpc"
            for sample in family.samples
            if sample.name == "mediavault_rpc_total" and sample.labels["method"] == method and sample.labels["outcome"] == "OK"
        )
    return calls


async def scrape(env: dict[str, str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The supervisor's /metrics: every sample's labels and value, by sample name."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{env['MEDIAVAULT_METRICS_ADDR']}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def exported_calls(samples, method: str) -> float:
    return sum(value for labels, value in samples["mediavault_rpc_total"] if labels["method"] == method and labels["outcome"] == "OK")


async def summaries_on_fresh_channels(port: int, md, channels: int = CHANNELS, wait_for_ready: bool = False) -> int:
    """CALLS_PER_CHANNEL GetStorageSummary calls on each of `channels` new connections; the number
    answered. wait_for_ready: a connection refused or reset is tried again, as a client's retries do."""

    async def on_one_channel() -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            for _ in range(CALLS_PER_CHANNEL):
                reply = await storage.GetStorageSummary(
                    pb.GetStorageSummaryRequest(), metadata=md, timeout=10, wait_for_ready=wait_for_ready
                )
                assert reply.summary.quota_bytes > 0
            return CALLS_PER_CHANNEL

    return sum(await asyncio.gather(*(on_one_channel() for _ in range(channels))))


async def test_every_process_serves_and_the_parent_exports_all_their_calls(environment, auth):
    md = auth(f"user-{uuid.uuid4().hex[:12]}")
    async with serving(environment, processes=PROCESSES) as (process, port):
        pids = await children_listening(process, port)
        metrics_dir = metrics_dir_of(pids[0])
        answered = await summaries_on_fresh_channels(port, md)

        by_process = calls_by_process(metrics_dir, "GetStorageSummary")
        assert set(by_process) == set(pids)
        assert all(by_process[pid] > 0 for pid in pids), by_process
        assert sum(by_process.values()) == answered == CHANNELS * CALLS_PER_CHANNEL

        samples = await scrape(environment)
        assert exported_calls(samples, "GetStorageSummary") == answered
        # Each process reports its own database probe.
        assert sorted((int(labels["pid"]), value) for labels, value in samples["mediavault_database_up"]) == [
            (pid, 1.0) for pid in pids
        ]


async def test_every_process_serves_http_on_an_ipv6_address(environment):
    http_port = free_port()
    async with serving(environment, processes=PROCESSES, MEDIAVAULT_HTTP_ADDR=f"[::]:{http_port}") as (process, _):
        await children_listening(process, http_port)
        for host in ("[::1]", "127.0.0.1"):
            status, _, _ = await fetch(f"http://{host}:{http_port}/healthz")
            assert status == 200, host
        assert process.poll() is None


async def test_on_s3_every_process_serves_tus_on_the_one_port_its_urls_name(environment, auth):
    """HTTP_ADDR port 0 is one port for all the children on S3 too, where HTTP carries only tus:
    a tus URL one process signs is served by whichever process the kernel hands the PATCH."""
    async with moto_server() as moto:
        bucket = f"supervised-{uuid.uuid4().hex[:12]}"
        await asyncio.to_thread(boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1").create_bucket, Bucket=bucket)
        s3 = {"MEDIAVAULT_BLOB_BACKEND": "s3", "MEDIAVAULT_S3_ENDPOINT_URL": moto.endpoint_url, "MEDIAVAULT_S3_BUCKET": bucket}
        async with serving({**environment, **s3}, processes=PROCESSES) as (process, port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                storage = storage_pb2_grpc.StorageServiceStub(channel)
                begun = await begin(storage, auth(f"user-{uuid.uuid4().hex[:8]}"), fake_jpeg(1000), protocol=pb.UPLOAD_PROTOCOL_TUS)
            tus_port = urlsplit(begun.upload_url).port
            assert tus_port
            assert len(await children_listening(process, tus_port)) == PROCESSES


async def test_a_killed_process_is_restarted_and_the_service_keeps_answering(environment, auth):
    md = auth(f"user-{uuid.uuid4().hex[:12]}")
    async with serving(environment, processes=PROCESSES) as (process, port):
        victim, survivor = await children_listening(process, port)
        metrics_dir = metrics_dir_of(survivor)
        answered = await summaries_on_fresh_channels(port, md)

        os.kill(victim, signal.SIGKILL)
        while victim in listening_children(process, port):
            await asyncio.sleep(0.01)
        # One process left: every new connection goes to it. A connection the kernel had queued on
        # the killed process's listener as it closed is reset: the clients connect again.
        answered += await summaries_on_fresh_channels(port, md, wait_for_ready=True)
        assert await health_status(port) == SERVING

        restarted = [pid for pid in await children_listening(process, port, without=victim) if pid != survivor]
        assert len(restarted) == 1
        answered += await summaries_on_fresh_channels(port, md)

        by_process = calls_by_process(metrics_dir, "GetStorageSummary")
        assert by_process[restarted[0]] > 0, by_process
        samples = await scrape(environment)
        # The killed process's calls stay in the sum: the counter never goes back.
        assert exported_calls(samples, "GetStorageSummary") == answered == sum(by_process.values())
        assert sorted(int(labels["pid"]) for labels, _ in samples["mediavault_database_up"]) == sorted(
            (survivor, restarted[0])
        )
        # Nothing else a process exports per pid outlives it, and servers export no worker gauge.
        per_pid = {name: {int(labels["pid"]) for labels, _ in series if "pid" in labels} for name, series in samples.items()}
        assert {name: pids for name, pids in per_pid.items() if pids} == {"mediavault_database_up": {survivor, restarted[0]}}
    assert process.returncode == 0


async def test_sigterm_drains_every_process_and_the_books_add_up(environment, auth):
    users = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(4)]
    settings = {"MEDIAVAULT_SHUTDOWN_PRESTOP_SECONDS": "1", "MEDIAVAULT_SHUTDOWN_GRACE_SECONDS": "10"}
    async with serving(environment, processes=PROCESSES, **settings) as (process, port):
        pids = await children_listening(process, port)
        metrics_dir = metrics_dir_of(pids[0])
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CHANNELS)
        ]
        try:
            stubs = [storage_pb2_grpc.StorageServiceStub(channel) for channel in channels]

            async def prepare(index: int) -> tuple[int, str, str]:
                user = users[index % len(users)]
                data = fake_jpeg(8_000 + index * 97)
                begun = await begin(stubs[index % CHANNELS], auth(user), data, filename=f"photo-{index}.jpg")
                assert await put(begun.upload_url, dict(begun.upload_headers), data) == 200
                return index, user, begun.upload.upload_id

            pending = await asyncio.gather(*(prepare(i) for i in range(3 * CHANNELS)))
            async def finalize(index: int, user: str, upload_id: str) -> pb.FinalizeUploadResponse:
                request = pb.FinalizeUploadRequest(upload_id=upload_id)
                return await stubs[index % CHANNELS].FinalizeUpload(request, metadata=auth(user), timeout=30)

            calls = [asyncio.create_task(finalize(*prepared)) for prepared in pending]
            await asyncio.sleep(0.015)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            assert [await health_status(port) for _ in range(4)] == [NOT_SERVING] * 4, "every process leaves at once"
            done = await asyncio.gather(*calls)
            # Read before the supervisor removes the files, which the pre-stop period leaves time for.
            by_process = calls_by_process(metrics_dir, "FinalizeUpload")
        finally:
            for channel in channels:
                await channel.close()
        assert await asyncio.to_thread(process.wait, 30) == 0
    assert {d.upload.state for d in done} == {pb.UPLOAD_STATE_FINALIZED}, "calls sent before the pre-stop period ends are served"
    assert not [pid for pid in pids if psutil.pid_exists(pid)], "every child has exited"
    assert not metrics_dir.exists()
    assert all(by_process[pid] > 0 for pid in pids), by_process
    assert sum(by_process.values()) == len(pending)

    audited = await audit_ledger(environment)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert f"ledger audit ok: {len(users)} account(s) add up" in audited.stdout


async def test_processes_drain_and_exit_when_the_supervisor_is_killed(environment, tmp_path):
    # Supervisors sharing one temp dir, as on one host, where each makes its run's metrics folder.
    environment = {**environment, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    async with serving(environment, processes=PROCESSES) as (process, port):
        pids = await children_listening(process, port)
        metrics_dir = metrics_dir_of(pids[0])
        children = [psutil.Process(pid) for pid in pids]
        process.kill()
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 30)
        assert not alive, "orphaned server processes would hold the ports"
        assert await health_status(port) is None
    assert any(metrics_dir.glob("*.db"))
    # The next supervisor to start removes the killed one's metrics files.
    async with serving(environment, processes=PROCESSES) as (process, port):
        next_metrics_dir = metrics_dir_of((await children_listening(process, port))[0])
        assert not metrics_dir.exists(), "the killed supervisor's metrics folder is left on disk"
        assert next_metrics_dir.is_dir()
    assert not list((tmp_path / "tmp").iterdir())


async def test_a_process_that_keeps_failing_is_restarted_ever_later(environment, supervised_database):
    # Migrations reach the database, the servers' own pools do not: every child exits at start-up.
    env = {
        **environment,
        "MEDIAVAULT_MIGRATE_DATABASE_URL": supervised_database,
        "MEDIAVAULT_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/unreachable",
        "MEDIAVAULT_LOG_FORMAT": "json",
        "MEDIAVAULT_GRPC_ADDR": "127.0.0.1:0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediavault.cli", "serve", "--processes", str(PROCESSES),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    delays: dict[int, list[float]] = {slot: [] for slot in range(PROCESSES)}
    try:
        async with asyncio.timeout(90):
            while min(len(d) for d in delays.values()) < EXITS_WATCHED:
                line = await process.stderr.readline()
                assert line, "the supervisor keeps going"
                entry = json.loads(line) if line.startswith(b"{") else {}
                if entry.get("msg") == "server process exited; restarting it":
                    delays[entry["slot"]].append(entry["restart_in_seconds"])
    finally:
        process.send_signal(signal.SIGTERM)
        await process.communicate()
    for slot_delays in delays.values():
        assert slot_delays[:EXITS_WATCHED] == [0.5 * 2**exit_ for exit_ in range(EXITS_WATCHED)], delays



async def test_a_stop_while_the_processes_still_start_is_a_clean_exit(environment):
    env = {**environment, "MEDIAVAULT_LOG_FORMAT": "json", "MEDIAVAULT_LOG_LEVEL": "info", "MEDIAVAULT_GRPC_ADDR": "127.0.0.1:0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediavault.cli", "serve", "--processes", str(PROCESSES),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    async with asyncio.timeout(60):
        while True:
            line = await process.stderr.readline()
            assert line, "the supervisor exited before starting its processes"
            if line.startswith(b"{") and json.loads(line).get("msg") == "server processes started":
                break
        # At once: the children are still importing, their SIGTERM handlers not yet installed.
        process.send_signal(signal.SIGTERM)
        _, rest = await process.communicate()
    stopped = [json.loads(line) for line in rest.splitlines() if b'"server processes stopped"' in line]
    assert [entry["clean"] for entry in stopped] == [True]
    assert process.returncode == 0


async def test_a_second_supervisor_on_the_same_port_refuses_to_start(environment):
    async with serving(environment, processes=PROCESSES) as (first, port):
        await children_listening(first, port)
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mediavault.cli", "serve", "--processes", str(PROCESSES),
            env={**environment, "MEDIAVAULT_GRPC_ADDR": f"127.0.0.1:{port}"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            _, errors = await second.communicate()
        assert second.returncode == 1
        assert f"cannot take 127.0.0.1:{port}: Address already in use" in errors.decode()
        assert len(listening_children(first, port)) == PROCESSES
        assert await health_status(port) == SERVING


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, None),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    ],
)
def test_the_cgroup_cpu_quota_is_read_as_a_container_sees_it(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert supervisor.cpu_quota(tmp_path) == expected


def test_one_process_per_core_stays_within_the_cpu_quota(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert supervisor.process_count(0, tmp_path) == cores
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert supervisor.process_count(0, tmp_path) == min(cores, 2)
    (tmp_path / "cpu.max").write_text("10000 100000\n")
    assert supervisor.process_count(0, tmp_path) == 1
    assert supervisor.process_count(3, tmp_path) == 3
