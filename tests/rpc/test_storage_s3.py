"""The same Begin -> PUT -> Finalize contract on the s3 backend, against a real S3-protocol server (moto)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from mediavault.blobs.s3 import S3BlobStore
from mediavault.server import Server
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import CORPUS, running
from tests.faults import proxied
from tests.helpers import bad_request, begin, error_info, fake_jpeg, put, sha256_hex, upload
from tests.s3server import moto_server


@pytest.fixture(scope="module")
async def s3_settings(make_settings):
    async with moto_server() as moto:
        settings = make_settings(blob_backend="s3", s3_endpoint_url=moto.endpoint_url, s3_bucket="mediavault-test")
        store = await S3BlobStore.open(settings)
        await store.ensure_bucket()
        await store.close()
        yield settings


@pytest.fixture(scope="module")
async def s3_storage(s3_settings):
    async with running(s3_settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield storage_pb2_grpc.StorageServiceStub(channel), server


async def test_begin_put_finalize_on_s3(s3_storage, auth, user_id, pool):
    storage, server = s3_storage
    data = (CORPUS / "images/formats/hopper.webp").read_bytes()
    md = auth(user_id)
    begun = await begin(storage, md, data, content_type="image/webp", filename="hopper.webp")
    assert begun.upload_headers["x-amz-checksum-sha256"]
    assert "X-Amz-Signature=" in begun.upload_url
    assert await put(begun.upload_url, dict(begun.upload_headers), data) == 200
    done = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
    row = await pool.fetchrow("SELECT object_key, sha256 FROM media WHERE media_id = $1::uuid", done.media_id)
    assert row["sha256"] == sha256_hex(data)
    async with (
        aiohttp.ClientSession() as session,
        session.get(await server.blobs.presign_get(row["object_key"], expires_in=60)) as response,
    ):
        assert await response.read() == data
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert (summary.used_bytes, summary.reserved_bytes) == (len(data), 0)


async def test_video_without_declared_checksum_on_s3(s3_storage, auth, user_id, pool):
    storage, _ = s3_storage
    data = (CORPUS / "video/realshort.mp4").read_bytes()
    done = await upload(storage, auth(user_id), data, content_type="video/mp4", filename="clip.mp4", with_sha=False)
    assert await pool.fetchval("SELECT kind FROM media WHERE media_id = $1::uuid", done.media_id) == "video"


@pytest.mark.parametrize(
    ("declared", "sent", "reason"),
    [
        (fake_jpeg(5000), None, "OBJECT_MISSING"),
        (fake_jpeg(5000), fake_jpeg(5000, b"\x07"), "CHECKSUM_MISMATCH"),
        (b"GIF89a" + b"\0" * 4000, b"GIF89a" + b"\0" * 4000, "UNSUPPORTED_MEDIA_TYPE"),
    ],
)
async def test_verification_failures_on_s3(s3_storage, auth, user_id, server, declared, sent, reason):
    storage, s3_server = s3_storage
    md = auth(user_id)
    begun = await begin(storage, md, declared)
    if sent is not None:
        # Real S3 refuses a body that does not match the signed checksum (then the object is
        # missing); moto stores it without a checksum, and finalize hashes the bytes instead.
        await put(begun.upload_url, dict(begun.upload_headers), sent)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert error_info(caught.value).reason == reason
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert (summary.used_bytes, summary.reserved_bytes) == (0, 0)
    key = f"originals/{begun.upload.upload_id.replace('-', '')[:2]}/{begun.upload.upload_id.replace('-', '')}"
    assert await s3_server.blobs.stat(key) is None


async def test_size_mismatch_on_s3(s3_storage, auth, user_id):
    storage, _ = s3_storage
    md = auth(user_id)
    data = fake_jpeg(9000)
    begun = await begin(storage, md, data, with_sha=False)

    async def stream():
        yield pb.UploadContentRequest(upload_id=begun.upload.upload_id)
        yield pb.UploadContentRequest(chunk=data[:8000])

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.UploadContent(stream(), metadata=md)
    assert error_info(caught.value).reason == "SIZE_MISMATCH"


async def test_upload_content_multipart_on_s3(s3_storage, auth, user_id):
    storage, _ = s3_storage
    md = auth(user_id)
    data = fake_jpeg(9 * 1024 * 1024 + 5)
    begun = await begin(storage, md, data)

    async def stream():
        yield pb.UploadContentRequest(upload_id=begun.upload.upload_id)
        for offset in range(0, len(data), 1 << 20):
            yield pb.UploadContentRequest(chunk=data[offset : offset + (1 << 20)])

    response = await storage.UploadContent(stream(), metadata=md)
    assert response.upload.state == pb.UPLOAD_STATE_FINALIZED


@contextlib.asynccontextmanager
async def serving_on_s3(settings) -> AsyncIterator[tuple[Server, storage_pb2_grpc.StorageServiceStub, aiohttp.ClientSession]]:
    """A server on the settings' S3 bucket (made here), its StorageService stub and an HTTP client for its listener."""
    store = await S3BlobStore.open(settings)
    await store.ensure_bucket()
    await store.close()
    async with (
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        aiohttp.ClientSession() as http,
    ):
        yield server, storage_pb2_grpc.StorageServiceStub(channel), http


