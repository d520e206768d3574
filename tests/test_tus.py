"""The tus 1.0.0 endpoints against a real server: the protocol's statuses, bytes and balances.

Real clients (tuspy, tus-js-client) and killed servers are in tests/test_tus_clients.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import random
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
import yarl
from google.protobuf.wrappers_pb2 import Int64Value
from google.rpc import error_details_pb2
from prometheus_client import REGISTRY

from mediavault.blobs import single_chunk
from mediavault.blobs.signing import UrlSigner
from mediavault.domain.uploads import resumable
from mediavault.server import Server
from mediavault.storage.v1 import storage_pb2 as pb
from mediavault.storage.v1 import storage_pb2_grpc
from tests.conftest import running
from tests.helpers import (
    bad_request,
    error_info,
    fake_jpeg,
    http_answers_counted,
    http_answers_counted_since,
    logged_lines,
    rich_status,
    sha256_hex,
    until_waiting_for_lock,
)
from tests.s3server import MotoServer, moto_server
from tests.test_ratelimit import limit

MiB = 1024 * 1024
CHUNK = 5 * MiB
TUS = {"Tus-Resumable": "1.0.0"}
BEGIN = "StorageService/BeginUpload"
# Upload-Metadata of a tus creation: filename a.jpg, filetype image/jpeg.
A_JPEG = f"filename {base64.b64encode(b'a.jpg').decode()},filetype {base64.b64encode(b'image/jpeg').decode()}"
PATCH_HEADERS = {**TUS, "Content-Type": "application/offset+octet-stream"}


@pytest.fixture(scope="module")
async def moto() -> AsyncIterator[MotoServer]:
    async with moto_server() as server:
        yield server


@pytest.fixture(scope="module", params=["fs", "s3"])
async def tus_server(request: pytest.FixtureRequest, make_settings, moto: MotoServer) -> AsyncIterator[Server]:
    overrides: dict = {"tus_chunk_size_bytes": CHUNK}
    if request.param == "s3":
        overrides |= {"blob_backend": "s3", "s3_bucket": f"tus-{uuid.uuid4().hex[:12]}", "s3_endpoint_url": moto.endpoint_url}
    settings = make_settings(**overrides)
    if request.param == "s3":
        from mediavault.blobs.s3 import S3BlobStore

        store = await S3BlobStore.open(settings)
        await store.ensure_bucket()
        await store.close()
    async with running(settings) as server:
        yield server


@pytest.fixture
async def storage(tus_server: Server) -> AsyncIterator[storage_pb2_grpc.StorageServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tus_server.grpc_port}") as channel:
        yield storage_pb2_grpc.StorageServiceStub(channel)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def begin_tus(storage, md, data: bytes, **fields) -> pb.BeginUploadResponse:
    return await storage.BeginUpload(
        pb.BeginUploadRequest(
            filename="clip.jpg",
            content_type="image/jpeg",
            size_bytes=len(data),
            protocol=pb.UPLOAD_PROTOCOL_TUS,
            **fields,
        ),
        metadata=md,
    )


async def summary(storage, md) -> pb.StorageSummary:
    return (await storage.GetStorageSummary(pb.GetStorageSummaryRequest(), metadata=md)).summary


def object_key_of(upload_id: str) -> str:
    return f"originals/{uuid.UUID(upload_id).hex[:2]}/{uuid.UUID(upload_id).hex}"


async def stored_sha256(server: Server, object_key: str) -> str:
    assert server.blobs is not None
    return hashlib.sha256(await server.blobs.read(object_key)).hexdigest()


async def patch(http: aiohttp.ClientSession, url: str, offset: int, body: bytes, **headers: str) -> aiohttp.ClientResponse:
    async with http.patch(url, data=body, headers={**PATCH_HEADERS, "Upload-Offset": str(offset), **headers}) as response:
        await response.read()
        return response


async def head(http: aiohttp.ClientSession, url: str, **headers: str) -> aiohttp.ClientResponse:
    async with http.head(url, headers={**TUS, **headers}) as response:
        return response


async def test_chunks_then_finalize_without_reading_back(tus_server, storage, http, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(CHUNK * 2 + 12345)
    begun = await begin_tus(storage, md, data, sha256=sha256_hex(data))
    assert begun.upload_method == "PATCH"
    assert begun.chunk_size_bytes == CHUNK
    assert begun.upload.protocol == pb.UPLOAD_PROTOCOL_TUS
    url = begun.upload_url

    first = await head(http, url)
    assert first.status == 200
    assert first.headers["Upload-Offset"] == "0"
    assert first.headers["Upload-Length"] == str(len(data))
    assert "Upload-Expires" in first.headers
    assert "Upload-Metadata" not in first.headers, "begun through BeginUpload, without tus metadata"

    offset = 0
    # One chunk of the preferred size, then one that crosses a chunk boundary, then the rest.
    for end in (CHUNK, CHUNK * 2 - 7, len(data)):
        response = await patch(http, url, offset, data[offset:end])
        assert response.status == 204, response.status
        assert response.headers["Upload-Offset"] == str(end)
        offset = end
        got = await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
        assert got.upload.received_bytes == end

    finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
    assert finalized.upload.received_bytes == len(data)
    object_key = object_key_of(begun.upload.upload_id)
    assert await stored_sha256(tus_server, object_key) == sha256_hex(data)
    after = await summary(storage, md)
    assert (after.used_bytes, after.reserved_bytes) == (len(data), 0)

    # Finalized, the upload is complete: HEAD answers its whole length as the offset, and no
    # PATCH adds a byte.
    complete = await head(http, url)
    assert complete.status == 200
    assert complete.headers["Upload-Offset"] == complete.headers["Upload-Length"] == str(len(data))
    assert complete.headers["Cache-Control"] == "no-store"
    assert "Upload-Expires" not in complete.headers
    assert (await patch(http, url, len(data), b"x")).status == 413
    elsewhere = await patch(http, url, CHUNK, b"x")
    assert (elsewhere.status, elsewhere.headers["Upload-Offset"]) == (409, str(len(data)))
    repeated = await patch(http, url, len(data), b"")
    assert (repeated.status, repeated.headers["Upload-Offset"]) == (204, str(len(data)))
    assert await stored_sha256(tus_server, object_key) == sha256_hex(data)
    assert await summary(storage, md) == after


async def test_checksums(tus_server, storage, http, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(300_000)
    begun = await begin_tus(storage, md, data)
    url = begun.upload_url
    piece = data[:100_000]
    wrong = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    refused = await patch(http, url, 0, piece, **{"Upload-Checksum": f"sha1 {wrong}"})
    assert refused.status == 460
    assert (await head(http, url)).headers["Upload-Offset"] == "0"
    # A digest with characters base64 has not: 400, which a tus client does not retry, not 500.
    for digest in ("not*base64", "d\u00e9j\u00e0"):
        assert (await patch(http, url, 0, piece, **{"Upload-Checksum": f"sha1 {digest}"})).status == 400, digest
    assert (await head(http, url)).headers["Upload-Offset"] == "0"

    sha1 = base64.b64encode(hashlib.sha1(piece).digest()).decode()
    assert (await patch(http, url, 0, piece, **{"Upload-Checksum": f"sha1 {sha1}"})).status == 204
    rest = data[100_000:]
    sha256 = base64.b64encode(hashlib.sha256(rest).digest()).decode()
    done = await patch(http, url, 100_000, rest, **{"Upload-Checksum": f"sha256 {sha256}"})
    assert done.status == 204
    assert done.headers["Upload-Offset"] == str(len(data))
    unknown = await patch(http, url, len(data), b"", **{"Upload-Checksum": f"md5 {sha1}"})
    assert unknown.status == 400
    finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED


async def test_bad_requests_change_nothing(tus_server, storage, http, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(200_000)
    begun = await begin_tus(storage, md, data)
    url = begun.upload_url
    assert (await patch(http, url, 0, data[:1000])).status == 204
    before = await summary(storage, md)

    wrong_offset = await patch(http, url, 5, data[5:2000])
    assert wrong_offset.status == 409
    assert wrong_offset.headers["Upload-Offset"] == "1000"
    assert (await patch(http, url, 1000, data[1000:2000], **{"Content-Type": "application/json"})).status == 415
    assert (await patch(http, url, 1000, data[1000:] + b"extra")).status == 413
    no_version = await patch(http, url, 1000, data[1000:2000], **{"Tus-Resumable": "0.2.2"})
    assert no_version.status == 412
    assert no_version.headers["Tus-Version"] == "1.0.0"
    # Characters str.isdigit() takes but int() reads otherwise (Arabic-Indic) or not at all.
    for offset in ("\u0661\u0660\u0660\u0660", "\u00b2", "-1", "1e3"):
        assert (await patch(http, url, 1000, data[1000:2000], **{"Upload-Offset": offset})).status == 400
    tampered = url.replace("X-Signature=", "X-Signature=0")
    assert (await patch(http, tampered, 1000, data[1000:2000])).status == 403
    assert (await head(http, tampered)).status == 403
    # Percent-encoded UTF-8 in the signature was a TypeError in hmac.compare_digest, a 500.
    non_ascii = yarl.URL(url.split("X-Signature=")[0] + "X-Signature=%C3%A9", encoded=True)
    async with http.head(non_ascii, headers=TUS) as response:
        assert response.status == 403
    foreign = url.replace(begun.upload.upload_id, str(uuid.uuid4()))
    assert (await head(http, foreign)).status == 403
    assert (await head(http, url)).headers["Upload-Offset"] == "1000"
    assert await summary(storage, md) == before

    # Termination: the reservation is released and the partial bytes deleted.
    async with http.delete(url, headers=TUS) as response:
        assert response.status == 204
    after = await summary(storage, md)
    assert after.reserved_bytes == before.reserved_bytes - len(data)
    assert (await patch(http, url, 1000, data[1000:2000])).status == 410
    got = await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert got.upload.state == pb.UPLOAD_STATE_FAILED


async def test_an_expired_upload_url_is_gone_and_a_tampered_one_forbidden(tus_server, storage, http, auth, user_id):
    """tus expiration: requests for an expired upload are answered 410 Gone; before, a URL signed as
    it stands but past its expiry (the reservation's) was 403 "URL expired", as a forged one is."""
    md = auth(user_id)
    data = fake_jpeg(5000)
    begun = await begin_tus(storage, md, data)
    signer = UrlSigner(tus_server.settings.url_signing_key, f"http://127.0.0.1:{tus_server.http_port}")
    expired = signer.sign_until("TUS", begun.upload.upload_id, expires=int(time.time()) - 1, route="tus", owner=user_id)
    assert (await head(http, expired)).status == 410
    gone = await patch(http, expired, 0, data[:1000])
    assert (gone.status, await gone.text()) == (410, "URL expired")
    async with http.delete(expired, headers=TUS) as response:
        assert response.status == 410
    # The same past expiry put in a URL signed for a later one: no signature holds it.
    tampered = yarl.URL(begun.upload_url).update_query({"X-Expires": str(int(time.time()) - 1)})
    assert (await head(http, str(tampered))).status == 403
    assert (await patch(http, str(tampered), 0, data[:1000])).status == 403
    assert (await head(http, begun.upload_url)).headers["Upload-Offset"] == "0"


async def test_x_http_method_override_is_the_requests_method(tus_server, storage, http, auth, user_id):
    """tus core: a POST with X-HTTP-Method-Override is the method the header names."""
    md = auth(user_id)
    data = fake_jpeg(200_000)
    begun = await begin_tus(storage, md, data)
    url = begun.upload_url

    async def post(override: str | None, body: bytes = b"", **headers: str) -> aiohttp.ClientResponse:
        sent = {**TUS, **headers, **({"X-HTTP-Method-Override": override} if override else {})}
        async with http.post(url, data=body, headers=sent) as response:
            await response.read()
            return response

    patched = await post("PATCH", data[:1000], **{"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"})
    assert (patched.status, patched.headers["Upload-Offset"]) == (204, "1000")
    headed = await post("HEAD")
    assert (headed.status, headed.headers["Upload-Offset"]) == (200, "1000")
    for refused in (None, "GET", "PUT"):
        answer = await post(refused, data[1000:2000], **{"Content-Type": "application/offset+octet-stream", "Upload-Offset": "1000"})
        assert (answer.status, answer.headers["Allow"]) == (405, "HEAD, PATCH, DELETE, OPTIONS"), refused
    assert (await head(http, url)).headers["Upload-Offset"] == "1000"
    reserved = (await summary(storage, md)).reserved_bytes

    assert (await post("DELETE")).status == 204
    assert (await summary(storage, md)).reserved_bytes == reserved - len(data)
    got = await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert got.upload.state == pb.UPLOAD_STATE_FAILED


async def test_x_http_method_override_on_the_creation_url_is_the_requests_method(tus_server, storage, http, pool, auth, user_id, authenticator):
    """tus core: X-HTTP-Method-Override is the request's method on the creation URL too, whose POST
    creates only when it stands for a POST; one standing for OPTIONS is answered as OPTIONS, on
    either URL."""
    base = f"http://127.0.0.1:{tus_server.http_port}/tus/"
    creation = {**TUS, "Upload-Length": "50000", "Upload-Metadata": A_JPEG, "Authorization": f"Bearer {authenticator.issue(user_id, ['user'])}"}
    before = await summary(storage, auth(user_id))
    answers = []
    for override in ("DELETE", "HEAD", "PATCH", "GET"):
        async with http.post(base, headers={**creation, "X-HTTP-Method-Override": override}) as response:
            answers.append((response.status, response.headers.get("Allow"), response.headers.get("Location")))
    assert answers == [(405, "POST, OPTIONS", None)] * 4
    assert await summary(storage, auth(user_id)) == before
    assert await pool.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", user_id) == 0

    begun = await begin_tus(storage, auth(user_id), fake_jpeg(50_000))
    for url in (base, begun.upload_url):
        async with http.post(url, headers={**creation, "X-HTTP-Method-Override": "OPTIONS"}) as response:
            assert (response.status, response.headers.get("Tus-Version")) == (204, "1.0.0"), url
    async with http.post(base, headers={**creation, "X-HTTP-Method-Override": "POST"}) as response:
        assert response.status == 201


async def test_only_the_owners_finalize_publishes_and_a_terminated_upload_stays_unpublished(tus_server, storage, http, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(50_000)
    begun = await begin_tus(storage, md, data)
    upload_id = begun.upload.upload_id
    object_key = object_key_of(upload_id)
    assert (await patch(http, begun.upload_url, 0, data)).status == 204
    assert tus_server.blobs is not None

    finalize = pb.FinalizeUploadRequest(upload_id=upload_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(finalize, metadata=auth("someone-else"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await tus_server.blobs.stat(object_key) is None, "another user's finalize publishes nothing"

    async with http.delete(begun.upload_url, headers=TUS) as response:
        assert response.status == 204
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.FinalizeUpload(finalize, metadata=md)
    assert error_info(caught.value).reason == "UPLOAD_NOT_PENDING"
    assert await tus_server.blobs.stat(object_key) is None
    assert await partial_objects(tus_server, upload_id) == []


async def test_a_finalized_upload_refuses_termination_and_stays_complete(tus_server, storage, http, auth, user_id):
    """A finalized upload is media: tus termination (DELETE, or a POST standing for one) is refused
    403 and deletes nothing, while HEAD still answers the upload complete, as it did before."""
    md = auth(user_id)
    data = fake_jpeg(50_000)
    begun = await begin_tus(storage, md, data)
    url = begun.upload_url
    assert (await patch(http, url, 0, data)).status == 204
    finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    before = await summary(storage, md)

    async with http.delete(url, headers=TUS) as response:
        assert (response.status, await response.text()) == (403, "upload is finalized")
        assert response.headers["Tus-Resumable"] == "1.0.0"
    async with http.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"}) as response:
        assert response.status == 403
    complete = await head(http, url)
    assert complete.status == 200
    assert complete.headers["Upload-Offset"] == complete.headers["Upload-Length"] == str(len(data))
    got = await storage.GetUpload(pb.GetUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    assert (got.upload.state, got.upload.media_id) == (pb.UPLOAD_STATE_FINALIZED, finalized.media_id)
    assert await stored_sha256(tus_server, object_key_of(begun.upload.upload_id)) == sha256_hex(data)
    assert await summary(storage, md) == before


async def test_a_termination_that_loses_to_a_finalize_is_answered_as_one_of_a_finalized_upload(tus_server, storage, http, pool, auth, user_id):
    """A DELETE that read the upload pending, and whose release then found it finalized by a
    FinalizeUpload committed first, is refused 403 as a termination of a finalized upload, not 410."""
    md = auth(user_id)
    data = fake_jpeg(50_000)
    begun = await begin_tus(storage, md, data)
    upload_id = uuid.UUID(begun.upload.upload_id)
    assert (await patch(http, begun.upload_url, 0, data)).status == 204

    async def terminate() -> tuple[int, str]:
        async with http.delete(begun.upload_url, headers=TUS) as response:
            return response.status, await response.text()

    # The row held, the finalize waits on it first, then the termination's release behind it.
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM uploads WHERE upload_id = $1 FOR UPDATE", upload_id)
        finalize = asyncio.ensure_future(storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=str(upload_id)), metadata=md))
        await until_waiting_for_lock(pool, finalize, "%UPDATE uploads u SET state = 'finalized'%")
        termination = asyncio.create_task(terminate())
        await until_waiting_for_lock(pool, termination, "%UPDATE uploads SET state = $2, failure_reason = $3%")
    assert (await finalize).upload.state == pb.UPLOAD_STATE_FINALIZED
    assert await termination == (403, "upload is finalized")
    assert (await head(http, begun.upload_url)).status == 200
    assert await stored_sha256(tus_server, object_key_of(begun.upload.upload_id)) == sha256_hex(data)
    after = await summary(storage, md)
    assert (after.used_bytes, after.reserved_bytes) == (len(data), 0)


async def test_every_answer_of_the_listener_is_counted_by_route_method_and_status(tus_server, storage, http, auth, user_id):
    # tus requests had no metric: a PATCH failing for every client showed nowhere.
    data = fake_jpeg(1000)
    begun = await begin_tus(storage, auth(user_id), data)
    upload_url = "/tus/{upload_id}"
    counted = [
        ("/tus/", "OPTIONS", "204"),
        (upload_url, "HEAD", "200"),
        (upload_url, "PATCH", "409"),
        (upload_url, "PATCH", "415"),
        ("unmatched", "GET", "404"),
    ]
    before = [requests_counted(*labels) for labels in counted]
    base = f"http://127.0.0.1:{tus_server.http_port}"
    async with http.options(f"{base}/tus/") as response:
        assert response.status == 204
    assert (await head(http, begun.upload_url)).status == 200
    assert (await patch(http, begun.upload_url, 500, data)).status == 409
    # Refused before its body, by the answer to Expect: 100-continue, which no handler gives.
    status, _, _, writer = await asked_patch(tus_server, begun.upload_url, {**PATCH_HEADERS, "Content-Type": "image/jpeg", "Upload-Offset": "0", "Content-Length": "10"})
    writer.close()
    assert status == 415
    async with http.get(f"{base}/nowhere/{begun.upload.upload_id}") as response:
        assert response.status == 404
    after = [requests_counted(*labels) for labels in counted]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1, 1]


def requests_counted(route: str, method: str, status: str) -> float:
    return REGISTRY.get_sample_value("mediavault_http_requests_total", {"route": route, "method": method, "status": status}) or 0.0


async def test_options_and_creation(tus_server, storage, http, auth, user_id, authenticator):
    base = f"http://127.0.0.1:{tus_server.http_port}/tus/"
    async with http.options(base) as response:
        assert response.status == 204
        assert response.headers["Tus-Version"] == "1.0.0"
        extensions = {"creation", "creation-with-upload", "expiration", "termination", "checksum"}
        assert set(response.headers["Tus-Extension"].split(",")) == extensions
        assert response.headers["Tus-Checksum-Algorithm"] == "sha1,sha256"
        assert int(response.headers["Tus-Max-Size"]) == tus_server.settings.max_video_bytes
        assert "Access-Control-Allow-Origin" not in response.headers

    data = fake_jpeg(50_000)
    headers = {**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": A_JPEG}
    async with http.post(base, headers=headers) as response:
        assert response.status == 401
    token = authenticator.issue(user_id, ["user"])
    before = await summary(storage, auth(user_id))
    long_name = f"filename {base64.b64encode(b'a' * 252 + b'.jpg').decode()},filetype {base64.b64encode(b'image/jpeg').decode()}"
    bad_creations = [
        {"Upload-Metadata": long_name},
        {"Upload-Length": "\u0665\u0660\u0660\u0660\u0660"},
        {"Upload-Length": "\u00b2"},
        {"Upload-Metadata": f"{A_JPEG},note d\u00e9j\u00e0"},
    ]
    for bad in bad_creations:
        async with http.post(base, headers={**headers, **bad, "Authorization": f"Bearer {token}"}) as response:
            assert response.status == 400, bad
    assert await summary(storage, auth(user_id)) == before
    # tus creation: HEAD answers the Upload-Metadata as it was sent, keys without a value too.
    sent_metadata = f"{A_JPEG},relativePath,note {base64.b64encode('été'.encode()).decode()}"
    async with http.post(base, headers={**headers, "Upload-Metadata": sent_metadata, "Authorization": f"Bearer {token}"}) as response:
        assert response.status == 201
        location = response.headers["Location"]
    assert (await head(http, location)).headers["Upload-Metadata"] == sent_metadata
    assert (await patch(http, location, 0, data)).status == 204
    upload_id = location.split("/tus/")[1].split("?")[0]
    finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=auth(user_id))
    assert finalized.upload.filename == "a.jpg"
    assert finalized.upload.size_bytes == len(data)


async def test_a_concatenation_creation_is_refused_and_creates_nothing(tus_server, storage, http, pool, auth, user_id, authenticator):
    """Upload-Concat (tus concatenation, not in Tus-Extension) is refused 400 with nothing reserved,
    a partial upload's creation as a final one's, instead of making an ordinary upload of it."""
    base = f"http://127.0.0.1:{tus_server.http_port}/tus/"
    headers = {**TUS, "Upload-Metadata": A_JPEG, "Authorization": f"Bearer {authenticator.issue(user_id, ['user'])}"}
    before = await summary(storage, auth(user_id))
    creations = [
        {"Upload-Concat": "partial", "Upload-Length": "50000"},
        # A final upload's creation, as tus has it, names no Upload-Length.
        {"Upload-Concat": f"final;{base}a {base}b"},
        {"Upload-Concat": f"final;{base}a", "Upload-Length": "50000"},
        {"Upload-Concat": "", "Upload-Length": "50000"},
    ]
    for creation in creations:
        async with http.post(base, headers={**headers, **creation}) as response:
            assert (response.status, await response.text()) == (400, "Upload-Concat: the concatenation extension is not supported"), creation
            assert "Location" not in response.headers
    assert await summary(storage, auth(user_id)) == before
    assert await pool.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", user_id) == 0


async def test_a_creation_that_defers_its_length_is_refused_and_creates_nothing(tus_server, storage, http, pool, auth, user_id, authenticator):
    """creation-defer-length is not offered: Upload-Defer-Length in a creation is 400 with nothing
    reserved, beside an Upload-Length too, and with a value other than 1 (tus: 400)."""
    base = f"http://127.0.0.1:{tus_server.http_port}/tus/"
    headers = {**TUS, "Upload-Metadata": A_JPEG, "Authorization": f"Bearer {authenticator.issue(user_id, ['user'])}"}
    before = await summary(storage, auth(user_id))
    answers = []
    for creation in (
        {"Upload-Defer-Length": "1"},
        {"Upload-Defer-Length": "1", "Upload-Length": "50000"},
        {"Upload-Defer-Length": "2", "Upload-Length": "50000"},
    ):
        async with http.post(base, headers={**headers, **creation}) as response:
            answers.append((response.status, await response.text(), response.headers.get("Location")))
    refused = (400, "Upload-Defer-Length: the creation-defer-length extension is not supported", None)
    assert answers == [refused] * 3
    assert await summary(storage, auth(user_id)) == before
    assert await pool.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", user_id) == 0


def creation_headers(authenticator, user_id: str, length: int, **headers: str) -> dict[str, str]:
    """A tus creation's headers; its body, when it has one, the upload's first chunk (creation-with-upload)."""
    return {
        **TUS,
        "Authorization": f"Bearer {authenticator.issue(user_id, ['user'])}",
        "Upload-Length": str(length),
        "Upload-Metadata": A_JPEG,
        "Content-Type": "application/offset+octet-stream",
        **headers,
    }


def base64_digest(algorithm: str, data: bytes) -> str:
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode()


async def test_a_creation_with_a_body_stores_it_as_the_first_chunk_and_answers_its_offset(
    tus_server, storage, http, pool, auth, user_id, authenticator
):
    """tus creation-with-upload: the POST's body is the upload's first chunk, stored as a PATCH at
    offset 0 stores it (its Upload-Checksum checked), and the 201 carries the Upload-Offset after
    it. The body was dropped unread and the 201 carried no offset: tus-js-client failed
    ("invalid or missing offset value") with the upload left reserved, or sent the chunk again."""
    md = auth(user_id)
    base = f"http://127.0.0.1:{tus_server.http_port}/tus/"
    data = fake_jpeg(CHUNK + 300_000, fill=b"\x11")
    first = data[:CHUNK]
    headers = creation_headers(authenticator, user_id, len(data), **{"Upload-Checksum": f"sha256 {base64_digest('sha256', first)}"})
    async with http.post(base, data=first, headers=headers) as response:
        assert response.status == 201, await response.text()
        assert response.headers["Upload-Offset"] == str(CHUNK)
        assert "Upload-Expires" in response.headers
        location = response.headers["Location"]
    assert (await head(http, location)).headers["Upload-Offset"] == str(CHUNK)
    assert (await patch(http, location, CHUNK, data[CHUNK:])).status == 204
    upload_id = location.split("/tus/")[1].split("?")[0]
    finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md)
    assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
    assert await stored_sha256(tus_server, object_key_of(upload_id)) == sha256_hex(data)

    # The whole upload in its creation: complete at once, for FinalizeUpload.
    whole = fake_jpeg(200_000, fill=b"\x22")
    async with http.post(base, data=whole, headers=creation_headers(authenticator, user_id, len(whole))) as response:
        assert (response.status, response.headers["Upload-Offset"]) == (201, str(len(whole)))
        whole_id = response.headers["Location"].split("/tus/")[1].split("?")[0]
    finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=whole_id), metadata=md)
    assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
    assert await stored_sha256(tus_server, object_key_of(whole_id)) == sha256_hex(whole)
    after = await summary(storage, md)
    assert (after.used_bytes, after.reserved_bytes, after.pending_uploads) == (len(data) + len(whole), 0, 0)
    assert await pool.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", user_id) == 2


