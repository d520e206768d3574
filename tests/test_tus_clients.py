"""Real tus clients against `mediavault serve` processes: cut connections, killed servers, two replicas.

tuspy (PyPI) and tus-js-client (npm, under Node) upload through a TCP proxy that kills
every connection at about 50%; then the server process is SIGKILLed at about 90% and
started again on the same ports; the client resumes from HEAD each time, resends at most
one chunk, and the finalized object's SHA-256 is the source file's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import boto3
import grpc
import pytest
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError, TusUploadFailed

from mediavault.config import Settings
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.faults import TcpProxy, free_port
from tests.helpers import fake_jpeg, serve_environment, sha256_hex
from tests.s3server import MotoServer, moto_server

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
CHUNK = 5 * MiB
SIZE = 12 * MiB + 4321
TUS = {"Tus-Resumable": "1.0.0"}
# The killed server's writer holds the upload until its lease lapses (423 till then): a client
# retrying once a second goes on for longer than that.
TUSPY_RETRIES = int(Settings.model_fields["tus_lease_seconds"].default) + 5


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """tus-js-client installed by the repository's own script, into the gitignored .node-test/."""
    subprocess.run([str(ROOT / "scripts" / "install-test-node-deps.sh")], check=True)
    return ROOT / ".node-test" / "node_modules"


@pytest.fixture(scope="module")
async def moto() -> AsyncIterator[MotoServer]:
    async with moto_server() as server:
        yield server


class Replica:
    """One `mediavault serve` process on fixed ports, so that it can be killed and started again."""

    def __init__(self, env: dict[str, str]) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.env = {**env, "MEDIAVAULT_HTTP_ADDR": f"127.0.0.1:{self.http_port}", "MEDIAVAULT_GRPC_ADDR": f"127.0.0.1:{self.grpc_port}"}
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mediavault.cli", "serve"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = asyncio.get_running_loop().time() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.process.poll() is None, "mediavault serve exited"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{self.http_port}/healthz") as response:
                        if response.status == 200:
                            return
                assert asyncio.get_running_loop().time() < deadline, "the server never answered"
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.process.wait, 30)


class Stage:
    """A replica behind a proxy (its public URL), a gRPC stub, and the blob backend to read objects from."""

    def __init__(self, replica: Replica, proxy: TcpProxy, storage: storage_pb2_grpc.StorageServiceStub, env: dict[str, str]) -> None:
        self.replica = replica
        self.proxy = proxy
        self.storage = storage
        self.env = env

    def stored_sha256(self, upload_id: str) -> str:
        hex_id = uuid.UUID(upload_id).hex
        key = f"originals/{hex_id[:2]}/{hex_id}"
        if self.env.get("MEDIAVAULT_BLOB_BACKEND") == "s3":
            s3 = boto3.client("s3", endpoint_url=self.env["MEDIAVAULT_S3_ENDPOINT_URL"], region_name="us-east-1")
            return sha256_hex(s3.get_object(Bucket=self.env["MEDIAVAULT_S3_BUCKET"], Key=key)["Body"].read())
        return sha256_hex((Path(self.env["MEDIAVAULT_BLOB_DIR"]) / key).read_bytes())


async def backend_env(backend: str, moto: MotoServer) -> dict[str, str]:
    if backend == "fs":
        return {}
    bucket = f"tus-clients-{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1").create_bucket, Bucket=bucket)
    return {"MEDIAVAULT_BLOB_BACKEND": "s3", "MEDIAVAULT_S3_ENDPOINT_URL": moto.endpoint_url, "MEDIAVAULT_S3_BUCKET": bucket}