async def test_a_begin_while_s3_is_down_is_unavailable_and_reserves_nothing(make_settings, auth, authenticator, user_id):
    async with moto_server() as moto:
        settings = make_settings(blob_backend="s3", s3_endpoint_url=moto.endpoint_url, s3_bucket="mediavault-test")
        async with serving_on_s3(settings) as (server, storage, http):
            md = auth(user_id)
            await moto.stop()

            async def begin_tus():
                request = pb.BeginUploadRequest(
                    filename="clip.mp4", content_type="video/mp4", size_bytes=5000, protocol=pb.UPLOAD_PROTOCOL_TUS
                )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await storage.BeginUpload(request, metadata=md)
                return caught.value

            async def create_tus():
                metadata = f"filename {base64.b64encode(b'clip.mp4').decode()},filetype {base64.b64encode(b'video/mp4').decode()}"
                headers = {
                    "Tus-Resumable": "1.0.0",
                    "Upload-Length": "5000",
                    "Upload-Metadata": metadata,
                    "Authorization": f"Bearer {authenticator.issue(user_id, ['user'])}",
                }
                async with http.post(f"http://127.0.0.1:{server.http_port}/tus/", headers=headers) as response:
                    return response.status

            refused, created = await asyncio.gather(begin_tus(), create_tus())
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(refused).reason == "BLOB_STORE_UNAVAILABLE"
            assert created == 503
            summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
            assert (summary.reserved_bytes, summary.pending_uploads) == (0, 0)


async def test_upload_calls_while_s3_is_down_are_unavailable_and_go_on_once_it_is_back(make_settings, auth, user_id):
    # S3 behind a proxy that can refuse connections: moto itself would forget everything when stopped.
    async with moto_server() as moto, proxied(moto.endpoint_url) as s3:
        settings = make_settings(
            blob_backend="s3", s3_endpoint_url=s3.url_for(moto.endpoint_url), s3_bucket="mediavault-test", s3_max_attempts=1
        )
        async with serving_on_s3(settings) as (server, storage, http):
            md = auth(user_id)
            data = fake_jpeg(5000)
            sent = await begin(storage, md, data)
            assert await put(sent.upload_url, dict(sent.upload_headers), data) == 200
            streamed = await begin(storage, md, data)
            tus = await begin(storage, md, data, protocol=pb.UPLOAD_PROTOCOL_TUS)
            multipart = await begin(storage, md, data, protocol=pb.UPLOAD_PROTOCOL_S3_MULTIPART)
            given_up = await begin(storage, md, data, protocol=pb.UPLOAD_PROTOCOL_S3_MULTIPART)

            def finalize(begun):
                return storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)

            async def stream():
                yield pb.UploadContentRequest(upload_id=streamed.upload.upload_id)
                yield pb.UploadContentRequest(chunk=data)

            async def patch() -> int:
                headers = {"Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
                async with http.patch(tus.upload_url, data=data, headers=headers) as response:
                    return response.status

            await s3.down()
            refused = []
            read_parts = lambda: storage.GetUpload(pb.GetUploadRequest(upload_id=multipart.upload.upload_id), metadata=md)  # noqa: E731
            for call in (lambda: finalize(sent), lambda: storage.UploadContent(stream(), metadata=md), read_parts):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call()
                refused.append((caught.value.code(), error_info(caught.value).reason))
            assert refused == [(grpc.StatusCode.UNAVAILABLE, "BLOB_STORE_UNAVAILABLE")] * 3
            # Giving up needs no word from S3: the bytes are released, the parts aborted later (the sweep).
            failed = await storage.FailUpload(pb.FailUploadRequest(upload_id=given_up.upload.upload_id), metadata=md)
            assert failed.upload.state == pb.UPLOAD_STATE_FAILED
            summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
            assert summary.pending_uploads == 4
            assert await patch() == 503

            await s3.up()
            # The retries, as the clients make them.
            assert (await finalize(sent)).upload.state == pb.UPLOAD_STATE_FINALIZED
            assert (await storage.UploadContent(stream(), metadata=md)).upload.state == pb.UPLOAD_STATE_FINALIZED
            assert await patch() == 204
            assert (await finalize(tus)).upload.state == pb.UPLOAD_STATE_FINALIZED
            assert (await read_parts()).upload.state == pb.UPLOAD_STATE_PENDING


async def test_an_upload_larger_than_s3_can_store_by_its_protocol_is_refused_at_begin(s3_settings, auth, user_id):
    """One PUT stores at most 5 GiB, a multipart upload at most 10,000 parts (of 8 MiB here): with
    video limits above both, such an upload used to be reserved and then never complete (its PUT
    refused by S3, its tus chunks answered 503 past the 10,000th part)."""
    GiB = 1024**3
    settings = s3_settings.model_copy(update={"max_video_bytes": 100 * GiB, "free_quota_bytes": 200 * GiB})
    parts_limit = 10_000 * 8 * 1024**2
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        for protocol, size in ((pb.UPLOAD_PROTOCOL_SINGLE, 5 * GiB + 1), (pb.UPLOAD_PROTOCOL_S3_MULTIPART, parts_limit + 1),
                               (pb.UPLOAD_PROTOCOL_TUS, parts_limit + 1)):
            request = pb.BeginUploadRequest(filename="long.mp4", content_type="video/mp4", size_bytes=size, protocol=protocol)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await storage.BeginUpload(request, metadata=md)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, protocol
            assert [v.field for v in bad_request(refused.value).field_violations] == ["size_bytes"], protocol
        async with aiohttp.ClientSession() as http, http.options(f"http://127.0.0.1:{server.http_port}/tus/") as response:
            assert int(response.headers["Tus-Max-Size"]) == parts_limit
        # At the limits, reserved and started.
        for protocol, size in ((pb.UPLOAD_PROTOCOL_SINGLE, 5 * GiB), (pb.UPLOAD_PROTOCOL_S3_MULTIPART, parts_limit)):
            request = pb.BeginUploadRequest(filename="long.mp4", content_type="video/mp4", size_bytes=size, protocol=protocol)
            begun = await storage.BeginUpload(request, metadata=md)
            await storage.FailUpload(pb.FailUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
        summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
        assert summary.reserved_bytes == 0