async def test_a_creation_whose_body_is_refused_keeps_its_upload_and_says_where_to_go_on(tus_server, storage, http, auth, user_id, authenticator):
    """A first chunk that fails its Upload-Checksum is refused 460 as a PATCH's is, nothing of it kept;
    one that runs past Upload-Length (a chunked body) 413. The upload was made: the answer carries its
    Location and Upload-Offset, and the client goes on from there."""
    md = auth(user_id)
    base = f"http://127.0.0.1:{tus_server.http_port}/tus/"
    data = fake_jpeg(300_000, fill=b"\x33")
    first = data[:100_000]
    wrong = creation_headers(authenticator, user_id, len(data), **{"Upload-Checksum": f"sha1 {base64_digest('sha1', b'other')}"})
    async with http.post(base, data=first, headers=wrong) as response:
        assert (response.status, response.headers["Upload-Offset"]) == (460, "0")
        location = response.headers["Location"]
    assert (await head(http, location)).headers["Upload-Offset"] == "0"
    assert (await summary(storage, md)).reserved_bytes == len(data)
    assert (await patch(http, location, 0, first, **{"Upload-Checksum": f"sha1 {base64_digest('sha1', first)}"})).status == 204
    assert (await patch(http, location, len(first), data[len(first) :])).status == 204
    upload_id = location.split("/tus/")[1].split("?")[0]
    finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md)
    assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
    assert await stored_sha256(tus_server, object_key_of(upload_id)) == sha256_hex(data)

    async def past_its_length() -> AsyncIterator[bytes]:
        yield data
        yield b"past Upload-Length"

    try:
        async with http.post(base, data=past_its_length(), headers=creation_headers(authenticator, user_id, len(data))) as response:
            assert (response.status, response.headers["Upload-Offset"]) == (413, "0")
            assert (await head(http, response.headers["Location"])).headers["Upload-Offset"] == "0"
    except aiohttp.ClientError:
        pass  # the server may close the connection before the client has sent the whole body
    after = await summary(storage, md)
    assert (after.used_bytes, after.reserved_bytes, after.pending_uploads) == (len(data), len(data), 1)