@pytest.fixture(params=["fs", "s3"])
async def stage(request, database_url, redis_url, tmp_path, moto) -> AsyncIterator[Stage]:
    extra = await backend_env(request.param, moto)
    async with serve_environment(database_url, redis_url, tmp_path / "blobs") as base:
        # Under the default rate limits: every request on an upload URL spends its owner's budget,
        # and an honest client's HEADs, PATCHes and retries must never meet a 429, which
        # tus-js-client does not retry by default.
        env = {**base, **extra, "MEDIAVAULT_TUS_CHUNK_SIZE_BYTES": str(CHUNK), "MEDIAVAULT_RATE_LIMITS": "on"}
        replica = Replica(env)
        proxy = TcpProxy("127.0.0.1", replica.http_port)
        replica.env["MEDIAVAULT_HTTP_PUBLIC_URL"] = f"http://127.0.0.1:{proxy.port}"
        await proxy.up()
        await replica.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.grpc_port}") as channel:
                yield Stage(replica, proxy, storage_pb2_grpc.StorageServiceStub(channel), replica.env)
        finally:
            await replica.stop()
            await proxy.down()


async def begin_tus(stage: Stage, md, data: bytes) -> pb.BeginUploadResponse:
    return await stage.storage.BeginUpload(
        pb.BeginUploadRequest(
            filename="clip.jpg", content_type="image/jpeg", size_bytes=len(data), sha256=sha256_hex(data),
            protocol=pb.UPLOAD_PROTOCOL_TUS,
        ),
        metadata=md,
    )


