"""UPLOAD_PROTOCOL_S3_MULTIPART: parts PUT straight to S3 (moto) at presigned URLs, progress from
ListParts, completion at FinalizeUpload, abort at FailUpload; boto3 checks what S3 holds."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import aiohttp
import boto3
import grpc
import pytest
from botocore.exceptions import NoCredentialsError

from mediavault.blobs.s3 import S3BlobStore
from mediavault.server import Server
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import running
from tests.helpers import bad_request, error_info, fake_jpeg, sha256_hex
from tests.s3server import moto_server

MiB = 1024 * 1024
PART = 5 * MiB


@pytest.fixture(scope="module")
async def s3_settings(make_settings) -> AsyncIterator:
    """Settings of an S3 backend on a moto server of the module's own, its bucket made."""
    async with moto_server() as moto:

        def make(**overrides):
            return make_settings(
                blob_backend="s3", s3_bucket=bucket, s3_endpoint_url=moto.endpoint_url, **overrides
            )

        bucket = f"direct-{uuid.uuid4().hex[:12]}"
        store = await S3BlobStore.open(make())
        await store.ensure_bucket()
        await store.close()
        yield make


@pytest.fixture(scope="module")
async def s3_server(s3_settings) -> AsyncIterator[Server]:
    async with running(s3_settings(tus_chunk_size_bytes=PART)) as server:
        yield server


@pytest.fixture
async def storage(s3_server: Server) -> AsyncIterator[storage_pb2_grpc.StorageServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s3_server.grpc_port}") as channel:
        yield storage_pb2_grpc.StorageServiceStub(channel)


def s3_client(server: Server):
    return boto3.client("s3", endpoint_url=server.settings.s3_endpoint_url, region_name=server.settings.s3_region)


def object_key(upload_id: str) -> str:
    hex_id = uuid.UUID(upload_id).hex
    return f"originals/{hex_id[:2]}/{hex_id}"


def open_multipart_uploads(server: Server, upload_id: str) -> list[str]:
    listed = s3_client(server).list_multipart_uploads(Bucket=server.settings.s3_bucket)
    return [u["UploadId"] for u in listed.get("Uploads", []) if u["Key"] == object_key(upload_id)]


async def begin_direct(storage, md, data: bytes) -> pb.BeginUploadResponse:
    return await storage.BeginUpload(
        pb.BeginUploadRequest(
            filename="clip.jpg", content_type="image/jpeg", size_bytes=len(data), sha256=sha256_hex(data),
            protocol=pb.UPLOAD_PROTOCOL_S3_MULTIPART,
        ),
        metadata=md,
    )


async def presign(storage, md, upload_id: str, *parts: tuple[int, str]) -> list[pb.PresignedPart]:
    request = pb.PresignUploadPartsRequest(
        upload_id=upload_id, parts=[pb.UploadPartRequest(part_number=n, sha256=sha) for n, sha in parts]
    )
    return list((await storage.PresignUploadParts(request, metadata=md)).parts)


async def put_part(http: aiohttp.ClientSession, part: pb.PresignedPart, body) -> int:
    async with http.put(part.url, data=body, headers=dict(part.headers)) as response:
        await response.read()
        return response.status


async def received(storage, md, upload_id: str) -> int:
    return (await storage.GetUpload(pb.GetUploadRequest(upload_id=upload_id), metadata=md)).upload.received_bytes