async def test_a_creation_body_the_upload_could_not_take_is_refused_before_anything_is_reserved(
    tus_server, storage, http, pool, auth, user_id, authenticator
):
    """A body that is not application/offset+octet-stream (415, as a PATCH's: it was created without it,
    its bytes dropped unread), a Content-Length past Upload-Length (413) and an Upload-Checksum of an
    algorithm not offered (400) are refused with nothing reserved. A Content-Type without a body, which
    some HTTP clients send with every POST, is a creation without one."""
    base = f"http://127.0.0.1:{tus_server.http_port}/tus/"
    data = fake_jpeg(50_000)
    before = await summary(storage, auth(user_id))
    answers = []
    for body, headers in (
        (data, {"Content-Type": "application/octet-stream"}),
        (data, {"Content-Type": "image/jpeg"}),
        (data + b"x", {}),
        (data, {"Upload-Checksum": f"md5 {base64_digest('md5', data)}"}),
    ):
        async with http.post(base, data=body, headers=creation_headers(authenticator, user_id, len(data), **headers)) as response:
            answers.append((response.status, response.headers.get("Location")))
    assert answers == [(415, None), (415, None), (413, None), (400, None)]
    assert await summary(storage, auth(user_id)) == before
    assert await pool.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", user_id) == 0

    form = creation_headers(authenticator, user_id, len(data), **{"Content-Type": "application/x-www-form-urlencoded"})
    async with http.post(base, data=b"", headers=form) as response:
        assert response.status == 201
        assert "Upload-Offset" not in response.headers
        assert (await head(http, response.headers["Location"])).headers["Upload-Offset"] == "0"


async def test_a_creation_whose_body_is_cut_off_is_released(tus_server, storage, pool, auth, user_id, authenticator):
    """The connection lost mid-body, the creation is never answered, and its Location, told only
    there, never reaches the client, which creates another upload: this one, which no one could
    go on with, is released with what it stored, instead of staying reserved until it expired."""
    md = auth(user_id)
    data = fake_jpeg(12 * MiB, fill=b"\x44")
    reader, writer = await asyncio.open_connection("127.0.0.1", tus_server.http_port)
    header_lines = "".join(f"{name}: {value}\r\n" for name, value in creation_headers(authenticator, user_id, len(data)).items())
    writer.write(f"POST /tus/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{header_lines}Content-Length: {len(data)}\r\n\r\n".encode())
    # Past a checkpoint (fs: a chunk; S3: a part), so that there are bytes to release.
    writer.write(data[: 7 * MiB])
    await writer.drain()
    upload_id = None
    async with asyncio.timeout(30):
        while upload_id is None:
            upload_id = await pool.fetchval("SELECT upload_id FROM uploads WHERE user_id = $1", user_id)
            await asyncio.sleep(0.05)
        checkpointed = "SELECT received_bytes FROM upload_checkpoints WHERE upload_id = $1"
        while (await pool.fetchval(checkpointed, upload_id) or 0) < CHUNK:
            await asyncio.sleep(0.05)
    writer.transport.abort()
    state = "SELECT state, failure_reason FROM uploads WHERE upload_id = $1"

    async def released() -> tuple[tuple[str, str], list[str], list[str]]:
        # The release commits first, then deletes what the upload stored.
        row = await pool.fetchrow(state, upload_id)
        return tuple(row), await partial_objects(tus_server, str(upload_id)), await multipart_uploads(tus_server, str(upload_id))

    expected = (("failed", "CLIENT_FAILED"), [], [])
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            while await released() != expected:
                await asyncio.sleep(0.05)
    assert await released() == expected
    after = await summary(storage, md)
    assert (after.used_bytes, after.reserved_bytes, after.pending_uploads) == (0, 0, 0)


