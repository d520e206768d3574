"""A rolling deploy as Kubernetes runs one: SIGTERM to a real `mediavault serve` under load.

The server is a subprocess on a database of its own, so that the signal, the pre-stop
period and the drain are the ones operators get, and a second server started on the same
database afterwards shows what the first one left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yarl
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mediavault import devservers
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.helpers import begin, error_info, fake_jpeg, put, serve_environment

CALLS = 50
USERS = 5
MiB = 1024 * 1024

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def scratch_database(postgres_admin_url: str) -> AsyncIterator[str]:
    dsn = await devservers.create_database(postgres_admin_url, "mediavault_shutdown")
    yield dsn
    await devservers.drop_database(postgres_admin_url, dsn)


@pytest.fixture
async def environment(scratch_database: str, redis_url: str, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    async with serve_environment(scratch_database, redis_url, tmp_path / "blobs") as env:
        yield env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(
    env: dict[str, str], *, processes: int = 1, **settings: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    """`mediavault serve --processes N` in a subprocess, yielded once its health answers SERVING."""
    port = free_port()
    env = {**env, "MEDIAVAULT_GRPC_ADDR": f"127.0.0.1:{port}", **settings}
    process = subprocess.Popen(
        [sys.executable, "-m", "mediavault.cli", "serve", "--processes", str(processes)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while await health_status(port) != SERVING:
            assert process.poll() is None, process.stderr.read().decode()
            assert asyncio.get_running_loop().time() < deadline, "the server never answered SERVING"
            await asyncio.sleep(0.1)
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stderr.close()


async def health_status(port: int) -> int | None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return None
        return reply.status


async def audit_ledger(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "mediavault.cli", "audit-ledger"], env=env, capture_output=True, text=True,
        timeout=60,
    )


@pytest.mark.parametrize("prestop_seconds", [0.0, 1.0], ids=["no-prestop", "prestop"])
async def test_sigterm_under_load_answers_every_call_ok_or_unavailable_and_the_books_add_up(
    environment, auth, prestop_seconds
):
    users = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(USERS)]
    pending: list[tuple[str, str, int]] = []  # (user, upload id, size)
    settings = {"MEDIAVAULT_SHUTDOWN_PRESTOP_SECONDS": str(prestop_seconds), "MEDIAVAULT_SHUTDOWN_GRACE_SECONDS": "10"}

    async with serving(environment, **settings) as (process, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)

            async def prepare(index: int) -> tuple[str, str, int]:
                user = users[index % USERS]
                data = fake_jpeg(10_000 + index * 101)
                begun = await begin(storage, auth(user), data, filename=f"photo-{index}.jpg")
                assert await put(begun.upload_url, dict(begun.upload_headers), data) == 200
                return user, begun.upload.upload_id, len(data)

            pending = list(await asyncio.gather(*(prepare(i) for i in range(CALLS))))

            async def finalize(user: str, upload_id: str) -> tuple[grpc.StatusCode, str]:
                """The call's code, and the ErrorInfo reason of a refusal."""
                try:
                    await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=auth(user), timeout=30)
                except grpc.aio.AioRpcError as error:
                    return error.code(), error_info(error).reason
                return grpc.StatusCode.OK, ""

            calls = [asyncio.create_task(finalize(user, upload_id)) for user, upload_id, _ in pending]
            await asyncio.sleep(0.015)
            process.send_signal(signal.SIGTERM)
            if prestop_seconds:
                await asyncio.sleep(prestop_seconds / 5)
                assert await health_status(port) == NOT_SERVING, "balancers must see the server leave at once"
                summary = await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(users[0]), timeout=5)
                assert summary.summary.quota_bytes > 0, "during the pre-stop period calls are still served"
            answers = await asyncio.gather(*calls)

        assert await asyncio.to_thread(process.wait, 30) == 0
    codes = [code for code, _ in answers]
    outcomes = {code: codes.count(code) for code in set(codes)}
    assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes
    assert {reason for code, reason in answers if code == grpc.StatusCode.UNAVAILABLE} <= {"SERVER_SHUTTING_DOWN"}
    if prestop_seconds:
        assert outcomes == {grpc.StatusCode.OK: CALLS}, "calls sent before the pre-stop period ends are served"

    audited = await audit_ledger(environment)
    assert audited.returncode == 0, audited.stdout + audited.stderr

    async with serving(environment) as (process, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        retried = 0
        for (user, upload_id, size), code in zip(pending, codes, strict=True):
            md = auth(user)
            upload = (await storage.GetUpload(pb.GetUploadRequest(upload_id=upload_id), metadata=md)).upload
            if code == grpc.StatusCode.OK:
                assert upload.state == pb.UPLOAD_STATE_FINALIZED, upload_id
            else:
                assert upload.state in (pb.UPLOAD_STATE_PENDING, pb.UPLOAD_STATE_FINALIZED), upload_id
                retried += 1
            done = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md)
            assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
            assert done.upload.size_bytes == size
        assert retried == outcomes.get(grpc.StatusCode.UNAVAILABLE, 0)
        for user in users:
            summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user))).summary
            sizes = [size for owner, _, size in pending if owner == user]
            assert (summary.used_bytes, summary.reserved_bytes, summary.pending_uploads, summary.media_count) == (
                sum(sizes), 0, 0, len(sizes)
            )

    audited = await audit_ledger(environment)
    assert audited.returncode == 0, audited.stdout + audited.stderr


async def stalled_put(upload_url: str, headers: dict[str, str], body: bytes, sent: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A signed PUT of body that sends its first `sent` bytes and stalls, its connection kept open."""
    url = yarl.URL(upload_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"PUT {url.raw_path_qs} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n{head}\r\n".encode() + body[:sent])
    await writer.drain()
    return reader, writer


async def test_the_partial_file_of_a_server_killed_mid_put_is_removed_by_the_next_to_start(environment, auth, tmp_path):
    temp_dir = tmp_path / "blobs" / ".tmp"
    md = auth(f"user-{uuid.uuid4().hex[:12]}")
    living_body, killed_body = fake_jpeg(2 * MiB), fake_jpeg(6 * MiB)

    async def stalled(port: int, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Path]:
        """The PUT of body's first half to the server on port, and the temp file it is written to."""
        before = written()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            begun = await begin(storage_pb2_grpc.StorageServiceStub(channel), md, body)
        reader, writer = await stalled_put(begun.upload_url, dict(begun.upload_headers), body, len(body) // 2)
        async with asyncio.timeout(30):
            while not (new := written() - before):
                await asyncio.sleep(0.05)
        (partial,) = new
        return reader, writer, partial

    def written() -> set[Path]:
        return {path for path in temp_dir.rglob("*") if path.is_file() and path.stat().st_size}

    async with serving(environment) as (_, living_port):
        living_reader, living_writer, living_partial = await stalled(living_port, living_body)
        try:
            async with serving(environment) as (killed, killed_port):
                _, killed_writer, killed_partial = await stalled(killed_port, killed_body)
                killed.kill()
                await asyncio.to_thread(killed.wait)
                killed_writer.close()
            assert killed_partial.exists()
            async with serving(environment):
                assert not killed_partial.exists(), "the killed server's partial file is left on disk"
                assert living_partial.exists(), "a living server's temp file was removed"
            # Published from its temp file, which it could not be had that gone.
            living_writer.write(living_body[MiB:])
            async with asyncio.timeout(30):
                assert (await living_reader.readline()).startswith(b"HTTP/1.1 200 ")
        finally:
            living_writer.close()
    # A server that exits leaves nothing behind.
    assert not list(temp_dir.iterdir())
