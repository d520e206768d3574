"""Scale-out on one machine: two servers (one of them `serve --processes 2`) and two workers, each a
process of its own, behind one PgBouncer in transaction mode, on one PostgreSQL, one Redis and
the fs backend's shared directory.

Every upload begins on one server and is finalized on the other; the workers share the
transcodes; the feed and the storage figures read the same through both servers, a deletion
through one shows through the other; and afterwards the ledger audit is clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mediavault import devservers
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.media.v1 import media_pb2_grpc
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.helpers import begin, fetch, put, serve_environment, settled
from tests.test_pgbouncer import database_name
from tests.test_shutdown import audit_ledger, free_port, serving

USERS = 4
PHOTOS_PER_USER = 3
WORKERS = 2


def photo(index: int) -> bytes:
    """A small JPEG of its own colour, so every upload is a distinct object."""
    buffer = io.BytesIO()
    Image.new("RGB", (96 + index, 64), ((index * 37) % 256, (index * 91) % 256, 128)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
async def scale_database(postgres_admin_url: str) -> AsyncIterator[str]:
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_scale")
    yield dsn
    await devservers.drop_database(postgres_admin_url, dsn)


@pytest.fixture
async def environment(scale_database: str, pgbouncer_database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    async with serve_environment(
        devservers.with_database(pgbouncer_database_url, database_name(scale_database)),
        redis_url,
        tmp_path / "blobs",
        MEDIAVAULT_DATABASE_POOLER="pgbouncer",
        MEDIAVAULT_MIGRATE_DATABASE_URL=scale_database,
        MEDIAVAULT_TRANSCODE_WORKERS="1",
        MEDIAVAULT_DB_POOL_MAX_SIZE="4",
    ) as env:
        yield env


@contextlib.asynccontextmanager
async def workers(env: dict[str, str]) -> AsyncIterator[list[str]]:
    """WORKERS `mediavault worker` processes on the servers' queue, yielded once each polls it; yields
    their metrics addresses."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(WORKERS)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mediavault.cli", "worker"],
            env={**env, "MEDIAVAULT_METRICS_ADDR": address},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        for address in addresses
    ]
    try:
        for process, address in zip(processes, addresses, strict=True):
            await polling(process, address)
        yield addresses
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                assert await asyncio.to_thread(process.wait, 30) == 0
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()


async def polling(process: subprocess.Popen[bytes], metrics_address: str) -> None:
    """Waits until the worker's start-up has run (it opens its metrics endpoint there, then polls)."""
    deadline = asyncio.get_running_loop().time() + 60
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://{metrics_address}/metrics") as response:
                    if response.status == 200:
                        return
            assert process.poll() is None, "the worker exited"
            assert asyncio.get_running_loop().time() < deadline, "the worker never started"
            await asyncio.sleep(0.1)


async def transcodes_completed(address: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://{address}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mediavault_transcode_total" and sample.labels["outcome"] == "complete"
    )


class Client:
    """Both services of one server."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.storage = storage_pb2_grpc.StorageServiceStub(channel)
        self.media = media_pb2_grpc.MediaServiceStub(channel)


async def feed_ids(client: Client, md) -> list[str]:
    page = await client.media.ListFeed(mpb.ListFeedRequest(page_size=100), metadata=md)
    return [m.media_id for m in page.media]


async def summary(client: Client, md) -> tuple[int, int, int, int]:
    s = (await client.storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    return s.used_bytes, s.reserved_bytes, s.pending_uploads, s.media_count


async def test_two_servers_and_two_workers_behind_one_pgbouncer_keep_every_invariant(environment, scale_database, auth):
    users = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(USERS)]
    async with workers(environment) as worker_metrics:
        async with (
            serving(environment, processes=2) as (_, port_a),
            serving(environment) as (_, port_b),
            grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as channel_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as channel_b,
        ):
            servers = (Client(channel_a), Client(channel_b))

            async def upload(user_index: int, photo_index: int) -> tuple[str, str, int]:
                """Begin on one server, PUT to its signed URL, Finalize on the other."""
                md = auth(users[user_index])
                index = user_index * PHOTOS_PER_USER + photo_index
                first, second = servers[index % 2], servers[1 - index % 2]
                data = photo(index)
                begun = await begin(first.storage, md, data, filename=f"photo-{index}.jpg")
                assert await put(begun.upload_url, dict(begun.upload_headers), data) == 200
                done = await second.storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
                assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
                return users[user_index], done.media_id, len(data)

            uploaded = await asyncio.gather(*(upload(u, p) for u in range(USERS) for p in range(PHOTOS_PER_USER)))
            sizes = {media_id: size for _, media_id, size in uploaded}
            owned = {user: [media_id for owner, media_id, _ in uploaded if owner == user] for user in users}

            for index, (user, media_id, _) in enumerate(uploaded):
                item = await settled(servers[index % 2].media, auth(user), media_id)
                assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE, item.processing_error
                # The variant a worker wrote, served by the listener of the server that signed its URL.
                thumbnail = next(v for v in item.variants if v.name == "thumbnail")
                status, body, _ = await fetch(thumbnail.url)
                assert (status, len(body)) == (200, thumbnail.size_bytes)

            for user in users:
                md = auth(user)
                feeds = [await feed_ids(server, md) for server in servers]
                assert feeds[0] == feeds[1]
                assert set(feeds[0]) == set(owned[user])
                expected = (sum(sizes[m] for m in owned[user]), 0, 0, PHOTOS_PER_USER)
                assert [await summary(server, md) for server in servers] == [expected, expected]

                # Deleted through one server, gone from the other's feed at once (the cache is shared).
                gone = owned[user][0]
                await servers[0].media.DeleteMedia(mpb.DeleteMediaRequest(media_id=gone), metadata=md)
                assert gone not in await feed_ids(servers[1], md)
                left = [m for m in owned[user] if m != gone]
                assert await summary(servers[1], md) == (sum(sizes[m] for m in left), 0, 0, len(left))

        completed = [await transcodes_completed(address) for address in worker_metrics]
    assert sum(completed) == USERS * PHOTOS_PER_USER
    assert all(completed), f"both workers transcode: {completed}"

    audited = await audit_ledger(environment)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert f"ledger audit ok: {USERS} account(s) add up" in audited.stdout
    job = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "mediavault.cli", "jobs", "run", "audit_accounts"], env=environment,
        capture_output=True, text=True, timeout=60,
    )
    assert job.returncode == 0, job.stdout + job.stderr
    report = json.loads(job.stdout)
    assert (report["errors"], report["details"]) == (0, {"ledger_mismatches": 0, "heavy_reservations": 0})

    conn = await asyncpg.connect(scale_database)
    try:
        rows = await conn.fetch("SELECT processing_status, deleted_at IS NOT NULL AS deleted, count(*) FROM media GROUP BY 1, 2")
    finally:
        await conn.close()
    assert {(row["processing_status"], row["deleted"]): row["count"] for row in rows} == {
        ("complete", False): USERS * (PHOTOS_PER_USER - 1),
        ("complete", True): USERS,
    }
