"""Real PostgreSQL and Redis for every test run.

MEDIAVAULT_TEST_DATABASE_URL / MEDIAVAULT_TEST_REDIS_URL point at existing servers
(CI sets them); otherwise mediavault.devservers starts embedded ones for the run.
Either way the run works in a database of its own, dropped at the end.

A suite that must hold behind PgBouncer too takes `stack`, parametrized over POOLERS, and
overrides pool/server/storage with the stack's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest

from mediavault import devservers
from mediavault.auth import Authenticator
from mediavault.config import JobsConfig, Settings
from mediavault.db import create_pool, migrate
from mediavault.media.v1 import media_pb2_grpc
from mediavault.server import Server
from mediavault.storage.v1 import storage_pb2_grpc
from workers.worker import Worker, queue_workers

JWT_SECRET = "test-secret-not-for-production-0123456789"
CORPUS = Path(os.environ.get("MEDIAVAULT_TEST_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus")


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    with devservers.postgres(os.environ.get("MEDIAVAULT_TEST_DATABASE_URL", "")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with devservers.redis(os.environ.get("MEDIAVAULT_TEST_REDIS_URL", "")) as url:
        yield url


@pytest.fixture(scope="session")
async def database_url(postgres_admin_url: str) -> AsyncIterator[str]:
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_test")
    await migrate(dsn)
    yield dsn
    await devservers.drop_database(postgres_admin_url, dsn)


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def pgbouncer_database_url(postgres_admin_url: str, database_url: str) -> Iterator[str]:
    """The run's database through PgBouncer in transaction mode, 5 server connections for all its clients."""
    with devservers.pgbouncer(postgres_admin_url, pool_size=5) as admin_url:
        yield devservers.with_database(admin_url, urlsplit(database_url).path.lstrip("/"))


@pytest.fixture(scope="session")
def authenticator() -> Authenticator:
    return Authenticator(JWT_SECRET)


@pytest.fixture
def user_id() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def make_settings(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    queue_name = f"mediavault-test:{uuid.uuid4().hex}"
    # One blob dir for the run: every server it starts enqueues to the same queue, so the
    # session worker must find their originals.
    blob_dir = tmp_path_factory.mktemp("blobs")

    def make(**overrides) -> Settings:
        values = {
            "database_url": database_url,
            "redis_url": redis_url,
            "queue_name": queue_name,
            "grpc_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "blob_backend": "fs",
            "blob_dir": blob_dir,
            "jwt_secret": JWT_SECRET,
            "db_pool_max_size": 20,
            "shutdown_grace_seconds": 1.0,
            # Suites that make hundreds of calls as one user; tests/test_ratelimit.py turns limits on.
            "rate_limits": "off",
            # Tests run the cleanup jobs by hand; the session worker's crons firing on the
            # shared database every few minutes would race them.
            "jobs": {name: {"enabled": False} for name in JobsConfig.model_fields},
        }
        values.update(overrides)
        return Settings(**values)

    return make


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Server]:
    async with Server(settings) as server:
        yield server


@pytest.fixture(scope="session")
async def server(make_settings) -> AsyncIterator[Server]:
    async with running(make_settings()) as server:
        yield server


@pytest.fixture(scope="session")
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def storage(channel: grpc.aio.Channel) -> storage_pb2_grpc.StorageServiceStub:
    return storage_pb2_grpc.StorageServiceStub(channel)


@pytest.fixture(scope="session")
def media(channel: grpc.aio.Channel) -> media_pb2_grpc.MediaServiceStub:
    return media_pb2_grpc.MediaServiceStub(channel)


@pytest.fixture(scope="session")
def auth(authenticator: Authenticator):
    """auth(user_id, *roles) -> call metadata carrying a bearer token."""

    def metadata(user_id: str, *roles: str) -> tuple[tuple[str, str], ...]:
        token = authenticator.issue(user_id, roles or ("user",))
        return (("authorization", f"Bearer {token}"),)

    return metadata


def _in_flight(*workers: Worker) -> bool:
    return any(not task.done() for worker in workers for task in worker.tasks.values())


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """Real arq workers in this event loop, as `mediavault worker` runs them: the settings'
    queue with its transcoder pool (yielded), the video queue and the cron queue.

    The jobs still running at the end finish before the workers close (up to a minute): a
    job's outcome shows in PostgreSQL before arq records it in Redis, and closing in between
    cancels the job's task, whose CancelledError the close then raises into the test.
    """
    workers = queue_workers(settings)
    tasks = [asyncio.create_task(worker.async_run()) for worker in workers]
    try:
        yield workers[0]
        deadline = asyncio.get_running_loop().time() + 60
        while _in_flight(*workers) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
    finally:
        for worker in workers:
            await worker.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture(scope="session")
async def worker(server: Server) -> AsyncIterator[Worker]:
    async with running_worker(server.settings) as worker:
        yield worker


POOLERS = ("none", "pgbouncer")


class Stack(NamedTuple):
    """A server and a pool of the test's own, both straight to PostgreSQL or both through PgBouncer."""

    settings: Settings
    server: Server
    pool: asyncpg.Pool
    storage: storage_pb2_grpc.StorageServiceStub


@pytest.fixture(scope="session", params=POOLERS)
async def stack(request: pytest.FixtureRequest, make_settings) -> AsyncIterator[Stack]:
    if request.param == "pgbouncer":
        settings = make_settings(database_url=request.getfixturevalue("pgbouncer_database_url"), database_pooler="pgbouncer")
    else:
        settings = make_settings()
    pool = await create_pool(settings)
    try:
        async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            yield Stack(settings, server, pool, storage_pb2_grpc.StorageServiceStub(channel))
    finally:
        await pool.close()
