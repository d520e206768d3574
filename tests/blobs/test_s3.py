"""S3BlobStore against a real moto server over HTTP: presigned URLs, streaming writes, outages."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aioboto3
import aiohttp
import pytest

from mediavault.blobs import BlobStoreError, Inspection, ObjectInfo, open_blob_store
from mediavault.blobs.s3 import S3BlobStore
from mediavault.config import MiB, Settings
from tests.s3server import MotoServer, moto_server

BUCKET = "mediavault-test"
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"


def s3_settings(endpoint_url: str) -> Settings:
    return Settings(blob_backend="s3", s3_bucket=BUCKET, s3_endpoint_url=endpoint_url, jwt_secret="x")


async def open_store(endpoint_url: str) -> S3BlobStore:
    store = await open_blob_store(s3_settings(endpoint_url))
    assert isinstance(store, S3BlobStore)
    await store.ensure_bucket()
    return store


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[MotoServer]:
    async with moto_server() as server:
        yield server


@pytest.fixture(scope="module")
async def store(server: MotoServer) -> AsyncIterator[S3BlobStore]:
    store = await open_store(server.endpoint_url)
    yield store
    await store.close()


@pytest.fixture(scope="module")
async def raw_s3(server: MotoServer) -> AsyncIterator[Any]:
    """A plain client, to look at what the server holds independently of the store under test."""
    async with aioboto3.Session().client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1") as client:
        yield client


@pytest.fixture
def key() -> str:
    return f"test/{uuid.uuid4().hex}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def http(
    method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers, data=body) as response:
        return response.status, dict(response.headers), await response.read()


async def stream(data: bytes, chunk_size: int = MiB) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


async def test_presigned_put_with_returned_headers_stores_the_bytes(store: S3BlobStore, key: str) -> None:
    data = JPEG_HEAD + os.urandom(300_000)
    signed = await store.presign_put(
        key, size_bytes=len(data), content_type="image/jpeg", sha256=sha256_hex(data), expires_in=300
    )

    assert signed.method == "PUT"
    status, _, _ = await http("PUT", signed.url, signed.headers, data)
    assert status == 200

    info = await store.stat(key)
    assert info is not None
    assert info.size == len(data)
    # Real S3 records the verified checksum; moto records none for a presigned PUT, so
    # stat must then say None and finalize hashes the bytes itself.
    assert info.sha256 in (None, sha256_hex(data))
    assert await store.inspect(key, len(JPEG_HEAD)) == Inspection(len(data), sha256_hex(data), JPEG_HEAD)
    assert await store.inspect(key, len(data) + 100) == Inspection(len(data), sha256_hex(data), data)
    assert await store.inspect(f"{key}-missing", 16) is None


async def test_presigned_put_signs_every_header_it_returns(store: S3BlobStore, key: str) -> None:
    checksum = await store.presign_put(key, size_bytes=10, content_type="image/png", sha256="ab" * 32, expires_in=60)
    plain = await store.presign_put(key, size_bytes=10, content_type="image/png", sha256=None, expires_in=60)

    assert checksum.headers == {
        "Content-Type": "image/png",
        "Content-Length": "10",
        "If-None-Match": "*",
        "x-amz-checksum-sha256": "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=",
    }
    assert plain.headers == {"Content-Type": "image/png", "Content-Length": "10", "If-None-Match": "*"}
    # S3 rejects a request whose signed headers differ from the signature; moto checks no
    # signatures, so what is covered is asserted on the URL itself.
    for signed in (checksum, plain):
        signed_headers = parse_qs(urlsplit(signed.url).query)["X-Amz-SignedHeaders"][0].split(";")
        assert sorted(signed_headers) == sorted([*(h.lower() for h in signed.headers), "host"])


async def test_presign_put_rejects_a_malformed_sha256(store: S3BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex digits"):
        await store.presign_put(key, size_bytes=1, content_type="image/png", sha256="AB" * 32, expires_in=60)


async def test_put_of_bytes_not_matching_the_declared_sha256_cannot_pass_finalize(
    store: S3BlobStore, key: str
) -> None:
    declared = JPEG_HEAD + b"a" * 1000
    sent = JPEG_HEAD + b"b" * 1000
    signed = await store.presign_put(
        key, size_bytes=len(declared), content_type="image/jpeg", sha256=sha256_hex(declared), expires_in=300
    )

    status, _, _ = await http("PUT", signed.url, signed.headers, sent)

    # Real S3 answers 400 BadDigest and stores nothing. moto stores the bytes unverified
    # (and records no checksum), so finalize has to catch it by hashing.
    if status >= 400:
        assert await store.stat(key) is None
    else:
        info = await store.stat(key)
        assert info is not None
        assert info.sha256 != sha256_hex(declared)
        assert (await store.inspect(key, 0)).sha256 == sha256_hex(sent)


async def test_put_of_another_length_than_signed_cannot_pass_finalize(store: S3BlobStore, key: str) -> None:
    data = JPEG_HEAD + b"x" * 1000
    signed = await store.presign_put(key, size_bytes=len(data), content_type="image/jpeg", sha256=None, expires_in=300)
    longer = data + b"extra"

    status, _, _ = await http("PUT", signed.url, {**signed.headers, "Content-Length": str(len(longer))}, longer)

    # Real S3 answers 403 SignatureDoesNotMatch; moto checks no signatures and stores the
    # bytes, so finalize has to catch it by comparing sizes.
    if status >= 400:
        assert await store.stat(key) is None
    else:
        info = await store.stat(key)
        assert info is not None
        assert info.size == len(longer) != len(data)


async def test_presigned_put_cannot_replace_an_existing_object(store: S3BlobStore, key: str) -> None:
    data = JPEG_HEAD + b"first"
    signed = await store.presign_put(key, size_bytes=len(data), content_type="image/jpeg", sha256=None, expires_in=300)
    assert (await http("PUT", signed.url, signed.headers, data))[0] == 200

    status, _, _ = await http("PUT", signed.url, signed.headers, JPEG_HEAD + b"swapd")

    assert status == 412
    assert (await store.inspect(key, 0)).sha256 == sha256_hex(data)


async def test_presigned_get_serves_the_bytes(store: S3BlobStore, key: str) -> None:
    data = JPEG_HEAD + os.urandom(5000)
    await store.write(key, stream(data), content_type="image/jpeg")

    status, _, body = await http("GET", await store.presign_get(key, expires_in=60))
    assert (status, body) == (200, data)

    status, headers, body = await http("GET", await store.presign_get(key, expires_in=60, content_type="image/webp"))
    assert (status, headers["Content-Type"], body) == (200, "image/webp", data)


async def test_small_write_is_one_put_and_round_trips(store: S3BlobStore, raw_s3, key: str) -> None:
    data = os.urandom(100_000)

    assert await store.write(key, stream(data, 30_000), content_type="image/png") == len(data)

    info = await store.stat(key)
    assert info is not None
    assert info.size == len(data)
    assert (await store.inspect(key, 0)).sha256 == sha256_hex(data)
    head = await raw_s3.head_object(Bucket=BUCKET, Key=key)
    assert head["ContentType"] == "image/png"
    assert "-" not in head["ETag"], "a single PUT, not a multipart upload"


async def test_write_of_exactly_one_part_is_one_put(store: S3BlobStore, raw_s3, key: str) -> None:
    data = os.urandom(8 * MiB)

    assert await store.write(key, stream(data), content_type="video/mp4") == len(data)

    assert "-" not in (await raw_s3.head_object(Bucket=BUCKET, Key=key))["ETag"]
    assert (await store.inspect(key, 0)).sha256 == sha256_hex(data)


async def test_large_write_is_multipart_and_round_trips(store: S3BlobStore, raw_s3, key: str) -> None:
    data = os.urandom(20 * MiB)

    assert await store.write(key, stream(data), content_type="video/mp4") == len(data)

    info = await store.stat(key)
    assert info is not None
    assert info.size == len(data)
    assert info.sha256 is None, "no full-object SHA-256 is recorded for a multipart upload"
    assert (await store.inspect(key, 0)).sha256 == sha256_hex(data)
    assert (await store.inspect(key, 64)).head == data[:64]
    head = await raw_s3.head_object(Bucket=BUCKET, Key=key)
    assert head["ETag"].strip('"').endswith("-3"), "8 + 8 + 4 MiB parts"
    assert head["ContentType"] == "video/mp4"


async def test_download_streams_a_multipart_object_into_a_file(store: S3BlobStore, key: str, tmp_path) -> None:
    data = os.urandom(20 * MiB)
    await store.write(key, stream(data), content_type="video/mp4")

    assert await store.download(key, tmp_path / "copy") == len(data)

    assert (tmp_path / "copy").read_bytes() == data


async def test_write_replaces_an_existing_object(store: S3BlobStore, key: str) -> None:
    await store.write(key, stream(b"old contents"), content_type="image/png")

    await store.write(key, stream(b"new"), content_type="image/png")

    assert (await store.inspect(key, 100)).head == b"new"


async def test_failed_stream_aborts_the_multipart_upload(store: S3BlobStore, raw_s3, key: str) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield os.urandom(9 * MiB)
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        await store.write(key, failing(), content_type="video/mp4")

    assert await store.stat(key) is None
    uploads = await raw_s3.list_multipart_uploads(Bucket=BUCKET, Prefix=key)
    assert uploads.get("Uploads", []) == []


async def test_empty_object(store: S3BlobStore, key: str) -> None:
    assert await store.write(key, stream(b""), content_type="image/png") == 0

    assert await store.stat(key) == ObjectInfo(size=0)
    assert (await store.inspect(key, 16)).head == b""
    assert (await store.inspect(key, 0)).sha256 == sha256_hex(b"")


async def test_delete_is_idempotent(store: S3BlobStore, key: str) -> None:
    await store.write(key, stream(b"bytes"), content_type="image/png")

    await store.delete(key)
    await store.delete(key)

    assert await store.stat(key) is None


async def test_missing_object(store: S3BlobStore, key: str, tmp_path) -> None:
    assert await store.stat(key) is None
    assert await store.inspect(key, 16) is None
    with pytest.raises(BlobStoreError):
        await store.read(key)
    with pytest.raises(BlobStoreError):
        await store.download(key, tmp_path / "copy")


async def test_keys_are_checked(store: S3BlobStore) -> None:
    for call in (
        lambda: store.stat("../etc/passwd"),
        lambda: store.inspect("Upper/case", 1),
        lambda: store.delete(""),
        lambda: store.presign_get("a//b", expires_in=60),
    ):
        with pytest.raises(ValueError, match="invalid object key"):
            await call()


async def test_outage_raises_blob_store_error_and_recovers() -> None:
    async with moto_server() as server:
        store = await open_store(server.endpoint_url)
        try:
            await store.write("test/kept", stream(b"before"), content_type="image/png")
            await server.stop()

            for operation in (
                lambda: store.stat("test/kept"),
                lambda: store.inspect("test/kept", 4),
                lambda: store.write("test/new", stream(b"during"), content_type="image/png"),
                lambda: store.write("test/big", stream(os.urandom(9 * MiB)), content_type="video/mp4"),
                lambda: store.delete("test/kept"),
                store.ensure_bucket,
            ):
                with pytest.raises(BlobStoreError):
                    await operation()
            # Signing is local, so handing out URLs keeps working while S3 is away.
            assert (await store.presign_get("test/kept", expires_in=60)).startswith(server.endpoint_url)

            await server.start()
            # moto forgets everything when it stops; the same client reconnects by itself.
            await store.ensure_bucket()
            await store.write("test/new", stream(b"after"), content_type="image/png")
            assert (await store.inspect("test/new", 16)).head == b"after"
        finally:
            await store.close()


async def test_an_s3_that_stops_answering_fails_a_request_within_its_timeouts_and_attempts() -> None:
    attempts = 0
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        held.append(writer)  # reads the request, answers nothing, keeps the connection

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    settings = s3_settings(f"http://127.0.0.1:{port}").model_copy(
        update={"s3_read_timeout_seconds": 0.5, "s3_max_attempts": 2}
    )
    store = await open_blob_store(settings)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(BlobStoreError):
            async with asyncio.timeout(20):
                await store.stat("test/kept")
        # Two attempts of 0.5 s each and the backoff between them; botocore's defaults wait 60 s per read.
        assert asyncio.get_running_loop().time() - started < 5
        assert attempts == 2
    finally:
        await store.close()
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()