async def test_parts_sent_directly_resume_and_complete_at_finalize(s3_server, storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(PART + MiB + 1234)
    first, second = data[:PART], data[PART:]
    begun = await begin_direct(storage, md, data)
    upload_id = begun.upload.upload_id
    assert begun.upload.protocol == pb.UPLOAD_PROTOCOL_S3_MULTIPART
    assert begun.chunk_size_bytes == PART
    assert open_multipart_uploads(s3_server, upload_id)

    signed = await presign(storage, md, upload_id, (1, sha256_hex(first)), (2, ""))
    assert [p.part_number for p in signed] == [1, 2]
    assert "x-amz-checksum-sha256" in signed[0].headers
    assert "x-amz-checksum-sha256" not in signed[1].headers
    async with aiohttp.ClientSession() as http:
        assert await put_part(http, signed[0], first) == 200
        assert await received(storage, md, upload_id) == PART

        async def cut_short():
            yield second[: len(second) // 2]
            raise ConnectionAbortedError("the phone lost its network")

        with pytest.raises(aiohttp.ClientError):
            await put_part(http, signed[1], cut_short())
        # S3 keeps no half part: progress is still the first part.
        assert await received(storage, md, upload_id) == PART
        again = await presign(storage, md, upload_id, (2, sha256_hex(second)))
        assert await put_part(http, again[0], second) == 200
    assert await received(storage, md, upload_id) == len(data)

    done = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md)
    assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
    stored = s3_client(s3_server).get_object(Bucket=s3_server.settings.s3_bucket, Key=object_key(upload_id))["Body"].read()
    assert sha256_hex(stored) == sha256_hex(data)
    assert open_multipart_uploads(s3_server, upload_id) == []
    summary = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert (summary.used_bytes, summary.reserved_bytes) == (len(data), 0)


async def test_bad_part_requests_change_nothing_and_fail_aborts(s3_server, storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(PART + 10)
    begun = await begin_direct(storage, md, data)
    upload_id = begun.upload.upload_id
    before = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    cases = {
        "parts": [],
        "parts[0].part_number": [(0, "")],
        "parts[1].part_number": [(1, ""), (10001, "")],
        "parts[0].sha256": [(1, "ABC")],
    }
    for field, parts in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await presign(storage, md, upload_id, *parts)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in [v.field for v in bad_request(caught.value).field_violations]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await presign(storage, md, upload_id, (1, ""), (1, ""))
    assert [v.description for v in bad_request(caught.value).field_violations] == ["repeats a part_number"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await presign(storage, md, upload_id, *((n, "") for n in range(1, 102)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await presign(storage, auth("someone-else"), upload_id, (1, ""))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    single = await storage.BeginUpload(
        pb.BeginUploadRequest(filename="a.jpg", content_type="image/jpeg", size_bytes=100), metadata=md
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await presign(storage, md, single.upload.upload_id, (1, ""))
    assert [v.field for v in bad_request(caught.value).field_violations] == ["upload_id"]
    after = (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary
    assert after.reserved_bytes == before.reserved_bytes + 100

    await storage.FailUpload(pb.FailUploadRequest(upload_id=upload_id, reason="gave up"), metadata=md)
    assert open_multipart_uploads(s3_server, upload_id) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await presign(storage, md, upload_id, (1, ""))
    assert error_info(caught.value).reason == "UPLOAD_NOT_PENDING"


@pytest.mark.parametrize("count", [150, 1000, 3_000_000])
async def test_too_many_parts_are_refused_by_their_count_alone(s3_server, storage, auth, user_id, count):
    md = auth(user_id)
    upload_id = (await begin_direct(storage, md, fake_jpeg(PART + 10))).upload.upload_id
    # Parts numbered 0, each one wrong, two bytes each: millions fit in one request.
    one = pb.PresignUploadPartsRequest(parts=[pb.UploadPartRequest(part_number=0)]).SerializeToString()
    request = pb.PresignUploadPartsRequest.FromString(pb.PresignUploadPartsRequest(upload_id=upload_id).SerializeToString() + one * count)
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.PresignUploadParts(request, metadata=md)
    elapsed = time.perf_counter() - started
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    assert [(v.field, v.description) for v in bad_request(caught.value).field_violations] == [
        ("parts", "must hold 1 to 100 parts")
    ]
    assert elapsed < 1, f"refused after {elapsed:.2f} s"


async def test_a_request_breaking_its_rules_hundreds_of_times_names_the_first_20_and_counts_the_others(
    s3_server, storage, auth, user_id
):
    md = auth(user_id)
    upload_id = (await begin_direct(storage, md, fake_jpeg(PART + 10))).upload.upload_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await presign(storage, md, upload_id, *((0, "x") for _ in range(100)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    violations = bad_request(caught.value).field_violations
    assert [v.field for v in violations[:5]] == [
        "parts", "parts[0].part_number", "parts[0].sha256", "parts[1].part_number", "parts[1].sha256"
    ]
    assert len(violations) == 20
    # The repeat, then a bad number and a bad SHA-256 for each of the 100 parts.
    assert caught.value.details().endswith("; and 181 more")


async def test_fs_backend_refuses_s3_multipart(storage_fs, auth, user_id):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await begin_direct(storage_fs, auth(user_id), fake_jpeg(100))
    assert [v.field for v in bad_request(caught.value).field_violations] == ["protocol"]


@pytest.fixture
def storage_fs(channel) -> storage_pb2_grpc.StorageServiceStub:
    return storage_pb2_grpc.StorageServiceStub(channel)




async def test_expiry_aborts_the_multipart_upload(s3_server, storage, auth, user_id):
    from arq import create_pool
    from arq.connections import RedisSettings

    from mediavault.domain import ledger
    from workers.maintenance import run_job
    from workers.settings import shutdown, startup

    md = auth(user_id)
    data = fake_jpeg(PART + 10)
    begun = await begin_direct(storage, md, data)
    upload_id = begun.upload.upload_id
    signed = await presign(storage, md, upload_id, (1, ""))
    async with aiohttp.ClientSession() as http:
        assert await put_part(http, signed[0], data[:PART]) == 200
    assert s3_server.pool is not None
    await s3_server.pool.execute(
        "UPDATE uploads SET expires_at = now() - interval '1 second' WHERE upload_id = $1::uuid", upload_id
    )
    settings = s3_server.settings
    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name)
    ctx = {"settings": settings, "redis": redis}
    await startup(ctx)
    try:
        report = await run_job(ctx, "reclaim_stale_uploads")
    finally:
        await shutdown(ctx)
        await redis.aclose()
    assert report.errors == 0
    assert open_multipart_uploads(s3_server, upload_id) == []
    assert await ledger.audit(s3_server.pool) == []
    got = (await storage.GetUpload(pb.GetUploadRequest(upload_id=upload_id), metadata=md)).upload
    assert (got.state, got.received_bytes) == (pb.UPLOAD_STATE_EXPIRED, 0)


async def test_parts_are_the_servers_part_size_not_the_tus_chunk(s3_settings, auth, user_id):
    """A client sending parts straight to S3 is told 8 MiB, the size the server's own parts
    checkpoint at, not the default 64 MiB tus chunk: a part cut on a mobile link is sent again whole."""
    settings = s3_settings()
    assert settings.tus_chunk_size_bytes == 64 * MiB
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        begun = await begin_direct(storage_pb2_grpc.StorageServiceStub(channel), auth(user_id), fake_jpeg(20 * MiB))
    assert begun.chunk_size_bytes == 8 * MiB


async def test_parts_are_signed_for_their_place_in_the_object_and_no_more(s3_server, storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(2 * PART + 1234)
    upload_id = (await begin_direct(storage, md, data)).upload.upload_id
    signed = await presign(storage, md, upload_id, (1, ""), (3, ""))
    assert [p.headers["Content-Length"] for p in signed] == [str(PART), "1234"]
    for part in signed:
        assert "content-length" in parse_qs(urlsplit(part.url).query)["X-Amz-SignedHeaders"][0].split(";")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await presign(storage, md, upload_id, (2, ""), (4, ""))
    assert [v.field for v in bad_request(caught.value).field_violations] == ["parts[1].part_number"]


async def test_part_urls_expire_with_the_reservation(s3_server, storage, auth, user_id):
    """S3 takes a part until its URL's X-Amz-Expires: never past expires_at, when the expiry run
    aborts the multipart upload and releases the bytes."""
    md = auth(user_id)
    data = fake_jpeg(PART + 10)
    upload_id = (await begin_direct(storage, md, data)).upload.upload_id

    def lifetime(part: pb.PresignedPart) -> int:
        return int(parse_qs(urlsplit(part.url).query)["X-Amz-Expires"][0])

    [far] = await presign(storage, md, upload_id, (1, ""))
    assert lifetime(far) == s3_server.settings.upload_url_ttl_seconds
    assert s3_server.pool is not None
    await s3_server.pool.execute(
        "UPDATE uploads SET expires_at = now() + interval '60 seconds' WHERE upload_id = $1::uuid", upload_id
    )
    [near] = await presign(storage, md, upload_id, (1, ""))
    assert 55 <= lifetime(near) <= 60


async def sent_in_one_part(storage, md, data: bytes) -> str:
    """An S3_MULTIPART upload whose one part S3 holds; its upload id."""
    upload_id = (await begin_direct(storage, md, data)).upload.upload_id
    [part] = await presign(storage, md, upload_id, (1, ""))
    async with aiohttp.ClientSession() as http:
        assert await put_part(http, part, data) == 200
    return upload_id


async def test_finalize_of_someone_elses_or_a_released_upload_touches_nothing(s3_server, storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(1000)
    upload_id = await sent_in_one_part(storage, md, data)

    finalize = pb.FinalizeUploadRequest(upload_id=upload_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(finalize, metadata=auth("someone-else"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert open_multipart_uploads(s3_server, upload_id), "another user's finalize completes nothing"
    assert await received(storage, md, upload_id) == len(data)

    await storage.FailUpload(pb.FailUploadRequest(upload_id=upload_id, reason="gave up"), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(finalize, metadata=md)
    assert error_info(caught.value).reason == "UPLOAD_NOT_PENDING"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(finalize, metadata=auth("someone-else"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_parts_completed_by_a_finalize_whose_commit_did_not_follow(s3_server, storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(1000)
    upload_id = await sent_in_one_part(storage, md, data)
    # What a finalize does before its commit: S3 joins the parts and forgets the multipart upload.
    client, bucket, key = s3_client(s3_server), s3_server.settings.s3_bucket, object_key(upload_id)
    [multipart_id] = open_multipart_uploads(s3_server, upload_id)
    etag = client.list_parts(Bucket=bucket, Key=key, UploadId=multipart_id)["Parts"][0]["ETag"]
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=multipart_id, MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]}
    )

    got = (await storage.GetUpload(pb.GetUploadRequest(upload_id=upload_id), metadata=md)).upload
    assert (got.state, got.received_bytes) == (pb.UPLOAD_STATE_PENDING, len(data))
    done = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md)
    assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
    assert sha256_hex(client.get_object(Bucket=bucket, Key=key)["Body"].read()) == sha256_hex(data)


async def test_parts_that_cannot_be_signed_are_unavailable(s3_server, storage, auth, user_id, monkeypatch):
    md = auth(user_id)
    upload_id = (await begin_direct(storage, md, fake_jpeg(PART + 10))).upload.upload_id

    async def no_credentials(*args, **kwargs):
        # What signing meets when a role's credentials cannot be fetched anew.
        raise NoCredentialsError

    assert isinstance(s3_server.blobs, S3BlobStore)
    monkeypatch.setattr(s3_server.blobs._client, "generate_presigned_url", no_credentials)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await presign(storage, md, upload_id, (1, ""))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "BLOB_STORE_UNAVAILABLE"

    monkeypatch.undo()
    assert [p.part_number for p in await presign(storage, md, upload_id, (1, ""))] == [1]