async def test_a_creation_whose_body_stalls_keeps_what_came_and_answers_where_to_go_on(make_settings, http, auth, user_id, authenticator):
    """A first chunk that stops coming ends as a PATCH's does (TUS_IDLE_TIMEOUT_SECONDS): what arrived is
    kept, and the creation, its client still connected, is answered 201 with Location and the offset."""
    async with (
        running(make_settings(tus_idle_timeout_seconds=0.5)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        data = fake_jpeg(100_000, fill=b"\x55")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        header_lines = "".join(f"{name}: {value}\r\n" for name, value in creation_headers(authenticator, user_id, len(data)).items())
        writer.write(
            f"POST /tus/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{header_lines}Content-Length: {len(data)}\r\n\r\n".encode() + data[:30_000]
        )
        await writer.drain()
        try:
            async with asyncio.timeout(10):
                status, headers = await response_head(reader)
        finally:
            writer.close()
        assert (status, headers["Upload-Offset"]) == (201, "30000")
        location = headers["Location"]
        assert (await head(http, location)).headers["Upload-Offset"] == "30000"
        assert (await patch(http, location, 30_000, data[30_000:])).status == 204
        upload_id = location.split("/tus/")[1].split("?")[0]
        finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md)
        assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
        assert await stored_sha256(server, object_key_of(upload_id)) == sha256_hex(data)
        after = await summary(storage, md)
        assert (after.used_bytes, after.reserved_bytes) == (len(data), 0)


async def test_upload_content_continues_a_tus_upload(tus_server, storage, http, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(CHUNK + 4321)
    begun = await begin_tus(storage, md, data, sha256=sha256_hex(data))
    assert (await patch(http, begun.upload_url, 0, data[:777])).status == 204

    async def stream():
        yield pb.UploadContentRequest(upload_id=begun.upload.upload_id)
        for start in range(777, len(data), 1 << 20):
            yield pb.UploadContentRequest(chunk=data[start : start + (1 << 20)])

    done = await storage.UploadContent(stream(), metadata=md)
    assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
    object_key = object_key_of(begun.upload.upload_id)
    assert await stored_sha256(tus_server, object_key) == sha256_hex(data)


async def test_upload_content_streams_that_end_early_leave_a_tus_upload_pending(tus_server, storage, auth, user_id):
    """A TUS upload may go up as several UploadContent streams: each continues from received_bytes,
    and only the one that brings the last byte finalizes."""
    md = auth(user_id)
    data = fake_jpeg(12 * MiB)
    begun = await begin_tus(storage, md, data, sha256=sha256_hex(data))
    upload_id = begun.upload.upload_id

    async def stream(start: int, end: int) -> AsyncIterator[pb.UploadContentRequest]:
        yield pb.UploadContentRequest(upload_id=upload_id)
        for piece in range(start, end, MiB):
            yield pb.UploadContentRequest(chunk=data[piece : min(piece + MiB, end)])

    first = await storage.UploadContent(stream(0, 3 * MiB), metadata=md)
    assert first.upload.state == pb.UPLOAD_STATE_PENDING
    assert first.upload.received_bytes == 3 * MiB
    got = await storage.GetUpload(pb.GetUploadRequest(upload_id=upload_id), metadata=md)
    assert (got.upload.state, got.upload.received_bytes) == (pb.UPLOAD_STATE_PENDING, 3 * MiB)
    assert (await summary(storage, md)).reserved_bytes == len(data)

    rest = await storage.UploadContent(stream(got.upload.received_bytes, len(data)), metadata=md)
    assert rest.upload.state == pb.UPLOAD_STATE_FINALIZED
    assert rest.upload.received_bytes == len(data)
    assert await stored_sha256(tus_server, object_key_of(upload_id)) == sha256_hex(data)
    after = await summary(storage, md)
    assert (after.used_bytes, after.reserved_bytes) == (len(data), 0)


def content_stream(upload_id: str, data: bytes, start: int, end: int, **first) -> AsyncIterator[pb.UploadContentRequest]:
    """An UploadContent stream of data[start:end] in 1 MiB messages; first: more fields of the first message."""

    async def stream() -> AsyncIterator[pb.UploadContentRequest]:
        yield pb.UploadContentRequest(upload_id=upload_id, **first)
        for piece in range(start, end, MiB):
            yield pb.UploadContentRequest(chunk=data[piece : min(piece + MiB, end)])

    return stream()


async def refused(storage, md, sent: list[pb.UploadContentRequest], rest: AsyncIterator[pb.UploadContentRequest]) -> grpc.aio.AioRpcError:
    """The error an UploadContent answers, its stream sending `sent`, then `rest` unless answered within 2 s.

    A server that refuses before reading on answers while the client would still be sending, and
    grpc's client may then report its failed send (INTERNAL) instead of the server's status.
    """
    answered = asyncio.Event()

    async def stream() -> AsyncIterator[pb.UploadContentRequest]:
        for message in sent:
            yield message
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answered.wait(), 2)
            return
        async for message in rest:
            yield message

    call = storage.UploadContent(stream(), metadata=md)
    call.add_done_callback(lambda _: answered.set())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def chunks_of(data: bytes, start: int, end: int) -> AsyncIterator[pb.UploadContentRequest]:
    async def stream() -> AsyncIterator[pb.UploadContentRequest]:
        for piece in range(start, end, MiB):
            yield pb.UploadContentRequest(chunk=data[piece : min(piece + MiB, end)])

    return stream()


async def received(storage, md, upload_id: str) -> tuple[int, int]:
    got = await storage.GetUpload(pb.GetUploadRequest(upload_id=upload_id), metadata=md)
    return got.upload.state, got.upload.received_bytes


def jpeg_of(size: int, seed: int) -> bytes:
    """size bytes that begin as a JPEG and go on at random, so that no two pieces are alike."""
    return fake_jpeg(64) + random.Random(seed).randbytes(size)[64:]


async def patched_first_mib(storage, http, md, size: int, seed: int) -> tuple[bytes, str]:
    """A TUS upload of jpeg_of(size, seed), no sha256 declared, whose first MiB a tus PATCH stored;
    the data and the upload id."""
    data = jpeg_of(size, seed)
    begun = await begin_tus(storage, md, data)
    assert (await patch(http, begun.upload_url, 0, data[:MiB])).status == 204
    return data, begun.upload.upload_id


async def test_upload_content_streams_with_offsets_finalize_the_upload(tus_server, storage, auth, user_id):
    """Each stream names the received_bytes it continues from: the pieces join into the declared bytes."""
    md = auth(user_id)
    data = jpeg_of(12 * MiB, 7)
    begun = await begin_tus(storage, md, data, sha256=sha256_hex(data))
    upload_id = begun.upload.upload_id

    first = await storage.UploadContent(content_stream(upload_id, data, 0, 3 * MiB, offset=Int64Value(value=0)), metadata=md)
    assert (first.upload.state, first.upload.received_bytes) == (pb.UPLOAD_STATE_PENDING, 3 * MiB)
    _, offset = await received(storage, md, upload_id)
    second = await storage.UploadContent(content_stream(upload_id, data, offset, 8 * MiB, offset=Int64Value(value=offset)), metadata=md)
    assert (second.upload.state, second.upload.received_bytes) == (pb.UPLOAD_STATE_PENDING, 8 * MiB)
    last = await storage.UploadContent(
        content_stream(upload_id, data, 8 * MiB, len(data), offset=Int64Value(value=8 * MiB)), metadata=md
    )
    assert (last.upload.state, last.upload.received_bytes) == (pb.UPLOAD_STATE_FINALIZED, len(data))
    assert await stored_sha256(tus_server, object_key_of(upload_id)) == sha256_hex(data)


async def test_upload_content_from_a_stale_offset_is_refused_and_stores_nothing(tus_server, storage, http, auth, user_id):
    """The client read received_bytes 0, then a tus PATCH stored 1 MiB: its stream from offset 0 is
    refused OFFSET_MISMATCH with the offset to continue from, and appends nothing."""
    md = auth(user_id)
    data = jpeg_of(6 * MiB, 8)
    begun = await begin_tus(storage, md, data)  # no sha256: nothing but the offset guards the bytes
    upload_id = begun.upload.upload_id
    assert await received(storage, md, upload_id) == (pb.UPLOAD_STATE_PENDING, 0)
    assert (await patch(http, begun.upload_url, 0, data[:MiB])).status == 204

    # The whole file from the stale offset 0; refused before any chunk is read.
    first = pb.UploadContentRequest(upload_id=upload_id, offset=Int64Value(value=0))
    error = await refused(storage, md, [first], chunks_of(data, 0, len(data)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    info = error_info(error)
    assert (info.reason, dict(info.metadata)) == ("OFFSET_MISMATCH", {"offset": str(MiB)})
    assert await received(storage, md, upload_id) == (pb.UPLOAD_STATE_PENDING, MiB)
    assert (await head(http, begun.upload_url)).headers["Upload-Offset"] == str(MiB)

    # The client continues from the offset it was told.
    done = await storage.UploadContent(
        content_stream(upload_id, data, MiB, len(data), offset=Int64Value(value=int(info.metadata["offset"]))), metadata=md
    )
    assert (done.upload.state, done.upload.received_bytes) == (pb.UPLOAD_STATE_FINALIZED, len(data))
    assert await stored_sha256(tus_server, object_key_of(upload_id)) == sha256_hex(data)


async def test_upload_content_past_the_declared_size_completes_nothing(tus_server, storage, http, auth, user_id):
    """The stale client of the test above without an offset: its 6 MiB go after the 1 MiB a PATCH
    stored and overrun the declared size. INVALID_ARGUMENT, and the stream's bytes never reach
    size_bytes: only what its inner checkpoint made durable (the 5 MiB chunk boundary, on fs and on
    S3) stays, so FinalizeUpload answers SIZE_MISMATCH instead of publishing the wrong bytes."""
    md = auth(user_id)
    data, upload_id = await patched_first_mib(storage, http, md, 6 * MiB, 9)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.UploadContent(content_stream(upload_id, data, 0, len(data)), metadata=md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"chunk: stream exceeds the declared {len(data)} bytes"
    assert await received(storage, md, upload_id) == (pb.UPLOAD_STATE_PENDING, CHUNK)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "SIZE_MISMATCH"
    assert (await received(storage, md, upload_id))[0] == pb.UPLOAD_STATE_FAILED
    assert tus_server.blobs is not None
    assert await tus_server.blobs.stat(object_key_of(upload_id)) is None, "nothing published"


async def test_upload_content_overrunning_within_a_chunk_keeps_the_bytes_from_before_the_stream(tus_server, storage, http, auth, user_id):
    """An overrun that crosses no checkpoint boundary leaves received_bytes where the stream found
    it, even when the stream's bytes reached size_bytes exactly before the one that overran."""
    md = auth(user_id)
    data, upload_id = await patched_first_mib(storage, http, md, 3 * MiB, 10)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.UploadContent(content_stream(upload_id, data, 0, len(data)), metadata=md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await received(storage, md, upload_id) == (pb.UPLOAD_STATE_PENDING, MiB)

    done = await storage.UploadContent(content_stream(upload_id, data, MiB, len(data), offset=Int64Value(value=MiB)), metadata=md)
    assert (done.upload.state, done.upload.received_bytes) == (pb.UPLOAD_STATE_FINALIZED, len(data))
    assert await stored_sha256(tus_server, object_key_of(upload_id)) == sha256_hex(data)


async def test_upload_content_offset_is_validated(tus_server, storage, auth, user_id):
    md = auth(user_id)
    data = fake_jpeg(1000)
    tus = await begin_tus(storage, md, data)
    single = await storage.BeginUpload(
        pb.BeginUploadRequest(filename="a.jpg", content_type="image/jpeg", size_bytes=len(data)), metadata=md
    )

    cases = [
        ([pb.UploadContentRequest(upload_id=tus.upload.upload_id, offset=Int64Value(value=-1))], "offset: must be at least 0"),
        (
            [pb.UploadContentRequest(upload_id=tus.upload.upload_id), pb.UploadContentRequest(chunk=data[:10], offset=Int64Value(value=0))],
            "offset: only the first message may carry offset",
        ),
        (
            [pb.UploadContentRequest(upload_id=single.upload.upload_id, offset=Int64Value(value=10))],
            "offset: a SINGLE upload's stream starts at 0",
        ),
    ]
    for sent, details in cases:
        error = await refused(storage, md, sent, chunks_of(data, 0, len(data)))
        assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
        assert [v.field for v in bad_request(error).field_violations] == ["offset"]
    assert await received(storage, md, tus.upload.upload_id) == (pb.UPLOAD_STATE_PENDING, 0)

    # A SINGLE upload's stream may say it starts at 0.
    done = await storage.UploadContent(content_stream(single.upload.upload_id, data, 0, len(data), offset=Int64Value(value=0)), metadata=md)
    assert done.upload.state == pb.UPLOAD_STATE_FINALIZED


async def received_once_settled(storage, md, upload_id: str) -> int:
    """GetUpload's received_bytes once it is above 0, or 0 after a few seconds."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        got = await storage.GetUpload(pb.GetUploadRequest(upload_id=upload_id), metadata=md)
        if got.upload.received_bytes or asyncio.get_running_loop().time() > deadline:
            return got.upload.received_bytes
        await asyncio.sleep(0.05)


async def test_a_cancelled_upload_content_stream_keeps_what_arrived(tus_server, storage, auth, user_id):
    """A client cancels its stream mid-chunk, before any inner checkpoint: the bytes the server has
    written are kept as a cut connection's are, and the next stream continues after them."""
    md = auth(user_id)
    data = fake_jpeg(12 * MiB)
    begun = await begin_tus(storage, md, data, sha256=sha256_hex(data))
    upload_id = begun.upload.upload_id
    sent = asyncio.Event()

    async def cut_stream() -> AsyncIterator[pb.UploadContentRequest]:
        yield pb.UploadContentRequest(upload_id=upload_id)
        for start in range(0, 3 * MiB, MiB):
            yield pb.UploadContentRequest(chunk=data[start : start + MiB])
        sent.set()
        await asyncio.Event().wait()

    call = storage.UploadContent(cut_stream(), metadata=md)
    await sent.wait()
    await asyncio.sleep(0.5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    received = await received_once_settled(storage, md, upload_id)
    # Less than a checkpoint interval (a chunk on fs, a part on S3): without the cancelled stream's
    # last checkpoint nothing would be kept.
    assert 0 < received <= 3 * MiB

    async def rest() -> AsyncIterator[pb.UploadContentRequest]:
        yield pb.UploadContentRequest(upload_id=upload_id)
        for start in range(received, len(data), MiB):
            yield pb.UploadContentRequest(chunk=data[start : start + MiB])

    done = await storage.UploadContent(rest(), metadata=md)
    assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
    assert await stored_sha256(tus_server, object_key_of(upload_id)) == sha256_hex(data)


async def test_a_patch_cut_by_the_servers_shutdown_keeps_what_arrived(make_settings, http, auth, user_id):
    """The HTTP listener's shutdown cuts a PATCH body still coming (CancelledError from the body):
    what arrived is kept, and the next server answers it as the offset."""
    settings = make_settings(tus_chunk_size_bytes=CHUNK)
    md = auth(user_id)
    data = fake_jpeg(12 * MiB)
    async with running(settings) as first:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.grpc_port}") as channel:
            begun = await begin_tus(storage_pb2_grpc.StorageServiceStub(channel), md, data, sha256=sha256_hex(data))
        target = begun.upload_url.split(f":{first.http_port}", 1)[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", first.http_port)
        header_lines = "".join(f"{name}: {value}\r\n" for name, value in PATCH_HEADERS.items())
        # A phone mid-chunk: 3 MiB of a 5 MiB PATCH are in, the rest is slow to come.
        writer.write(
            f"PATCH {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header_lines}Upload-Offset: 0\r\n"
            f"Content-Length: {CHUNK}\r\n\r\n".encode() + data[: 3 * MiB]
        )
        await writer.drain()
        await asyncio.sleep(0.5)
        await first.shutdown(1.0)
        writer.close()
    async with running(settings) as second, grpc.aio.insecure_channel(f"127.0.0.1:{second.grpc_port}") as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        url = begun.upload_url.replace(f":{first.http_port}", f":{second.http_port}")
        kept = await head(http, url)
        assert kept.headers["Upload-Offset"] == str(3 * MiB)
        assert (await patch(http, url, 3 * MiB, data[3 * MiB :])).status == 204
        done = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
        assert done.upload.state == pb.UPLOAD_STATE_FINALIZED
        assert await stored_sha256(second, object_key_of(begun.upload.upload_id)) == sha256_hex(data)


async def test_a_creation_cut_by_the_servers_shutdown_is_released(make_settings, pool, auth, user_id, authenticator):
    """The listener's shutdown cuts a creation's body still coming: the creation is never answered,
    so no one could go on with its upload, which is released."""
    data = fake_jpeg(12 * MiB)
    async with running(make_settings(tus_chunk_size_bytes=CHUNK)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        header_lines = "".join(f"{name}: {value}\r\n" for name, value in creation_headers(authenticator, user_id, len(data)).items())
        writer.write(
            f"POST /tus/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{header_lines}Content-Length: {len(data)}\r\n\r\n".encode()
            + data[: 3 * MiB]
        )
        await writer.drain()
        await asyncio.sleep(0.5)
        await server.shutdown(1.0)
        writer.close()
    rows = await pool.fetch("SELECT state, failure_reason FROM uploads WHERE user_id = $1", user_id)
    assert [tuple(row) for row in rows] == [("failed", "CLIENT_FAILED")]
    async with running(make_settings()) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        after = await summary(storage_pb2_grpc.StorageServiceStub(channel), auth(user_id))
    assert (after.used_bytes, after.reserved_bytes, after.pending_uploads) == (0, 0, 0)


async def test_busy_upload_is_refused(tus_server, storage, auth, user_id):
    """The gRPC face of the writer lease; two PATCHes on two processes are in test_tus_clients.py."""
    md = auth(user_id)
    data = fake_jpeg(1000)
    begun = await begin_tus(storage, md, data)
    assert tus_server.pool is not None
    # Another writer's lease, running.
    await tus_server.pool.execute(
        "UPDATE upload_progress SET writer = gen_random_uuid(), lease_until = now() + interval '1 hour' WHERE upload_id = $1",
        uuid.UUID(begun.upload.upload_id),
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.UploadContent(content_stream(begun.upload.upload_id, data, 0, len(data)), metadata=md)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert error_info(caught.value).reason == "UPLOAD_BUSY"


async def partial_objects(server: Server, upload_id: str) -> list[str]:
    """Keys under partial/ that belong to the upload (the fs file or the S3 tail objects)."""
    assert server.blobs is not None
    hex_id = uuid.UUID(upload_id).hex
    listed = await server.blobs.list_page(f"partial/{hex_id[:2]}/", after=None, limit=1000)
    return [o.key for o in listed if o.key.startswith(f"partial/{hex_id[:2]}/{hex_id}")]


async def multipart_uploads(server: Server, upload_id: str) -> list[str]:
    if server.settings.blob_backend != "s3":
        return []
    import boto3

    client = boto3.client("s3", endpoint_url=server.settings.s3_endpoint_url, region_name=server.settings.s3_region)
    listed = client.list_multipart_uploads(Bucket=server.settings.s3_bucket)
    return [u["UploadId"] for u in listed.get("Uploads", []) if uuid.UUID(upload_id).hex in u["Key"]]


async def test_s3_parts_are_checkpoints_inside_a_longer_chunk(make_settings, moto, http, auth, user_id):
    """On S3 a chunk larger than a part goes up as 8 MiB parts, each one a durable point:
    a PATCH that fails after its first part keeps that part, and the next PATCH goes on from it."""
    from mediavault.blobs.s3 import S3BlobStore

    settings = make_settings(
        tus_chunk_size_bytes=32 * MiB,
        blob_backend="s3",
        s3_bucket=f"tus-{uuid.uuid4().hex[:12]}",
        s3_endpoint_url=moto.endpoint_url,
    )
    store = await S3BlobStore.open(settings)
    await store.ensure_bucket()
    await store.close()
    data = fake_jpeg(12 * MiB + 4321)
    async with running(settings) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        begun = await begin_tus(storage, md, data, sha256=sha256_hex(data))
        assert begun.chunk_size_bytes == 32 * MiB

        async def too_long() -> AsyncIterator[bytes]:
            # No Content-Length: the body is refused only once it passes Upload-Length. The
            # object's last bytes come with the ones past it, so that no read of the body ends
            # at the declared size, where the chunk would be checkpointed whole.
            for start in range(0, 12 * MiB, MiB):
                yield data[start : start + MiB]
            yield data[12 * MiB :] + b"past the declared length"

        try:
            async with http.patch(begun.upload_url, data=too_long(), headers={**PATCH_HEADERS, "Upload-Offset": "0"}) as response:
                assert response.status == 413
        except aiohttp.ClientError:
            pass  # the server may close the connection before the client has sent the whole body
        assert (await head(http, begun.upload_url)).headers["Upload-Offset"] == str(8 * MiB)

        assert (await patch(http, begun.upload_url, 8 * MiB, data[8 * MiB :])).status == 204
        finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
        assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
        hex_id = uuid.UUID(begun.upload.upload_id).hex
        assert await stored_sha256(server, f"originals/{hex_id[:2]}/{hex_id}") == sha256_hex(data)


@pytest.fixture
async def worker_ctx(tus_server: Server) -> AsyncIterator[dict]:
    from arq import create_pool
    from arq.connections import RedisSettings

    from workers.settings import shutdown, startup

    settings = tus_server.settings
    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name)
    ctx = {"settings": settings, "redis": redis}
    await startup(ctx)
    yield ctx
    await shutdown(ctx)
    await redis.aclose()


async def test_reclaim_and_orphan_sweep_know_partial_data(tus_server, worker_ctx, storage, http, auth, user_id):
    from mediavault.domain import ledger
    from workers.maintenance import run_job

    md = auth(user_id)
    data = fake_jpeg(CHUNK + 1000)
    lapsing = await begin_tus(storage, md, data)
    kept = await begin_tus(storage, md, data)
    # A whole part and a tail on S3; the partial file on fs.
    for begun in (lapsing, kept):
        assert (await patch(http, begun.upload_url, 0, data[: CHUNK + 10])).status == 204
    assert await partial_objects(tus_server, lapsing.upload.upload_id)
    assert tus_server.pool is not None
    pool = tus_server.pool
    await pool.execute(
        "UPDATE uploads SET expires_at = now() - interval '1 second' WHERE upload_id = $1::uuid", lapsing.upload.upload_id
    )
    assert (await head(http, lapsing.upload_url)).status == 410
    # Its URL is signed until the expiry it was created with; a chunk after the reservation lapsed stores nothing all the same.
    assert (await patch(http, lapsing.upload_url, CHUNK + 10, data[CHUNK + 10 :])).status == 410
    received = "SELECT received_bytes FROM upload_checkpoints WHERE upload_id = $1::uuid"
    assert await pool.fetchval(received, lapsing.upload.upload_id) == CHUNK + 10

    report = await run_job(worker_ctx, "reclaim_stale_uploads")
    assert report.errors == 0
    assert await partial_objects(tus_server, lapsing.upload.upload_id) == []
    assert await multipart_uploads(tus_server, lapsing.upload.upload_id) == []
    assert await partial_objects(tus_server, kept.upload.upload_id)
    assert await ledger.audit(pool) == []

    # A partial object left behind by an upload that ended is an orphan; a pending upload's is not.
    stray = f"partial/{uuid.UUID(lapsing.upload.upload_id).hex[:2]}/{uuid.UUID(lapsing.upload.upload_id).hex}-9"
    assert tus_server.blobs is not None
    await tus_server.blobs.write(stray, single_chunk(b"late tail"), content_type="application/octet-stream")
    from mediavault.domain import cleanup

    owned = await cleanup.owned_keys(pool, [stray, *await partial_objects(tus_server, kept.upload.upload_id)])
    assert stray not in owned
    assert owned == set(await partial_objects(tus_server, kept.upload.upload_id))


async def test_a_termination_landing_while_a_patch_is_stored_answers_that_patch_gone(tus_server, storage, http, auth, user_id):
    # On S3 the termination aborts the multipart upload under the writer, whose next part then
    # failed: the PATCH was answered 503, which tus clients retry (and then, told 410 by HEAD,
    # start the upload anew), where on fs it was 410.
    md = auth(user_id)
    data = fake_jpeg(12 * MiB)
    begun = await begin_tus(storage, md, data)
    upload_id = uuid.UUID(begun.upload.upload_id)
    reader, writer = await open_patch(tus_server, begun.upload_url, 0, len(data))
    try:
        writer.write(data[: 9 * MiB])
        await writer.drain()
        assert tus_server.pool is not None
        checkpointed = "SELECT received_bytes FROM upload_checkpoints WHERE upload_id = $1"
        while await tus_server.pool.fetchval(checkpointed, upload_id) != CHUNK:
            await asyncio.sleep(0.02)
        async with http.delete(begun.upload_url, headers=TUS) as response:
            assert response.status == 204
        writer.write(data[9 * MiB :])
        await writer.drain()
        status, _ = await response_head(reader)
    finally:
        writer.close()
    assert status == 410
    assert (await head(http, begun.upload_url)).status == 410
    assert (await summary(storage, md)).reserved_bytes == 0
    assert await partial_objects(tus_server, begun.upload.upload_id) == []
    assert await multipart_uploads(tus_server, begun.upload.upload_id) == []


async def test_cors_for_the_configured_origins_only(make_settings, http):
    async with running(make_settings(tus_cors_origins=("https://app.example",))) as server:
        base = f"http://127.0.0.1:{server.http_port}/tus/"
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "PATCH"}
        async with http.options(base, headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
            assert "Upload-Offset" in response.headers["Access-Control-Allow-Headers"]
            assert "Upload-Offset" in response.headers["Access-Control-Expose-Headers"]
            assert "Upload-Metadata" in response.headers["Access-Control-Expose-Headers"]
        async with http.options(base, headers={**preflight, "Origin": "https://evil.example"}) as response:
            assert "Access-Control-Allow-Origin" not in response.headers
        async with http.post(base, headers={**TUS, "Origin": "https://app.example"}) as response:
            assert response.status == 401
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Location" in response.headers["Access-Control-Expose-Headers"]
            # A browser's script reads only the headers CORS exposes: the id to quote is one.
            assert "X-Request-Id" in response.headers["Access-Control-Expose-Headers"].split(", ")


async def test_a_silent_patch_body_ends_and_frees_the_upload(make_settings, http, auth, user_id):
    async with (
        running(make_settings(tus_idle_timeout_seconds=0.5)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        data = fake_jpeg(100_000)
        begun = await begin_tus(storage, md, data)
        target = begun.upload_url.split(f":{server.http_port}", 1)[1]
        # A client that declares the whole body, sends part of it and then goes quiet, connection open.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        header_lines = "".join(f"{name}: {value}\r\n" for name, value in PATCH_HEADERS.items())
        writer.write(
            f"PATCH {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header_lines}Upload-Offset: 0\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:30_000]
        )
        await writer.drain()
        try:
            status_line = await asyncio.wait_for(reader.readline(), timeout=10)
            assert status_line.split()[1] == b"204"
            assert (await head(http, begun.upload_url)).headers["Upload-Offset"] == "30000"
            # The lock is free: the client goes on from where the silent request ended.
            assert (await patch(http, begun.upload_url, 30_000, data[30_000:])).status == 204
        finally:
            writer.close()
        finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
        assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
        assert await stored_sha256(server, object_key_of(begun.upload.upload_id)) == sha256_hex(data)


async def open_patch(
    server: Server, url: str, offset: int, content_length: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw PATCH whose headers are sent and whose body the caller writes, as slowly as it likes."""
    target = url.split(f":{server.http_port}", 1)[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    header_lines = "".join(f"{name}: {value}\r\n" for name, value in PATCH_HEADERS.items())
    writer.write(
        f"PATCH {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header_lines}Upload-Offset: {offset}\r\n"
        f"Content-Length: {content_length}\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def test_every_answer_of_the_listener_carries_its_request_id(tus_server, storage, http, auth, user_id):
    """As a gRPC call's x-request-id: the caller's X-Request-Id (printable ASCII, at most 64
    characters kept), else one made for the request; before, no HTTP answer carried one."""
    begun = await begin_tus(storage, auth(user_id), fake_jpeg(5000))
    url = begun.upload_url
    base = f"http://127.0.0.1:{tus_server.http_port}"
    given = {"X-Request-Id": "tus-req-1"}
    answers = [
        await head(http, url, **given),
        await patch(http, url, 0, b"x" * 10, **given),
        await head(http, url.replace("X-Signature=", "X-Signature=0"), **given),  # 403
        await head(http, url, **given, **{"Tus-Resumable": "0.2.2"}),  # 412
    ]
    async with http.get(url, headers={**TUS, **given}) as response:  # 405
        answers.append(response)
    async with http.options(f"{base}/tus/", headers=given) as response:
        answers.append(response)
    async with http.get(f"{base}/nowhere", headers=given) as response:  # 404
        answers.append(response)
    async with http.get(f"{base}/healthz", headers=given) as response:
        answers.append(response)
    assert [(r.status, r.headers.get("X-Request-Id")) for r in answers] == [
        (status, "tus-req-1") for status in (200, 204, 403, 412, 405, 204, 404, 200)
    ]
    # Refused before its body is sent (Expect: 100-continue), by no handler.
    tampered = url.replace("X-Signature=", "X-Signature=0")
    status, answered, _, writer = await asked_patch(
        tus_server, tampered, {**PATCH_HEADERS, "Upload-Offset": "10", "Content-Length": "10", **given}
    )
    writer.close()
    assert (status, answered["X-Request-Id"]) == (403, "tus-req-1")

    long = "r" * 100
    assert (await head(http, url, **{"X-Request-Id": long})).headers["X-Request-Id"] == long[:64]
    made = [(await head(http, url, **headers)).headers["X-Request-Id"] for headers in ({}, {}, {"X-Request-Id": "tab\there"})]
    assert all(len(rid) == 32 for rid in made)
    assert len(set(made)) == 3


async def test_a_log_line_written_while_a_tus_request_is_served_carries_its_request_id(make_settings, pool, auth, user_id):
    # A request refused by its owner's rate limit freezes the account, and says so, while it is
    # served: by its handler, or by the answer to Expect: 100-continue, which runs before any middleware.
    settings = make_settings(rate_limits="on", rate_limit_auto_freeze_refusals=1)
    asker = f"user-{uuid.uuid4().hex[:12]}"
    with logged_lines() as lines:
        async with (
            limit(pool, "tus/HEAD", per_hour=1, burst=50),
            limit(pool, "tus/PATCH", per_hour=1, burst=50),
            running(settings) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
            aiohttp.ClientSession() as http,
        ):
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            begun = await begin_tus(storage, auth(user_id), fake_jpeg(1000))
            assert (await head(http, begun.upload_url)).status == 200
            assert (await head(http, begun.upload_url, **{"X-Request-Id": "freezing-head"})).status == 429
            asked_url = (await begin_tus(storage, auth(asker), fake_jpeg(1000))).upload_url
            chunk = {**PATCH_HEADERS, "Upload-Offset": "0", "Content-Length": "1000"}
            for request_id, status in (("first-patch", 100), ("freezing-patch", 429)):
                answered, _, _, writer = await asked_patch(server, asked_url, {**chunk, "X-Request-Id": request_id})
                writer.close()
                assert answered == status
    frozen = {line["user_id"]: line.get("request_id") for line in lines if line["msg"] == "account frozen automatically"}
    assert frozen == {user_id: "freezing-head", asker: "freezing-patch"}


async def response_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and headers of a raw HTTP response."""
    status = int((await reader.readline()).split()[1])
    headers = {}
    while line := (await reader.readline()).strip():
        name, _, value = line.decode().partition(":")
        headers[name.strip()] = value.strip()
    return status, headers


async def asked_patch(server: Server, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
    """The first answer to a PATCH's head that asks Expect: 100-continue, its body unsent."""
    return await asked(server, "PATCH", url.split(f":{server.http_port}", 1)[1], headers)


async def asked(
    server: Server, method: str, target: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
    """The first answer to a request's head that asks Expect: 100-continue, its body unsent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    header_lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n{header_lines}\r\n".encode())
    async with asyncio.timeout(10):
        status, answered = await response_head(reader)
    return status, answered, reader, writer


async def sent_when_continued(server: Server, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
    """The answer to a request that asks Expect: 100-continue, is answered 100 Continue and then sends its body."""
    status, _, reader, writer = await asked(server, method, target, headers)
    try:
        assert status == 100
        writer.write(body)
        async with asyncio.timeout(30):
            return await response_head(reader)
    finally:
        writer.close()


async def test_a_patch_that_will_be_refused_is_answered_before_its_body_is_sent(tus_server, storage, http, auth, user_id):
    # aiohttp answered 100 Continue before any check ran, so a client that asks first sent the
    # whole chunk of a PATCH that was then refused.
    md = auth(user_id)
    data = fake_jpeg(100_000)
    begun = await begin_tus(storage, md, data)
    url = begun.upload_url
    assert (await patch(http, url, 0, data[:40_000])).status == 204
    chunk = {**PATCH_HEADERS, "Upload-Offset": "40000", "Content-Length": "60000"}
    refused = [
        (url.replace("X-Signature=", "X-Signature=0"), chunk, 403),
        (url, {**chunk, "Tus-Resumable": "0.2.2"}, 412),
        (url, {**chunk, "Content-Type": "image/jpeg"}, 415),
        (url, {**chunk, "Upload-Offset": "0"}, 409),
        (url, {**chunk, "Content-Length": "60001"}, 413),
    ]
    for target, headers, expected in refused:
        status, answered, _, writer = await asked_patch(tus_server, target, headers)
        writer.close()
        assert status == expected, headers
        assert answered["Connection"] == "close", "a next request on it would be read as the body held back"
    target = url.split(f":{tus_server.http_port}", 1)[1]
    assert (await sent_when_continued(tus_server, "PATCH", target, chunk, data[40_000:]))[0] == 204
    assert (await head(http, url)).headers["Upload-Offset"] == "100000"
    await storage.FailUpload(pb.FailUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
    status, _, _, writer = await asked_patch(tus_server, url, {**chunk, "Upload-Offset": "100000", "Content-Length": "0"})
    writer.close()
    assert status == 410


async def test_a_creation_that_will_be_refused_is_answered_before_its_body_is_sent(make_settings, pool, auth, user_id, authenticator):
    """A creation whose body is its first chunk, asking Expect: 100-continue, is made before 100
    Continue: one the creation refuses, by its headers or by the owner's quota, is answered that
    refusal before a byte of the chunk is sent. aiohttp answered 100 Continue to every creation."""
    async with (
        running(make_settings(free_quota_bytes=150_000)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        data = fake_jpeg(100_000)
        chunk = {**creation_headers(authenticator, user_id, len(data)), "Content-Length": str(len(data))}
        refused = [
            ({**chunk, "Tus-Resumable": "0.2.2"}, 412),
            ({name: value for name, value in chunk.items() if name != "Authorization"}, 401),
            ({**chunk, "Content-Type": "image/jpeg"}, 415),
            ({**chunk, "Content-Length": str(len(data) + 1)}, 413),
            # Past the account's free storage.
            ({**chunk, "Upload-Length": "200000"}, 413),
        ]
        for headers, expected in refused:
            status, answered, _, writer = await asked(server, "POST", "/tus/", headers)
            writer.close()
            assert (status, answered.get("Location")) == (expected, None), headers
            assert answered["Connection"] == "close", "a next request on it would be read as the body held back"
        assert await pool.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", user_id) == 0

        status, answered = await sent_when_continued(server, "POST", "/tus/", chunk, data)
        assert (status, answered["Upload-Offset"]) == (201, str(len(data)))
        assert await pool.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", user_id) == 1
        assert (await summary(storage, auth(user_id))).reserved_bytes == len(data)


async def test_a_creation_whose_client_leaves_before_100_continue_is_released_unlogged_and_not_a_500(
    make_settings, pool, auth, user_id, authenticator
):
    """A creation asking Expect: 100-continue is made before its 100 Continue: a client gone by then
    (its connection closed, or reset as a lost link is) never learns the upload's Location, so the
    upload is released, as a creation whose body is cut off is, and answered as one (400). Writing
    the 100 Continue to the closed connection failed: the upload stayed reserved until it expired,
    and the request was logged "http request failed" at error and counted a 500."""
    data = fake_jpeg(100_000)
    header_lines = "".join(f"{name}: {value}\r\n" for name, value in creation_headers(authenticator, user_id, len(data)).items())
    request_head = f"POST /tus/ HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n{header_lines}Content-Length: {len(data)}\r\n\r\n"
    states = "SELECT state, failure_reason FROM uploads WHERE user_id = $1"
    with logged_lines() as lines:
        async with (
            running(make_settings(metrics_addr="127.0.0.1:0")) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        ):
            assert server.metrics is not None
            before = await http_answers_counted(server.metrics.port, "/tus/", "POST")
            for leaving in ("close", "reset"):
                _, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
                writer.write(request_head.encode())
                await writer.drain()
                if leaving == "reset":
                    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                else:
                    writer.close()
            counted = await http_answers_counted_since(server.metrics.port, "/tus/", "POST", before, 2)
            assert counted == {"400": 2.0}
            assert [tuple(row) for row in await pool.fetch(states, user_id)] == [("failed", "CLIENT_FAILED")] * 2
            after_summary = await summary(storage_pb2_grpc.StorageServiceStub(channel), auth(user_id))
            assert (after_summary.used_bytes, after_summary.reserved_bytes, after_summary.pending_uploads) == (0, 0, 0)
    assert [(line["logger"], line["msg"]) for line in lines] == []


async def test_a_creation_that_asks_first_spends_the_begin_upload_budget_once(make_settings, pool, http, user_id, authenticator):
    # The creation is made before 100 Continue, and the POST goes on with it: one BeginUpload.
    settings = make_settings(rate_limits="on", rate_limit_reload_seconds=0.2)
    async with limit(pool, BEGIN, per_hour=2, burst=10), running(settings) as server:
        data = fake_jpeg(1000)
        chunk = {**creation_headers(authenticator, user_id, len(data)), "Content-Length": str(len(data))}
        status, answered = await sent_when_continued(server, "POST", "/tus/", chunk, data)
        assert (status, answered["Upload-Offset"], answered["ratelimit-remaining"]) == (201, "1000", "1")
        async with http.post(f"http://127.0.0.1:{server.http_port}/tus/", data=data, headers=chunk) as response:
            assert (response.status, response.headers["RateLimit-Remaining"]) == (201, "0")


async def leased(server: Server, upload_id: str) -> None:
    """Returns once a writer holds the upload's lease: it has its writer slot."""
    assert server.pool is not None
    query = "SELECT writer IS NOT NULL FROM upload_progress WHERE upload_id = $1"
    while not await server.pool.fetchval(query, uuid.UUID(upload_id)):
        await asyncio.sleep(0.02)


async def test_a_silent_upload_content_stream_ends_within_the_idle_timeout_and_keeps_what_came(make_settings, auth, user_id):
    """The tus PATCH's rule holds for a TUS upload's UploadContent: a stream that goes silent
    without closing no longer holds its writer slot until the client's deadline, if any."""
    idle = 2.0
    async with (
        running(make_settings(tus_idle_timeout_seconds=idle)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        data = fake_jpeg(300_000)
        begun = await begin_tus(storage, md, data)
        silent = asyncio.Event()

        async def then_silent() -> AsyncIterator[pb.UploadContentRequest]:
            yield pb.UploadContentRequest(upload_id=begun.upload.upload_id)
            yield pb.UploadContentRequest(chunk=data[:100_000])
            await silent.wait()

        started = time.monotonic()
        call = storage.UploadContent(then_silent(), metadata=md)
        try:
            answered = await asyncio.wait_for(call, timeout=idle + 5)
        finally:
            silent.set()
        assert time.monotonic() - started < idle + 5
        assert answered.upload.state == pb.UPLOAD_STATE_PENDING
        assert answered.upload.received_bytes == 100_000
        rest = storage.UploadContent(content_stream(begun.upload.upload_id, data, 100_000, len(data), offset=Int64Value(value=100_000)), metadata=md)
        done = await rest
        assert done.upload.state == pb.UPLOAD_STATE_FINALIZED


async def test_a_trickling_patch_body_ends_within_the_idle_timeout_and_frees_its_writer_slot(make_settings, http, auth, user_id):
    """Bodies that send a byte every 0.6 s are never silent for the idle timeout, but bring far less
    than the minimum progress: each ends within about the idle timeout with what arrived kept,
    and their writer slots (2, with DB_POOL_MAX_SIZE 4) go to another user's PATCH waiting for one."""
    idle = 2.0
    async with (
        running(make_settings(db_pool_max_size=4, tus_idle_timeout_seconds=idle)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        data = fake_jpeg(100_000)
        trickled = [await begin_tus(storage, md, data) for _ in range(2)]
        other_data = fake_jpeg(1000)
        other = await begin_tus(storage, auth(f"{user_id}-other"), other_data)

        sent = [0, 0]

        async def trickle(i: int, writer: asyncio.StreamWriter) -> None:
            while True:
                writer.write(data[sent[i] : sent[i] + 1])
                await writer.drain()
                sent[i] += 1
                await asyncio.sleep(0.6)

        connections = [await open_patch(server, begun.upload_url, 0, len(data)) for begun in trickled]
        tricklers = [asyncio.create_task(trickle(i, writer)) for i, (_, writer) in enumerate(connections)]
        try:
            for begun in trickled:
                await leased(server, begun.upload.upload_id)
            waiting = asyncio.create_task(patch(http, other.upload_url, 0, other_data))
            answers = [await asyncio.wait_for(response_head(reader), timeout=idle + 3) for reader, _ in connections]
        finally:
            for trickler in tricklers:
                trickler.cancel()
            await asyncio.gather(*tricklers, return_exceptions=True)
            for _, writer in connections:
                writer.close()
        for begun, (status, headers), count in zip(trickled, answers, sent, strict=True):
            assert status == 204
            kept = int(headers["Upload-Offset"])
            # What arrived: the bytes sent until the answer, but one perhaps still on its way.
            assert max(1, count - 1) <= kept <= count
            assert (await head(http, begun.upload_url)).headers["Upload-Offset"] == str(kept)
        assert (await asyncio.wait_for(waiting, timeout=5)).status == 204

        # The bytes kept are the body's first ones: the upload goes on from them to the right object.
        begun, kept = trickled[0], int(answers[0][1]["Upload-Offset"])
        assert (await patch(http, begun.upload_url, kept, data[kept:])).status == 204
        finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=begun.upload.upload_id), metadata=md)
        assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
        assert await stored_sha256(server, object_key_of(begun.upload.upload_id)) == sha256_hex(data)


async def every_writer_held(server: Server, storage, http, md, piece: int) -> list[asyncio.Task]:
    """PATCHes of slow but valid bodies (a piece every 0.5 s) holding the server's two writer
    slots, once both hold their leases; each answers 204 when its body ends."""
    data = fake_jpeg(12 * piece)
    holding = [await begin_tus(storage, md, data) for _ in range(2)]

    async def slow_body():
        for start in range(0, len(data), piece):
            yield data[start : start + piece]
            await asyncio.sleep(0.5)

    holders = [asyncio.create_task(patch(http, begun.upload_url, 0, slow_body())) for begun in holding]
    for begun in holding:
        await leased(server, begun.upload.upload_id)
    return holders


async def test_with_every_writer_slot_held_a_chunk_is_refused_as_busy_and_stores_nothing(
    make_settings, http, auth, user_id, monkeypatch
):
    """Slow but valid bodies (64 KiB every 0.5 s) hold both writer slots: a further PATCH is answered
    503 with Retry-After once the bounded wait for a slot is over, and UploadContent UNAVAILABLE
    SERVER_BUSY with RetryInfo; neither takes a lease or stores a byte, and a retry once the
    slots are free is taken."""
    monkeypatch.setattr(resumable, "WRITER_SLOT_WAIT_SECONDS", 1.0)
    piece = 64 * 1024
    async with (
        running(make_settings(db_pool_max_size=4, tus_idle_timeout_seconds=2.0)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        assert server.pool is not None
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        other_md = auth(f"{user_id}-other")
        other_data = fake_jpeg(1000)
        other = await begin_tus(storage, other_md, other_data)
        holders = await every_writer_held(server, storage, http, auth(user_id), piece)

        started = asyncio.get_running_loop().time()
        refused = await patch(http, other.upload_url, 0, other_data)
        waited = asyncio.get_running_loop().time() - started
        assert refused.status == 503
        assert refused.headers["Retry-After"] == str(resumable.WRITERS_BUSY_RETRY_AFTER_SECONDS)
        assert 1.0 <= waited < 3.0

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await storage.UploadContent(content_stream(other.upload.upload_id, other_data, 0, len(other_data)), metadata=other_md)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "SERVER_BUSY"
        assert any(detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in rich_status(caught.value).details)

        # Refused before its lease: no writer was named, no byte stored.
        progress = await server.pool.fetchrow(
            "SELECT p.writer, c.received_bytes FROM upload_progress p LEFT JOIN upload_checkpoints c USING (upload_id)"
            " WHERE p.upload_id = $1",
            uuid.UUID(other.upload.upload_id),
        )
        assert (progress["writer"], progress["received_bytes"]) == (None, None)
        assert (await head(http, other.upload_url)).headers["Upload-Offset"] == "0"
        assert await partial_objects(server, other.upload.upload_id) == []

        for holder in holders:
            assert (await holder).status == 204, "slow bodies that make progress are not cut"
        done = await patch(http, other.upload_url, 0, other_data)
        assert (done.status, done.headers["Upload-Offset"]) == (204, "1000")


async def test_a_creation_whose_chunk_finds_every_writer_busy_is_answered_201_at_its_offset(make_settings, http, auth, user_id, authenticator, monkeypatch):
    """With both writer slots held, a creation's first chunk meets WritersBusy: the creation is answered
    201 with Location and Upload-Offset 0, not 503, which tus-js-client would retry by creating
    another upload, leaving this one reserved; the PATCH that goes on from there is taken."""
    monkeypatch.setattr(resumable, "WRITER_SLOT_WAIT_SECONDS", 1.0)
    piece = 64 * 1024
    async with (
        running(make_settings(db_pool_max_size=4, tus_idle_timeout_seconds=2.0)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        holders = await every_writer_held(server, storage, http, md, piece)
        first = fake_jpeg(50_000, fill=b"\x66")
        base = f"http://127.0.0.1:{server.http_port}/tus/"
        async with http.post(base, data=first, headers=creation_headers(authenticator, user_id, len(first))) as response:
            assert (response.status, response.headers["Upload-Offset"]) == (201, "0")
            location = response.headers["Location"]
        for holder in holders:
            assert (await holder).status == 204
        assert (await patch(http, location, 0, first)).status == 204
        upload_id = location.split("/tus/")[1].split("?")[0]
        finalized = await storage.FinalizeUpload(pb.FinalizeUploadRequest(upload_id=upload_id), metadata=md)
        assert finalized.upload.state == pb.UPLOAD_STATE_FINALIZED
        assert await stored_sha256(server, object_key_of(upload_id)) == sha256_hex(first)


async def test_tus_max_size_is_advertised_and_enforced(make_settings, http, auth, user_id, authenticator):
    limit = 3 * MiB
    async with (
        running(make_settings(tus_max_size_bytes=limit)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        base = f"http://127.0.0.1:{server.http_port}/tus/"
        async with http.options(base) as response:
            assert int(response.headers["Tus-Max-Size"]) == limit
        before = await summary(storage, md)

        bearer = {"Authorization": f"Bearer {authenticator.issue(user_id, ['user'])}"}
        too_long = {**TUS, **bearer, "Upload-Length": str(limit + 1), "Upload-Metadata": A_JPEG}
        async with http.post(base, headers=too_long) as response:
            assert response.status == 413
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await begin_tus(storage, md, fake_jpeg(limit + 1))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in bad_request(caught.value).field_violations] == ["size_bytes"]
        assert await summary(storage, md) == before

        # The limit is tus's alone: the same size still goes up as a single PUT.
        single = await storage.BeginUpload(
            pb.BeginUploadRequest(filename="big.jpg", content_type="image/jpeg", size_bytes=limit + 1), metadata=md
        )
        assert single.upload.state == pb.UPLOAD_STATE_PENDING
        async with http.post(base, headers={**too_long, "Upload-Length": str(limit)}) as response:
            assert response.status == 201
        assert (await summary(storage, md)).reserved_bytes == before.reserved_bytes + 2 * limit + 1


async def test_creation_spends_the_begin_upload_rate_limit_and_a_refusal_reserves_nothing(make_settings, pool, http, auth, user_id, authenticator):
    settings = make_settings(rate_limits="on", rate_limit_reload_seconds=0.2, trusted_proxies=("127.0.0.1/32",))
    async with (
        limit(pool, BEGIN, per_hour=2, burst=10),
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        base = f"http://127.0.0.1:{server.http_port}/tus/"
        create = {**TUS, "Authorization": f"Bearer {authenticator.issue(user_id, ['user'])}", "Upload-Length": "1000", "Upload-Metadata": A_JPEG}

        await begin_tus(storage, md, fake_jpeg(1000))
        async with http.post(base, headers=create) as response:
            assert response.status == 201
            assert response.headers["RateLimit-Limit"] == "2"
            assert response.headers["RateLimit-Remaining"] == "0"
        before = await summary(storage, md)
        async with http.post(base, headers=create) as response:
            assert response.status == 429, await response.text()
            assert int(response.headers["Retry-After"]) > 0
            assert "Location" not in response.headers
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await begin_tus(storage, md, fake_jpeg(1000))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, "one budget, whichever way the upload begins"
        assert await summary(storage, md) == before
        # Anonymous creations are limited per client address (X-Forwarded-For from a trusted
        # proxy), like anonymous calls; an address of its own, as a shared Redis remembers limits.
        client = str(ipaddress.IPv6Address(random.getrandbits(128)))
        async with limit(pool, BEGIN, per_hour=1, burst=10, scope="anonymous"):
            await asyncio.sleep(0.5)
            statuses = []
            for _ in range(2):
                async with http.post(base, headers={**TUS, "Upload-Length": "1000", "X-Forwarded-For": client}) as response:
                    statuses.append(response.status)
            assert statuses == [401, 429]


async def test_an_anonymous_creation_is_limited_by_every_x_forwarded_for_line(make_settings, pool, http):
    # A proxy may add its hop as a line of its own below the client's (HAProxy's option forwardfor)
    # rather than extend the client's line: the lines are one list, in order (RFC 9110 5.3). Only
    # the first was read, the client's own text, so each creation could name an address of its own.
    settings = make_settings(rate_limits="on", trusted_proxies=("127.0.0.1/32",))
    client, *spoofed = (str(ipaddress.IPv6Address(random.getrandbits(128))) for _ in range(3))
    async with limit(pool, BEGIN, per_hour=1, burst=10, scope="anonymous"), running(settings) as server:
        statuses = []
        for written in spoofed:
            headers = [*TUS.items(), ("Upload-Length", "1000"), ("X-Forwarded-For", written), ("X-Forwarded-For", client)]
            async with http.post(f"http://127.0.0.1:{server.http_port}/tus/", headers=headers) as response:
                statuses.append(response.status)
    assert statuses == [401, 429]


async def test_a_trusted_proxy_is_recognised_on_a_dual_stack_listener(make_settings, pool, http):
    # On [::]:port the listener sees an IPv4 proxy as ::ffff:127.0.0.1, which 127.0.0.1/32 did not
    # match: its X-Forwarded-For was ignored and every client behind it shared one anonymous budget.
    settings = make_settings(rate_limits="on", trusted_proxies=("127.0.0.1/32",), http_addr="[::]:0")
    first, second = (str(ipaddress.IPv6Address(random.getrandbits(128))) for _ in range(2))
    async with limit(pool, BEGIN, per_hour=1, burst=10, scope="anonymous"), running(settings) as server:
        statuses = []
        for client in (first, second):
            headers = {**TUS, "Upload-Length": "1000", "X-Forwarded-For": client}
            async with http.post(f"http://127.0.0.1:{server.http_port}/tus/", headers=headers) as response:
                statuses.append(response.status)
    assert statuses == [401, 401], "each client behind the proxy has its own budget"


async def test_requests_on_an_upload_url_spend_its_owners_budget_before_touching_the_database(make_settings, pool, http, auth, user_id):
    # HEAD, PATCH and DELETE on an upload URL were not limited at all, while each costs PostgreSQL
    # statements: whoever held one URL could keep the pool busy with a loop of HEADs.
    settings = make_settings(rate_limits="on", rate_limit_reload_seconds=0.2)
    data = fake_jpeg(1000)
    async with (
        limit(pool, "tus/HEAD", per_hour=2, burst=10),
        limit(pool, "tus/PATCH", per_hour=1, burst=10),
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        first, second = [await begin_tus(storage, md, data) for _ in range(2)]
        statuses = [(await head(http, first.upload_url)).status for _ in range(2)]
        refused = await head(http, second.upload_url)
        assert statuses + [refused.status] == [200, 200, 429], "one budget: the owner's, whichever of its URLs"
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.headers["RateLimit-Limit"] == "2"
        assert "Upload-Offset" not in refused.headers
        assert (await head(http, first.upload_url, **{"X-HTTP-Method-Override": "HEAD"})).status == 429

        # A PATCH (or a POST standing for one) past its budget stores nothing.
        assert (await patch(http, first.upload_url, 0, data[:100])).status == 204
        async with http.post(first.upload_url, data=data[100:], headers={**PATCH_HEADERS, "Upload-Offset": "100", "X-HTTP-Method-Override": "PATCH"}) as response:
            assert response.status == 429, await response.text()
            assert int(response.headers["Retry-After"]) > 0
        assert await received(storage, md, first.upload.upload_id) == (pb.UPLOAD_STATE_PENDING, 100)
        # Another user's URLs are not spent by this one's requests; OPTIONS is never limited.
        other = await begin_tus(storage, auth(user_id + "-other"), data)
        assert (await head(http, other.upload_url)).status == 200
        async with http.options(first.upload_url) as response:
            assert response.status == 204


async def test_a_patch_that_asks_first_spends_the_patch_budget_once_before_its_check_reads_the_upload(make_settings, pool, http, auth, user_id):
    # The answer to Expect: 100-continue reads the upload (its state, its offset): it is limited as
    # the PATCH is, or a loop of asking PATCHes would reach the database past every budget; and it
    # and the PATCH that follows are one request of the client's, which spends the budget once.
    settings = make_settings(rate_limits="on", rate_limit_reload_seconds=0.2)
    data = fake_jpeg(1000)
    async with (
        limit(pool, "tus/PATCH", per_hour=2, burst=10),
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        begun = await begin_tus(storage_pb2_grpc.StorageServiceStub(channel), auth(user_id), data)
        chunk = {**PATCH_HEADERS, "Upload-Offset": "0", "Content-Length": "400"}
        target = begun.upload_url.split(f":{server.http_port}", 1)[1]
        assert (await sent_when_continued(server, "PATCH", target, chunk, data[:400]))[0] == 204
        assert (await patch(http, begun.upload_url, 400, data[400:900])).status == 204
        status, _, _, writer = await asked_patch(server, begun.upload_url, {**chunk, "Upload-Offset": "900", "Content-Length": "100"})
        writer.close()
        assert status == 429


async def test_an_upload_url_signed_before_urls_named_their_owner_spends_its_callers_address_budget(make_settings, pool, http, auth, user_id):
    # URLs handed out before this release stay valid until their reservations expire; they name
    # no owner, so their requests are limited as calls without a token are: per client address.
    settings = make_settings(rate_limits="on", trusted_proxies=("127.0.0.1/32",))
    client = str(ipaddress.IPv6Address(random.getrandbits(128)))
    async with (
        limit(pool, "tus/HEAD", per_hour=1, burst=10, scope="anonymous"),
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        begun = await begin_tus(storage_pb2_grpc.StorageServiceStub(channel), auth(user_id), fake_jpeg(1000))
        signer = UrlSigner(settings.url_signing_key, f"http://127.0.0.1:{server.http_port}")
        expires = yarl.URL(begun.upload_url).query["X-Expires"]
        older = signer.sign_until("TUS", begun.upload.upload_id, expires=int(expires), route="tus")
        statuses = [(await head(http, older, **{"X-Forwarded-For": client})).status for _ in range(2)]
        assert statuses == [200, 429]
        assert (await head(http, begun.upload_url, **{"X-Forwarded-For": client})).status == 200, "its owner's budget"


async def raw_exchange(server: Server, request: bytes) -> tuple[int, bytes]:
    """Sends request as raw bytes (headers an HTTP client library would not send) and returns the status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    try:
        writer.write(request)
        await writer.drain()
        status, headers = await response_head(reader)
        body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    finally:
        writer.close()
    return status, body


async def test_header_bytes_that_are_not_utf8_are_refused_as_bad_requests_not_500(make_settings, auth, user_id, authenticator):
    # The listener takes header bytes that are not UTF-8 as they came (surrogate escapes): stored
    # (an Upload-Metadata key), echoed (a method override) or verified (a bearer token), they
    # were a UnicodeEncodeError, a 500 which tus clients retry for ever.
    async with (
        running(make_settings()) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        md = auth(user_id)
        begun = await begin_tus(storage, md, fake_jpeg(1000))
        before = await summary(storage, md)
        bearer = f"Authorization: Bearer {authenticator.issue(user_id, ['user'])}\r\n".encode()
        creation = b"POST /tus/ HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Length: 1000\r\nContent-Length: 0\r\n"
        metadata = f"Upload-Metadata: {A_JPEG},note\xff {base64.b64encode(b'x').decode()}\r\n".encode("latin-1")
        status, body = await raw_exchange(server, creation + bearer + metadata + b"\r\n")
        assert status == 400, body
        status, body = await raw_exchange(server, creation + b"Authorization: Bearer \xff\xfe\r\n\r\n")
        assert status == 401, body
        target = begun.upload_url.split(f":{server.http_port}", 1)[1].encode()
        override = b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nX-HTTP-Method-Override: G\xffT\r\nContent-Length: 0\r\n\r\n"
        status, body = await raw_exchange(server, override)
        assert status == 405, body
        status, body = await raw_exchange(server, creation + bearer + b"X-HTTP-Method-Override: G\xffT\r\n\r\n")
        assert status == 405, body
        assert await summary(storage, md) == before