async def offset_of(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.head(url, headers=TUS) as response:
        assert response.status == 200, response.status
        return int(response.headers["Upload-Offset"])


async def settled_offset(url: str) -> int:
    """The offset once no writer holds the upload: an empty PATCH at it takes the lock (423 while one does)."""
    async with aiohttp.ClientSession() as http:
        while True:
            offset = await offset_of(url)
            headers = {**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
            async with http.patch(url, data=b"", headers=headers) as response:
                if response.status == 204:
                    return offset
                assert response.status in (409, 423), response.status
            await asyncio.sleep(0.05)


async def kill_server_at(stage: Stage, sent: int) -> None:
    """SIGKILLs the replica once clients have sent `sent` more bytes, then starts it again."""
    stage.proxy.cut_after(sent)
    await stage.proxy.cut.wait()
    stage.replica.kill()


def tuspy_upload(url: str, data: bytes, retries: int = 0, chunk_size: int = CHUNK) -> None:
    import io

    uploader = tus_client.TusClient(url.split("/tus/")[0] + "/tus/").uploader(
        file_stream=io.BytesIO(data), url=url, chunk_size=chunk_size, retries=retries, retry_delay=1, upload_checksum=True
    )
    uploader.upload()


async def node_upload(node_modules: Path, *args: str) -> dict:
    process = await asyncio.create_subprocess_exec(
        "node", str(ROOT / "tests" / "tus_client.cjs"), *args,
        env={**os.environ, "NODE_PATH": str(node_modules)}, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    return json.loads(out.decode().strip().splitlines()[-1])


async def interrupted_twice(stage: Stage, url: str, data: bytes, send) -> None:
    """send(url, retry) uploads from the stored offset; cut at ~50%, server killed at ~90%, then resumed."""
    stage.proxy.cut_after(len(data) // 2)
    await send(url, False)
    at_cut = await settled_offset(url)
    # The chunk in flight was cut: what arrived of it is kept, no more than one chunk is lost.
    assert len(data) // 2 - CHUNK <= at_cut <= len(data) // 2

    killer = asyncio.create_task(kill_server_at(stage, len(data) * 9 // 10 - at_cut))
    await send(url, False)
    # The cut comes while the client sends; a client that stopped before it never gets there.
    await asyncio.wait_for(killer, timeout=30)
    await stage.replica.start()
    # What the killed process had made durable; the bytes it was still reading from its socket
    # are lost with it.
    at_kill = await offset_of(url)
    assert at_cut <= at_kill <= len(data) * 9 // 10

    await send(url, True)
    assert await offset_of(url) == len(data)


async def finalized_sha256(stage: Stage, md, upload_id: str) -> str:
    done = await stage.storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md)
    assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
    return await asyncio.to_thread(stage.stored_sha256, upload_id)


async def test_tuspy_resumes_after_a_cut_and_a_killed_server(stage: Stage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(SIZE, fill=os.urandom(1))
    begun = await begin_tus(stage, md, data)

    async def send(url: str, retry: bool) -> None:
        if retry:
            await asyncio.to_thread(tuspy_upload, url, data, TUSPY_RETRIES)
            return
        # Without retries the interruption ends the upload: the next send resumes it.
        with pytest.raises((TusCommunicationError, TusUploadFailed, OSError)):
            await asyncio.to_thread(tuspy_upload, url, data, 0)

    await interrupted_twice(stage, begun.upload_url, data, send)
    assert await finalized_sha256(stage, md, begun.upload.upload_id) == sha256_hex(data)


async def test_tus_js_client_resumes_after_a_cut_and_a_killed_server(stage: Stage, auth, user_id, node_modules, tmp_path):
    md = auth(user_id)
    data = fake_jpeg(SIZE, fill=os.urandom(1))
    source = tmp_path / "clip.jpg"
    source.write_bytes(data)
    begun = await begin_tus(stage, md, data)

    async def send(url: str, retry: bool) -> None:
        outcome = await node_upload(node_modules, "resume", url, str(source), str(CHUNK), *(["--retry"] if retry else []))
        assert ("done" in outcome) or not retry, outcome

    await interrupted_twice(stage, begun.upload_url, data, send)
    assert await finalized_sha256(stage, md, begun.upload.upload_id) == sha256_hex(data)


async def test_tus_js_client_creates_with_only_an_endpoint_and_a_token(stage: Stage, auth, authenticator, user_id, node_modules, tmp_path):
    data = fake_jpeg(CHUNK + 999, fill=os.urandom(1))
    source = tmp_path / "photo.jpg"
    source.write_bytes(data)
    endpoint = f"http://127.0.0.1:{stage.proxy.port}/tus/"
    token = authenticator.issue(user_id, ["user"])
    outcome = await node_upload(node_modules, "create", endpoint, str(source), str(CHUNK), token, "photo.jpg", "image/jpeg")
    assert outcome.get("done"), outcome
    upload_id = outcome["url"].split("/tus/")[1].split("?")[0]
    assert await finalized_sha256(stage, auth(user_id), upload_id) == sha256_hex(data)


async def test_tus_js_client_sends_its_first_chunk_with_the_creation(stage: Stage, auth, authenticator, user_id, node_modules, tmp_path):
    """uploadDataDuringCreation: the first chunk is the creation POST's body (tus creation-with-upload),
    and the client PATCHes the rest from the Upload-Offset the 201 answers. The body was dropped
    unread and the 201 carried no offset: the client failed ("invalid or missing offset value") with
    the upload left reserved until it expired."""
    data = fake_jpeg(2 * CHUNK + 999, fill=os.urandom(1))
    source = tmp_path / "photo.jpg"
    source.write_bytes(data)
    endpoint = f"http://127.0.0.1:{stage.proxy.port}/tus/"
    token = authenticator.issue(user_id, ["user"])
    outcome = await node_upload(
        node_modules, "create", endpoint, str(source), str(CHUNK), token, "photo.jpg", "image/jpeg", "--upload-data-during-creation"
    )
    assert outcome.get("done"), outcome
    upload_id = outcome["url"].split("/tus/")[1].split("?")[0]
    assert await finalized_sha256(stage, auth(user_id), upload_id) == sha256_hex(data)
    summary = (await stage.storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))).summary
    assert (summary.used_bytes, summary.reserved_bytes, summary.pending_uploads) == (len(data), 0, 0)


async def test_tus_js_client_whose_creation_is_cut_off_creates_again_and_nothing_stays_reserved(
    stage: Stage, pool, auth, authenticator, user_id, node_modules, tmp_path
):
    """The connection cut while the creation's body goes up, the client, told no Location, creates
    another upload on its retry: the cut one, which no one could go on with, is released with what
    it stored, so the ledger holds the completed upload alone."""
    md = auth(user_id)
    data = fake_jpeg(2 * CHUNK + 999, fill=os.urandom(1))
    source = tmp_path / "photo.jpg"
    source.write_bytes(data)
    endpoint = f"http://127.0.0.1:{stage.proxy.port}/tus/"
    token = authenticator.issue(user_id, ["user"])
    stage.proxy.cut_after(CHUNK // 2)
    outcome = await node_upload(
        node_modules, "create", endpoint, str(source), str(CHUNK), token, "photo.jpg", "image/jpeg",
        "--upload-data-during-creation", "--retry",
    )
    assert outcome.get("done"), outcome
    assert stage.proxy.cut.is_set(), "the creation's body was cut"
    upload_id = outcome["url"].split("/tus/")[1].split("?")[0]
    assert await finalized_sha256(stage, md, upload_id) == sha256_hex(data)
    async with asyncio.timeout(10):
        while (summary := (await stage.storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary).pending_uploads:
            await asyncio.sleep(0.1)
    assert (summary.used_bytes, summary.reserved_bytes) == (len(data), 0)
    outcomes = await pool.fetch("SELECT state, failure_reason FROM uploads WHERE user_id = $1 ORDER BY created_at", user_id)
    assert [tuple(row) for row in outcomes] == [("failed", "CLIENT_FAILED"), ("finalized", None)]


async def test_tus_js_client_with_parallel_uploads_is_refused_before_any_part_is_reserved(stage: Stage, auth, authenticator, user_id, node_modules, tmp_path):
    """parallelUploads creates each part with Upload-Concat: partial (tus concatenation, which the
    server does not offer): the first creation is refused 400, so the client fails at once with
    nothing reserved, instead of uploading parts whose concatenation is then refused."""
    data = fake_jpeg(2 * CHUNK, fill=os.urandom(1))
    source = tmp_path / "photo.jpg"
    source.write_bytes(data)
    endpoint = f"http://127.0.0.1:{stage.proxy.port}/tus/"
    token = authenticator.issue(user_id, ["user"])
    outcome = await node_upload(node_modules, "create", endpoint, str(source), str(CHUNK), token, "photo.jpg", "image/jpeg", "--parallel=2")
    assert "response code: 400" in outcome.get("error", ""), outcome
    summary = (await stage.storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=auth(user_id))).summary
    assert (summary.used_bytes, summary.reserved_bytes, summary.pending_uploads) == (0, 0, 0)


async def test_tus_js_client_with_override_patch_method(stage: Stage, auth, user_id, node_modules, tmp_path):
    """overridePatchMethod: every chunk goes as a POST with X-HTTP-Method-Override: PATCH."""
    md = auth(user_id)
    data = fake_jpeg(CHUNK + 999, fill=os.urandom(1))
    source = tmp_path / "clip.jpg"
    source.write_bytes(data)
    begun = await begin_tus(stage, md, data)
    outcome = await node_upload(node_modules, "resume", begun.upload_url, str(source), str(CHUNK), "--override-patch")
    assert outcome == {"done": True, "url": begun.upload_url}, outcome
    assert await finalized_sha256(stage, md, begun.upload.upload_id) == sha256_hex(data)


async def test_tus_js_client_run_again_on_a_finalized_upload_is_done_and_creates_nothing(stage: Stage, auth, authenticator, user_id, node_modules, tmp_path):
    """An app that starts tus-js-client again on an upload URL it already finished (a retry after
    its finalize call, a restart) is told the upload is complete, not sent to create another."""
    md = auth(user_id)
    data = fake_jpeg(CHUNK + 999, fill=os.urandom(1))
    source = tmp_path / "clip.jpg"
    source.write_bytes(data)
    begun = await begin_tus(stage, md, data)
    assert (await node_upload(node_modules, "resume", begun.upload_url, str(source), str(CHUNK))).get("done")
    assert await finalized_sha256(stage, md, begun.upload.upload_id) == sha256_hex(data)
    before = (await stage.storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert (before.used_bytes, before.reserved_bytes, before.pending_uploads) == (len(data), 0, 0)

    endpoint = f"--endpoint=http://127.0.0.1:{stage.proxy.port}/tus/"
    token = f"--token={authenticator.issue(user_id, ['user'])}"
    for fallback in ([], [endpoint, token]):
        again = await node_upload(node_modules, "resume", begun.upload_url, str(source), str(CHUNK), *fallback)
        assert again == {"done": True, "url": begun.upload_url}, (fallback, again)
    after = (await stage.storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert after == before
    assert await asyncio.to_thread(stage.stored_sha256, begun.upload.upload_id) == sha256_hex(data)


async def test_two_replicas_two_patches_exactly_one_proceeds(stage: Stage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(2 * CHUNK, fill=os.urandom(1))
    begun = await begin_tus(stage, md, data)
    second = Replica(stage.env)
    await second.start()
    try:
        url_one = begun.upload_url.replace(f"127.0.0.1:{stage.proxy.port}", f"127.0.0.1:{stage.replica.http_port}")
        url_two = begun.upload_url.replace(f"127.0.0.1:{stage.proxy.port}", f"127.0.0.1:{second.http_port}")
        release = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield data[: MiB]
            await release.wait()
            yield data[MiB:CHUNK]

        headers = {**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
        async with aiohttp.ClientSession() as http:

            async def first_patch() -> int:
                async with http.patch(url_one, data=slow_body(), headers=headers) as response:
                    return response.status

            first = asyncio.create_task(first_patch())
            # The first writer holds the upload once the other replica refuses even an empty chunk.
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                if first.done():
                    # It came while a probe held the upload: it was refused, and goes again.
                    assert await first == 423
                    first = asyncio.create_task(first_patch())
                async with http.patch(url_two, data=b"", headers=headers) as response:
                    if response.status == 423:
                        break
                    assert response.status == 204
                assert asyncio.get_running_loop().time() < deadline, "the first writer never took the upload"
                await asyncio.sleep(0.02)
            # Other bytes at the same offset, on the other replica, while the first writer stores its chunk.
            async with http.patch(url_two, data=b"\x00" * CHUNK, headers=headers) as response:
                assert response.status == 423
            release.set()
            assert await first == 204
            assert await offset_of(url_two) == CHUNK
            async with http.patch(url_two, data=data[CHUNK:], headers={**headers, "Upload-Offset": str(CHUNK)}) as response:
                assert response.status == 204
    finally:
        await second.stop()
    assert await finalized_sha256(stage, md, begun.upload.upload_id) == sha256_hex(data)


async def test_a_large_file_in_many_chunks_under_the_default_rate_limits(stage: Stage, auth, user_id, node_modules, tmp_path):
    """Each chunk is a PATCH on the upload URL, spending its owner's budget: tuspy and tus-js-client,
    each sending 64 chunks after its HEAD, then resuming a finished upload (HEAD again), are never refused."""
    md = auth(user_id)
    small_chunk = 512 * 1024
    for client in ("tuspy", "tus-js-client"):
        data = fake_jpeg(64 * small_chunk, fill=os.urandom(1))
        source = tmp_path / f"{client}.jpg"
        source.write_bytes(data)
        begun = await begin_tus(stage, md, data)
        for _ in range(2):
            if client == "tuspy":
                await asyncio.to_thread(tuspy_upload, begun.upload_url, data, chunk_size=small_chunk)
            else:
                outcome = await node_upload(node_modules, "resume", begun.upload_url, str(source), str(small_chunk))
                assert outcome.get("done"), outcome
        assert await finalized_sha256(stage, md, begun.upload.upload_id) == sha256_hex(data)
