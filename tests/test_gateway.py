"""The mobile BFF's path: the real grpc-gateway binary (gateway/) in front of a real server and worker, over HTTP/JSON."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from http.client import HTTPConnection, HTTPMessage
from pathlib import Path
from typing import IO

import aiohttp
import grpc
import pytest
from google.api import annotations_pb2
from PIL import Image

from mediavault.domain.uploads import resumable
from mediavault.media.v1 import media_pb2
from mediavault.storage.v1 import storage_pb2, storage_pb2_grpc
from tests.conftest import CORPUS, running
from tests.helpers import fake_jpeg, sha256_hex, until_waiting_for_lock
from tests.test_ratelimit import free_port, limit
from tests.test_tracing import otlp_receiver
from tests.test_tus import begin_tus, every_writer_held
from tests.test_tus_clients import node_modules, node_upload

__all__ = ["node_modules", "otlp_receiver"]  # fixtures of other modules' tests used here

GATEWAY_DIR = Path(__file__).resolve().parents[1] / "gateway"
BINARY = GATEWAY_DIR / "bin" / "mediavault-gateway"


@pytest.fixture(scope="module")
def gateway_binary() -> Path:
    if not BINARY.exists():
        if shutil.which("go") is None:
            pytest.skip("Go toolchain absent: scripts/install-gateway-deps.sh installs it (.ci/run does)")
        subprocess.run([str(GATEWAY_DIR / "build.sh")], check=True)
    return BINARY


def test_the_docs_name_every_variable_the_gateway_reads():
    read = set(re.findall(r'\b(?:env|seconds)\("(MEDIAVAULT_\w+)"', (GATEWAY_DIR / "main.go").read_text()))
    assert "MEDIAVAULT_GATEWAY_ADDR" in read
    docs = GATEWAY_DIR.parent / "docs"
    configuration = (docs / "configuration.md").read_text()
    gateway_section = configuration[configuration.index("## The REST gateway") :].split("\n## ")[0]
    for doc, text in (("configuration.md", gateway_section), ("gateway.md", (docs / "gateway.md").read_text())):
        assert {name for name in read if f"`{name}`" not in text} == set(), doc


@contextlib.asynccontextmanager
async def gateway_process(binary: Path, grpc_port: int) -> AsyncIterator[str]:
    """The gateway as its own process, the way a BFF runs it next to the service; yields its base URL."""
    async with started_gateway(binary, grpc_port) as (url, _):
        yield url


@contextlib.asynccontextmanager
async def started_gateway(
    binary: Path, grpc_port: int, *, stderr: IO[bytes] | None = None, **environ: str
) -> AsyncIterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of a gateway with these environment variables besides its addresses,
    writing its log to stderr (by default the test run's)."""
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, **environ, "MEDIAVAULT_GRPC_ADDR": f"127.0.0.1:{grpc_port}", "MEDIAVAULT_GATEWAY_ADDR": address}
    process = subprocess.Popen([str(binary)], env=env, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(*address.split(":"))
                writer.close()
                break
            assert process.poll() is None, f"gateway exited with {process.returncode}"
            assert time.monotonic() < deadline, "gateway never listened"
            await asyncio.sleep(0.05)
        yield f"http://{address}", process
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
async def gateway(gateway_binary, make_settings, worker) -> AsyncIterator[str]:
    """Base URL of a gateway in front of a server with rate limits on; the session worker processes its jobs."""
    async with (
        running(make_settings(rate_limits="on", rate_limit_reload_seconds=0.2)) as server,
        gateway_process(gateway_binary, server.grpc_port) as url,
    ):
        yield url


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def bearer(authenticator):
    def headers(user_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {authenticator.issue(user_id, ['user'])}"}

    return headers


async def call(http, method: str, url: str, headers: dict | None = None, body: dict | None = None):
    """(status, JSON body, headers) of one request."""
    async with http.request(method, url, headers=headers or {}, json=body) as response:
        return response.status, await response.json(content_type=None), response.headers


def small_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 80, 40)).save(out, "JPEG")
    return out.getvalue()


def begin_body(data: bytes, **fields) -> dict:
    return {"filename": "photo.jpg", "content_type": "image/jpeg", "size_bytes": len(data), "sha256": sha256_hex(data), **fields}


async def put_bytes(http, begun: dict, data: bytes) -> None:
    assert begun["upload_method"] == "PUT"
    async with http.put(begun["upload_url"], data=data, headers=begun["upload_headers"]) as response:
        assert response.status == 200, await response.text()


def reason(body: dict) -> str:
    infos = [d for d in body["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert len(infos) == 1, body
    assert infos[0]["domain"] == "mediavault", body
    return infos[0]["reason"]


async def test_mobile_flow_upload_process_feed_delete(gateway, http, bearer, user_id):
    md = bearer(user_id)
    data = small_jpeg()

    status, begun, headers = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(data))
    assert status == 200, begun
    assert begun["upload"]["state"] == "UPLOAD_STATE_PENDING"
    assert begun["upload"]["size_bytes"] == str(len(data))
    assert 0 <= int(headers["RateLimit-Remaining"]) < int(headers["RateLimit-Limit"])
    assert int(headers["RateLimit-Reset"]) > 0
    assert "Retry-After" not in headers
    upload_id = begun["upload"]["upload_id"]

    await put_bytes(http, begun, data)
    status, done, _ = await call(http, "POST", f"{gateway}/v1/uploads/{upload_id}:finalize", md, {})
    assert status == 200, done
    assert done["upload"]["state"] == "UPLOAD_STATE_FINALIZED"
    media_id = done["media_id"]

    deadline = time.monotonic() + 60
    while True:
        status, item, _ = await call(http, "GET", f"{gateway}/v1/media/{media_id}", md)
        assert status == 200, item
        if item["media"]["processing_status"] == "PROCESSING_STATUS_COMPLETE":
            break
        assert item["media"]["processing_status"] != "PROCESSING_STATUS_FAILED", item
        assert time.monotonic() < deadline, item
        await asyncio.sleep(0.2)
    media = item["media"]
    assert (media["width"], media["height"], media["kind"]) == (96, 64, "MEDIA_KIND_IMAGE")
    assert {v["name"] for v in media["variants"]} == {"thumbnail", "preview", "display"}
    assert media["user_id"] == user_id
    assert media["feed_url"] == next(v["url"] for v in media["variants"] if v["name"] == "thumbnail")

    status, feed, headers = await call(http, "GET", f"{gateway}/v1/feed?page_size=10", md)
    assert status == 200, feed
    assert [m["media_id"] for m in feed["media"]] == [media_id]
    assert not feed["not_modified"]
    assert headers["ETag"] == f'W/"{feed["etag"]}"'
    async with http.get(f"{gateway}/v1/feed?page_size=10", headers={**md, "If-None-Match": headers["ETag"]}) as response:
        assert response.status == 304
        assert await response.read() == b""
        assert response.headers["ETag"] == headers["ETag"]
        assert "Content-Type" not in response.headers
        assert response.headers["Vary"] == "Accept, Authorization"
    status, foreign, _ = await call(http, "GET", f"{gateway}/v1/feed?user_id={user_id}", bearer("someone-else"))
    assert status == 403
    assert reason(foreign) == "FORBIDDEN"

    status, deleted, _ = await call(http, "DELETE", f"{gateway}/v1/media/{media_id}", md)
    assert (status, deleted) == (200, {})
    status, gone, _ = await call(http, "GET", f"{gateway}/v1/media/{media_id}", md)
    assert status == 404
    assert reason(gone) == "NOT_FOUND"
    status, changed, _ = await call(http, "GET", f"{gateway}/v1/feed?page_size=10", {**md, "If-None-Match": headers["ETag"]})
    assert status == 200, changed
    assert not changed["not_modified"]
    assert changed["media"] == []
    assert changed["etag"] != feed["etag"]


# A body grpc-gateway v1 reads as a form: its POST fell back to the path's other routes.
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def thumbnail_of(media: dict) -> dict:
    return next(v for v in media["variants"] if v["name"] == "thumbnail")


async def processed(http, gateway: str, md: dict, data: bytes):
    """(GetMedia's JSON, its headers) once the upload of this JPEG has been processed."""
    status, begun, _ = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(data))
    assert status == 200, begun
    await put_bytes(http, begun, data)
    status, done, _ = await call(http, "POST", f"{gateway}/v1/uploads/{begun['upload']['upload_id']}:finalize", md, {})
    assert status == 200, done
    deadline = time.monotonic() + 60
    while True:
        status, item, headers = await call(http, "GET", f"{gateway}/v1/media/{done['media_id']}", md)
        if item["media"]["processing_status"] == "PROCESSING_STATUS_COMPLETE":
            return item, headers
        assert time.monotonic() < deadline, item
        await asyncio.sleep(0.2)


async def test_accept_header_picks_the_variants_formats_and_the_feed_etag(gateway, http, bearer, user_id):
    md = bearer(user_id)
    # Its thumbnail and preview are smaller in AVIF than in JPEG, so both are kept.
    item, headers = await processed(http, gateway, md, (CORPUS / "images/formats/hopper.jpg").read_bytes())
    media_id = item["media"]["media_id"]
    assert headers["Vary"] == "Accept, Authorization"
    assert headers["Cache-Control"] == "private", "the owner's answer has its originals' URLs"
    assert item["media"]["thumbhash"], "bytes come as base64 in JSON"
    plain = {v["name"]: v for v in item["media"]["variants"]}
    assert plain["thumbnail"]["content_type"] == "image/jpeg"
    assert [a["content_type"] for a in plain["thumbnail"]["alternatives"]] == ["image/avif"]

    # JPEG is named first but with a lower q: the server orders by q.
    browser = {**md, "Accept": "application/json, image/jpeg;q=0.5, image/avif;q=0.9, */*;q=0.1"}
    status, item, _ = await call(http, "GET", f"{gateway}/v1/media/{media_id}", browser)
    assert status == 200, item
    chosen = {v["name"]: v for v in item["media"]["variants"]}
    assert chosen["thumbnail"]["content_type"] == "image/avif"
    assert [a["content_type"] for a in chosen["thumbnail"]["alternatives"]] == ["image/jpeg"]
    assert chosen["display"]["content_type"] == "image/jpeg", "the display exists in JPEG only"
    assert item["media"]["feed_url"] == chosen["thumbnail"]["url"]
    async with http.get(chosen["thumbnail"]["url"]) as response:
        assert response.headers["Content-Type"] == "image/avif"
        assert Image.open(io.BytesIO(await response.read())).format == "AVIF"

    status, jpeg_feed, jpeg_headers = await call(http, "GET", f"{gateway}/v1/feed", md)
    status, avif_feed, avif_headers = await call(http, "GET", f"{gateway}/v1/feed", browser)
    assert avif_headers["Vary"] == jpeg_headers["Vary"] == "Accept, Authorization"
    assert thumbnail_of(jpeg_feed["media"][0])["content_type"] == "image/jpeg"
    assert thumbnail_of(avif_feed["media"][0])["content_type"] == "image/avif"
    assert avif_feed["etag"] != jpeg_feed["etag"]
    # An etag of the JPEG page is not current for a client that gets AVIF.
    status, answer, _ = await call(http, "GET", f"{gateway}/v1/feed", {**browser, "If-None-Match": jpeg_headers["ETag"]})
    assert status == 200, answer
    assert answer["etag"] == avif_feed["etag"]
    # The query's accept wins over the header.
    status, item, _ = await call(http, "GET", f"{gateway}/v1/media/{media_id}?accept=image/jpeg", browser)
    assert thumbnail_of(item["media"])["content_type"] == "image/jpeg"

    # Safari names WebP first: until its WebP is made on request it gets the AVIF, then the WebP.
    safari = {**md, "Accept": "image/webp,image/avif,image/jxl,image/heic,image/*;q=0.8,*/*;q=0.5"}
    deadline = time.monotonic() + 60
    while True:
        status, item, _ = await call(http, "GET", f"{gateway}/v1/media/{media_id}", safari)
        assert status == 200, item
        thumbnail = thumbnail_of(item["media"])
        if thumbnail["content_type"] == "image/webp":
            break
        assert thumbnail["content_type"] == "image/avif"
        assert time.monotonic() < deadline, item
        await asyncio.sleep(0.1)
    assert [a["content_type"] for a in thumbnail["alternatives"]] == ["image/avif", "image/jpeg"]
    async with http.get(thumbnail["url"]) as response:
        assert response.headers["Content-Type"] == "image/webp"
        assert Image.open(io.BytesIO(await response.read())).format == "WEBP"


@pytest.mark.parametrize(
    ("accept", "chosen", "alternatives"),
    [
        # A wildcard accepts only what no more specific range refuses or ranks lower.
        ("image/*, image/jpeg;q=0, image/webp;q=0", "image/avif", ["image/jpeg"]),
        ("image/jpeg;q=0.1, image/webp;q=0, image/*", "image/avif", ["image/jpeg"]),
        ("*/*;q=0.5, image/avif;q=0", "image/jpeg", ["image/avif"]),
        # The server reads 16 entries: other types before the image ones do not push them out.
        (", ".join([*(f"application/x-type-{n}" for n in range(20)), "image/avif"]), "image/avif", ["image/jpeg"]),
        # The optional whitespace around ";" and "," may be tabs (RFC 9110 5.6.3).
        ("image/jpeg;q=0.5, image/avif;\tq=0.9", "image/avif", ["image/jpeg"]),
        ("image/jpeg;q=0.5,\timage/avif\t;q=0.9", "image/avif", ["image/jpeg"]),
        ("image/avif;q=0\t,\timage/jpeg", "image/jpeg", ["image/avif"]),
    ],
)
async def test_a_wildcard_gives_a_format_no_q_a_more_specific_range_sets(gateway, http, bearer, user_id, accept, chosen, alternatives):
    md = bearer(user_id)
    item, _ = await processed(http, gateway, md, (CORPUS / "images/formats/hopper.jpg").read_bytes())
    status, item, _ = await call(http, "GET", f"{gateway}/v1/media/{item['media']['media_id']}", {**md, "Accept": accept})
    assert status == 200, item
    thumbnail = thumbnail_of(item["media"])
    assert thumbnail["content_type"] == chosen
    assert [a["content_type"] for a in thumbnail["alternatives"]] == alternatives
    async with http.get(thumbnail["url"]) as response:
        assert response.headers["Content-Type"] == chosen
        assert Image.open(io.BytesIO(await response.read())).get_format_mimetype() == chosen


async def test_an_accept_query_value_may_list_several_ranges_as_openapi_clients_send_them(gateway, http, bearer, user_id):
    # docs/openapi declares accept a query array, which Swagger 2.0 sends comma-separated by default.
    md = bearer(user_id)
    item, _ = await processed(http, gateway, md, (CORPUS / "images/formats/hopper.jpg").read_bytes())
    query = urllib.parse.urlencode({"accept": "image/avif,image/jpeg"})
    status, item, _ = await call(http, "GET", f"{gateway}/v1/media/{item['media']['media_id']}?{query}", md)
    assert status == 200, item
    thumbnail = thumbnail_of(item["media"])
    assert thumbnail["content_type"] == "image/avif"
    assert [a["content_type"] for a in thumbnail["alternatives"]] == ["image/jpeg"]
    status, feed, _ = await call(http, "GET", f"{gateway}/v1/feed?{query}", md)
    assert status == 200, feed
    assert thumbnail_of(feed["media"][0])["content_type"] == "image/avif"


async def test_missing_token_is_401_unauthorized(gateway, http):
    status, body, _ = await call(http, "GET", f"{gateway}/v1/media/{uuid.uuid4()}")
    assert status == 401
    assert body["code"] == 16
    assert reason(body) == "UNAUTHORIZED"
    assert body["message"]


async def test_a_401_carries_the_bearer_challenge_rfc_9110_requires(gateway, http):
    status, _, headers = await call(http, "GET", f"{gateway}/v1/feed")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="mediavault"'
    status, _, headers = await call(http, "GET", f"{gateway}/v1/feed", {"Authorization": "Bearer not-a-token"})
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="mediavault", error="invalid_token"'


async def test_another_users_summary_is_403_forbidden(gateway, http, bearer, user_id):
    status, body, _ = await call(http, "GET", f"{gateway}/v1/storage/summary?user_id=someone-else", bearer(user_id))
    assert status == 403
    assert reason(body) == "FORBIDDEN"


async def test_unknown_media_is_404_not_found(gateway, http, bearer, user_id):
    status, body, _ = await call(http, "DELETE", f"{gateway}/v1/media/{uuid.uuid4()}", bearer(user_id))
    assert status == 404
    assert reason(body) == "NOT_FOUND"


async def test_reused_idempotency_key_is_409_conflict(gateway, http, bearer, user_id):
    md = bearer(user_id)
    data = fake_jpeg(2000)
    status, first, _ = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(data, idempotency_key="k1"))
    assert status == 200, first
    status, again, _ = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(data, idempotency_key="k1"))
    assert status == 200
    assert again["upload"]["upload_id"] == first["upload"]["upload_id"]
    status, body, _ = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(fake_jpeg(2001), idempotency_key="k1"))
    assert status == 409
    assert reason(body) == "IDEMPOTENCY_CONFLICT"


async def test_finalizing_a_failed_upload_is_412_upload_not_pending(gateway, http, bearer, user_id):
    md = bearer(user_id)
    status, begun, _ = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(fake_jpeg(3000)))
    assert status == 200, begun
    upload_id = begun["upload"]["upload_id"]
    status, failed, _ = await call(http, "POST", f"{gateway}/v1/uploads/{upload_id}:fail", md, {"reason": "user cancelled"})
    assert status == 200
    assert failed["upload"]["state"] == "UPLOAD_STATE_FAILED"
    status, body, _ = await call(http, "POST", f"{gateway}/v1/uploads/{upload_id}:finalize", md, {})
    assert status == 412
    assert reason(body) == "UPLOAD_NOT_PENDING"


async def test_missing_object_is_412_and_fails_the_upload(gateway, http, bearer, user_id):
    md = bearer(user_id)
    status, begun, _ = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(fake_jpeg(3000)))
    assert status == 200, begun
    upload_id = begun["upload"]["upload_id"]
    status, body, _ = await call(http, "POST", f"{gateway}/v1/uploads/{upload_id}:finalize", md, {})
    assert status == 412
    assert reason(body) == "OBJECT_MISSING"
    status, read, _ = await call(http, "GET", f"{gateway}/v1/uploads/{upload_id}", md)
    assert status == 200
    assert read["upload"]["failure_reason"] == "OBJECT_MISSING"


async def test_over_the_limit_is_429_with_ratelimit_and_retry_after_headers(gateway, http, bearer, user_id, pool):
    summary = f"{gateway}/v1/storage/summary"
    async with limit(pool, "StorageService/GetStorageSummary", per_hour=2, burst=50):
        deadline = time.monotonic() + 10
        while (await call(http, "GET", summary, bearer(f"probe-{uuid.uuid4().hex[:8]}")))[2]["RateLimit-Limit"] != "2":
            assert time.monotonic() < deadline, "the server never reloaded the limit"
            await asyncio.sleep(0.1)

        md = bearer(user_id)
        for _ in range(2):
            status, body, headers = await call(http, "GET", summary, md)
            assert status == 200
            assert body["summary"]["user_id"] == user_id
        status, body, headers = await call(http, "GET", summary, md)
    assert status == 429
    assert body["code"] == 8
    assert reason(body) == "RATE_LIMIT_EXCEEDED"
    assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == ("2", "0")
    assert len(headers.getall("Retry-After")) == 1
    assert int(headers["Retry-After"]) > 0
    assert int(headers["RateLimit-Reset"]) > 0
    retry = next(d for d in body["details"] if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
    assert retry["retry_delay"] == f'{headers["Retry-After"]}s'


async def test_a_503_whose_retry_info_says_when_carries_retry_after(
    gateway_binary, make_settings, http, auth, bearer, user_id, monkeypatch
):
    """UploadContent while slow tus bodies hold both writer slots is 503 SERVER_BUSY, whose
    RetryInfo becomes the Retry-After header the tus endpoint sends for the same refusal."""
    monkeypatch.setattr(resumable, "WRITER_SLOT_WAIT_SECONDS", 1.0)
    waiting_user = f"{user_id}-other"
    data = fake_jpeg(1000)
    async with (
        running(make_settings(db_pool_max_size=4, tus_idle_timeout_seconds=2.0)) as server,
        gateway_process(gateway_binary, server.grpc_port) as url,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        waiting = await begin_tus(storage, auth(waiting_user), data)
        holders = await every_writer_held(server, storage, http, auth(user_id), 64 * 1024)
        stream = json.dumps({"upload_id": waiting.upload.upload_id}) + json.dumps({"chunk": base64.b64encode(data).decode()})
        async with http.post(f"{url}/v1/uploads:uploadContent", data=stream, headers=bearer(waiting_user)) as response:
            status, refused, headers = response.status, await response.json(), response.headers
        for holder in holders:
            assert (await holder).status == 204
    assert status == 503, refused
    assert reason(refused) == "SERVER_BUSY"
    assert headers.getall("Retry-After") == [str(resumable.WRITERS_BUSY_RETRY_AFTER_SECONDS)]


async def test_request_id_goes_through_both_ways(gateway, http, bearer, user_id):
    status, _, headers = await call(http, "GET", f"{gateway}/v1/storage/summary", {**bearer(user_id), "X-Request-Id": "bff-123"})
    assert status == 200
    assert headers["X-Request-Id"] == "bff-123"
    status, _, headers = await call(http, "GET", f"{gateway}/v1/media/not-a-uuid", {"X-Request-Id": "bff-456"})
    assert status == 401
    assert headers["X-Request-Id"] == "bff-456"
    status, _, headers = await call(http, "GET", f"{gateway}/v1/storage/summary", bearer(user_id))
    assert status == 200, "the server makes one up when the caller sends none"
    assert len(headers["X-Request-Id"]) == 32, "the server makes one up when the caller sends none"


async def test_the_answers_the_gateway_gives_itself_carry_the_request_id(gateway, http, bearer, user_id):
    md = {**bearer(user_id), "X-Request-Id": "bff-789"}
    refusals = [
        ("GET", "/v1/nowhere", None, 404),
        ("PUT", "/v1/feed", None, 405),
        ("GET", "/v1/feed?page_token=%zz", None, 400),
        ("GET", "/v1/feed?page_size=many", None, 400),
        ("POST", "/v1/uploads", b"{not json", 400),
        ("POST", "/v1/uploads", b"x" * (8 * 1024 * 1024 + 1), 413),
    ]
    for method, path, body, expected in refusals:
        async with http.request(method, f"{gateway}{path}", headers=md, data=body) as response:
            assert response.status == expected, (method, path)
            assert response.headers.getall("X-Request-Id") == ["bff-789"], (method, path)


async def test_the_bffs_trace_context_reaches_the_server_spans(gateway_binary, make_settings, otlp_receiver, http, bearer, user_id):
    trace_id, bff_span_id = secrets.token_hex(16), secrets.token_hex(8)
    headers = {**bearer(user_id), "traceparent": f"00-{trace_id}-{bff_span_id}-01", "tracestate": "bff=1"}
    # A server of its own, started with the OTLP environment the receiver set.
    async with running(make_settings()) as server, gateway_process(gateway_binary, server.grpc_port) as url:
        status, _, _ = await call(http, "GET", f"{url}/v1/storage/summary", headers)
        assert status == 200
    # Stopping the server flushed its spans.
    spans = [span for _, span in otlp_receiver.spans if span.trace_id.hex() == trace_id]
    rpc = [s for s in spans if s.name == "mediavault.storage.v1.StorageService/GetStorageSummary"]
    assert len(rpc) == 1, [s.name for s in spans]
    assert rpc[0].parent_span_id.hex() == bff_span_id
    assert rpc[0].trace_state == "bff=1"
    assert any(s.parent_span_id == rpc[0].span_id for s in spans), "the RPC's own database spans join it"


async def test_resumable_upload_through_the_gateway_with_tus_js_client(gateway, http, bearer, user_id, node_modules, tmp_path):
    data = small_jpeg()
    source = tmp_path / "photo.jpg"
    source.write_bytes(data)
    md = bearer(user_id)
    status, begun, _ = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(data, protocol="UPLOAD_PROTOCOL_TUS"))
    assert status == 200, begun
    assert begun["upload_method"] == "PATCH"
    assert begun["upload_headers"] == {"Tus-Resumable": "1.0.0"}
    assert "/tus/" in begun["upload_url"]
    chunk = int(begun["chunk_size_bytes"])
    outcome = await node_upload(node_modules, "resume", begun["upload_url"], str(source), str(chunk))
    assert outcome.get("done"), outcome

    upload_id = begun["upload"]["upload_id"]
    status, got, _ = await call(http, "GET", f"{gateway}/v1/uploads/{upload_id}", md)
    assert status == 200, got
    assert int(got["upload"]["received_bytes"]) == len(data)
    assert got["upload"]["protocol"] == "UPLOAD_PROTOCOL_TUS"
    status, done, _ = await call(http, "POST", f"{gateway}/v1/uploads/{upload_id}:finalize", md, {})
    assert status == 200, done
    assert done["upload"]["state"] == "UPLOAD_STATE_FINALIZED"
    assert done["upload"]["sha256"] == sha256_hex(data)


def raw_get(url: str, target: str, headers: dict[str, bytes]) -> tuple[int, HTTPMessage, bytes]:
    """(status, headers, body) of a GET whose header values are sent byte for byte, which aiohttp would refuse."""
    host, port = url.removeprefix("http://").split(":")
    connection = HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("GET", target)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


async def summary_of(http, gateway: str, md: dict) -> dict:
    status, body, _ = await call(http, "GET", f"{gateway}/v1/storage/summary", md)
    assert status == 200, body
    return body["summary"]


async def test_a_body_over_8_mib_is_413_and_never_reaches_the_server(gateway, http, bearer, user_id):
    md = bearer(user_id)
    # Valid JSON the server would take: the padding is whitespace, the message it decodes to small.
    body = json.dumps(begin_body(fake_jpeg(2000))).encode() + b" " * (9 << 20)
    async with http.post(f"{gateway}/v1/uploads", headers={**md, "Content-Type": "application/json"}, data=body) as response:
        assert response.status == 413
        declared = await response.json()

    async def chunked():
        for offset in range(0, len(body), 1 << 20):
            yield body[offset : offset + (1 << 20)]

    async with http.post(f"{gateway}/v1/uploads", headers={**md, "Content-Type": "application/json"}, data=chunked()) as response:
        assert response.request_info.headers["Transfer-Encoding"] == "chunked"
        assert response.status == 413
        undeclared = await response.json()
    for refused in (declared, undeclared):
        assert refused["code"] == 3
        assert reason(refused) == "REQUEST_TOO_LARGE"
        assert refused["message"] == refused["error"] == f"the request body is larger than {8 << 20} bytes"
    assert (await summary_of(http, gateway, md))["reserved_bytes"] == "0"


async def test_only_the_headers_the_server_reads_are_forwarded(gateway, http, bearer, user_id):
    md = bearer(user_id)
    # 10 KB the server would refuse as metadata (at random past 8 KiB): none of it is forwarded.
    status, body, _ = await call(http, "GET", f"{gateway}/v1/storage/summary", {**md, "Cookie": "c=" + "x" * 6000, "User-Agent": "u" * 4000})
    assert status == 200, body
    async with http.get(f"{gateway}/v1/storage/summary", headers={**md, "Cookie": "c=" + "x" * 17000}) as response:
        assert response.status == 431, "net/http's limit"
    # What is forwarded has a budget of its own, well under the server's limit.
    status, body, _ = await call(http, "GET", f"{gateway}/v1/storage/summary", {**md, "X-Request-Id": "r" * 2500, "tracestate": "t=" + "s" * 2500})
    assert status == 431
    assert body["code"] == 3
    assert reason(body) == "HEADERS_TOO_LARGE"
    forwarded = ("Authorization", "X-Request-Id", "traceparent", "tracestate", "X-Forwarded-For", "X-Forwarded-Host", "Host")
    assert [name for name in forwarded if name.lower() not in body["message"].lower()] == [], body["message"]
    # Grpc-Metadata-* no longer reaches the server as metadata, so it cannot stand in for Authorization.
    status, body, _ = await call(http, "GET", f"{gateway}/v1/storage/summary", {"Grpc-Metadata-Authorization": md["Authorization"]})
    assert status == 401
    assert reason(body) == "UNAUTHORIZED"


async def test_a_balancers_own_x_forwarded_for_line_is_forwarded(gateway_binary, make_settings, pool, http):
    # A balancer in front of the gateway may add its hop as a line of its own below the client's
    # (HAProxy does): the lines are one list (RFC 9110 5.3). grpc-gateway forwards the first line
    # alone, the client's own text, so an anonymous caller could name a new address each call.
    settings = make_settings(rate_limits="on", trusted_proxies=("127.0.0.1/32",))
    client, *spoofed = (f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}" for _ in range(5))
    async with (
        limit(pool, "StorageService/GetStorageSummary", per_hour=3, burst=50, scope="anonymous"),
        running(settings) as server,
        gateway_process(gateway_binary, server.grpc_port) as url,
    ):
        statuses = []
        for written in spoofed:
            headers = [("X-Forwarded-For", written), ("X-Forwarded-For", client)]
            async with http.get(f"{url}/v1/storage/summary", headers=headers) as response:
                statuses.append(response.status)
    assert statuses == [401, 401, 401, 429]


async def test_bytes_that_are_not_utf8_or_ascii_are_not_a_500(gateway, bearer, user_id):
    auth = bearer(user_id)["Authorization"].encode()
    status, headers, body = await asyncio.to_thread(raw_get, gateway, "/v1/feed", {"Authorization": auth, "If-None-Match": b'"\xff\xfe"'})
    assert status == 200, body
    assert json.loads(body)["etag"]
    status, _, body = await asyncio.to_thread(raw_get, gateway, "/v1/feed", {"Authorization": auth, "Accept": b"image/avif\xff, image/webp"})
    assert status == 200, body
    status, headers, body = await asyncio.to_thread(
        raw_get, gateway, "/v1/storage/summary", {"Authorization": auth, "X-Request-Id": "bff-caf\u00e9".encode()}
    )
    assert status == 200, body
    assert len(headers["X-Request-Id"]) == 32, "dropped: the server made one up"
    status, _, body = await asyncio.to_thread(raw_get, gateway, "/v1/feed?page_token=%ff", {"Authorization": auth})
    assert status == 400, body
    assert json.loads(body)["code"] == 3
    assert reason(json.loads(body)) == "INVALID_ARGUMENT"


async def test_a_query_that_does_not_decode_is_400_not_left_out(gateway, bearer, user_id):
    # Go's URL.Query(), which grpc-gateway reads, drops a pair it cannot decode without a word:
    # the call ran without it (the first page, for a broken page_token).
    auth = bearer(user_id)["Authorization"].encode()
    for target in (
        "/v1/feed?page_token=%zz",
        "/v1/feed?page_size=1&page_token=abc%2",
        "/v1/feed?%zz=1",
        "/v1/feed?page_size=1;page_token=abc",
        f"/v1/media/{uuid.uuid4()}?accept=image/avif%g0",
    ):
        status, _, body = await asyncio.to_thread(raw_get, gateway, target, {"Authorization": auth})
        assert status == 400, (target, body)
        refused = json.loads(body)
        assert refused["code"] == 3, target
        assert reason(refused) == "INVALID_ARGUMENT", target
        assert refused["message"], target


async def test_what_grpc_gateway_cannot_decode_is_400_with_an_error_info(gateway, http, bearer, user_id):
    md = {**bearer(user_id), "Content-Type": "application/json"}
    for body in (b'{"size_bytes": ', b'{"size_bytes": "many"}', b"[]"):
        async with http.post(f"{gateway}/v1/uploads", headers=md, data=body) as response:
            assert response.status == 400
            refused = await response.json()
        assert refused["code"] == 3
        assert reason(refused) == "INVALID_ARGUMENT", refused
        assert refused["message"]
    status, body, _ = await call(http, "GET", f"{gateway}/v1/feed?page_size=ten", md)
    assert status == 400
    assert reason(body) == "INVALID_ARGUMENT", body
    assert (await summary_of(http, gateway, bearer(user_id)))["reserved_bytes"] == "0"


async def test_a_route_that_does_not_exist_is_answered_in_json_with_an_error_info(gateway, http, bearer, user_id):
    md = bearer(user_id)
    media = f"/v1/media/{uuid.uuid4()}"
    for method, path, status, code, why, allow in (
        ("GET", "/v1/nothing", 404, 5, "NOT_FOUND", None),
        ("DELETE", "/v1/feed", 405, 12, "METHOD_NOT_ALLOWED", "GET, HEAD"),
        ("PATCH", "/v1/uploads", 405, 12, "METHOD_NOT_ALLOWED", "POST"),
        ("PUT", media, 405, 12, "METHOD_NOT_ALLOWED", "DELETE, GET, HEAD"),
        ("GET", "/v1/uploads:uploadContent", 405, 12, "METHOD_NOT_ALLOWED", "POST"),
        ("OPTIONS", "/v1/storage/summary", 405, 12, "METHOD_NOT_ALLOWED", "GET, HEAD"),
    ):
        async with http.request(method, f"{gateway}{path}", headers=md) as response:
            assert response.status == status, (method, path)
            assert response.headers["Content-Type"] == "application/json"
            # RFC 9110 15.5.6: a 405 names the methods the target takes.
            assert response.headers.get("Allow") == allow, (method, path)
            refused = await response.json()
        assert refused["code"] == code
        assert reason(refused) == why
        assert path in refused["message"]


async def test_head_on_a_get_route_is_answered_as_the_get_without_its_body(gateway, http, bearer, user_id):
    # RFC 9110 9.3.2; grpc-gateway routes only the methods of the protos' annotations.
    md = bearer(user_id)
    item, _ = await processed(http, gateway, md, small_jpeg())
    for path, headers in (
        ("/v1/feed", md),
        ("/v1/feed", {**md, "Accept": "image/avif"}),
        (f"/v1/media/{item['media']['media_id']}", md),
        ("/v1/storage/summary", md),
        (f"/v1/media/{uuid.uuid4()}", md),
        ("/v1/storage/summary", {}),
    ):
        async with http.get(f"{gateway}{path}", headers=headers) as got:
            assert await got.read()
        async with http.head(f"{gateway}{path}", headers=headers) as head:
            assert await head.read() == b""
        assert head.status == got.status, path
        for name in ("Content-Type", "ETag", "Vary", "Cache-Control", "WWW-Authenticate", "RateLimit-Limit"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)
        assert head.headers["X-Request-Id"], path
    status, _, headers = await call(http, "GET", f"{gateway}/v1/feed", md)
    assert status == 200
    async with http.head(f"{gateway}/v1/feed", headers={**md, "If-None-Match": headers["ETag"]}) as head:
        assert head.status == 304
        assert head.headers["ETag"] == headers["ETag"]
    # No GET route there: HEAD is refused as any other method, with the methods the path takes.
    async with http.head(f"{gateway}/v1/uploads", headers=md) as head:
        assert head.status == 405
        assert head.headers["Allow"] == "POST"
        assert await head.read() == b""


def annotated_routes() -> list[tuple[str, str]]:
    """(HTTP method, path template) of every google.api.http binding of the services, additional
    bindings too, as the protos' Python descriptors read them: not through the gateway's Go code."""
    routes = []
    for module in (storage_pb2, media_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rule = method.GetOptions().Extensions[annotations_pb2.http]
                for binding in (rule, *rule.additional_bindings):
                    kind = binding.WhichOneof("pattern")
                    if kind == "custom":
                        routes.append((binding.custom.kind, binding.custom.path))
                    elif kind is not None:
                        routes.append((kind.upper(), getattr(binding, kind)))
    return routes


# The values sample_path gives a template's variables, and what matches them. No colon: the mux
# reads a verb after the last one.
VARIABLE_VALUES = {"{*}": "a1", "{**}": "a1/b2"}
VARIABLE_MATCHES = {"{*}": "[^/:]+", "{**}": "[^:]*"}


def template_parts(template: str) -> tuple[list[str], str]:
    """A path template's pieces (literal text, {*} for a segment's variable, {**} for a deep one)
    and its verb (google/api/http.proto's grammar: "/" segments [":" verb])."""
    segments, colon, verb = template.rpartition(":")
    if not colon or "/" in verb or "}" in verb:
        segments, verb = template, ""
    written = re.sub(r"\{\w+(?:=(\*\*?))?\}", lambda m: "{" + (m[1] or "*") + "}", segments)
    assert re.fullmatch(r"(/(\w+|\{\*\*?\}))+", written), f"a template this test does not read: {template}"
    return re.split(r"(\{\*\*?\})", written), verb


def sample_path(template: str) -> str:
    pieces, verb = template_parts(template)
    return "".join(VARIABLE_VALUES.get(piece, piece) for piece in pieces) + (f":{verb}" if verb else "")


def matches(template: str, path: str) -> bool:
    pieces, verb = template_parts(template)
    pattern = "".join(VARIABLE_MATCHES.get(piece) or re.escape(piece) for piece in pieces)
    return re.fullmatch(pattern + (re.escape(f":{verb}") if verb else ""), path) is not None


async def test_every_annotated_route_answers_head_and_405_with_the_methods_its_path_takes(gateway_binary, http):
    routes = annotated_routes()
    assert ("POST", "/v1/media/{media_id}:save") in routes, "a route with a custom verb and a path variable"
    assert ("POST", "/v1/accounts/{user_id=**}:freeze") in routes, "a route with a deep wildcard and a verb"
    # No server behind it: a call the mux routes answers 503 UNAVAILABLE, a method the path does
    # not take 405 without calling anything.
    async with started_gateway(gateway_binary, free_port()) as (url, _):
        for _, template in routes:
            path = sample_path(template)
            methods = {method for method, other in routes if matches(other, path)}
            allow = ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))
            refused = next(m for m in ("PATCH", "PUT", "DELETE", "POST", "GET") if m not in methods)
            async with http.request(refused, f"{url}{path}") as response:
                assert (response.status, response.headers.get("Allow")) == (405, allow), (refused, path)
                assert reason(await response.json()) == "METHOD_NOT_ALLOWED"
            async with http.head(f"{url}{path}") as head:
                assert await head.read() == b""
            if "GET" in methods:
                async with http.get(f"{url}{path}") as got:
                    assert got.status == 503, path
                assert (head.status, head.headers.get("Allow")) == (got.status, None), path
            else:
                assert (head.status, head.headers.get("Allow")) == (405, allow), path
            if "POST" not in methods:
                async with http.post(f"{url}{path}", data="a=1", headers={**FORM, "X-HTTP-Method-Override": "GET"}) as response:
                    assert (response.status, response.headers.get("Allow")) == (405, allow), path
            # The verb is part of the route: another one is no route at all.
            async with http.request(refused, f"{url}{path.split(':')[0]}:nothing") as response:
                assert (response.status, response.headers.get("Allow")) == (404, None), path


async def test_a_form_post_is_refused_where_no_post_route_is_whatever_method_it_names(gateway, http, bearer, user_id):
    """grpc-gateway v1 served a POST with a form body on a path without a POST route as another of
    the path's routes (one at random: GetMedia or DeleteMedia on /v1/media/{id}), and a form POST
    as the method its X-HTTP-Method-Override named: past the gateway's own handling of the method
    it read, so a user's feed came without Cache-Control: private, and a POST deleted media."""
    md = bearer(user_id)
    item, _ = await processed(http, gateway, md, small_jpeg())
    media = f"/v1/media/{item['media']['media_id']}"
    for path, allow in (("/v1/feed", "GET, HEAD"), (media, "DELETE, GET, HEAD"), ("/v1/storage/summary", "GET, HEAD")):
        for override in ({}, {"X-HTTP-Method-Override": "GET"}, {"X-HTTP-Method-Override": "DELETE"}):
            # Several times: the mux picked among the path's routes in Go's map order, at random.
            for _ in range(4):
                async with http.post(f"{gateway}{path}", data="page_size=1", headers={**md, **FORM, **override}) as response:
                    assert (response.status, response.headers.get("Allow")) == (405, allow), (path, override)
                    refused = await response.json()
                assert (refused["code"], reason(refused)) == (12, "METHOD_NOT_ALLOWED"), (path, override)
    status, kept, headers = await call(http, "GET", f"{gateway}{media}", md)
    assert (status, kept["media"]["media_id"]) == (200, item["media"]["media_id"])
    assert headers["Cache-Control"] == "private"
    # Where a POST route is, a form POST is that route's, whatever its X-HTTP-Method-Override
    # names: grpc-gateway's JSON decoding refuses its body.
    async with http.post(f"{gateway}{media}:reprocess", data="a=1", headers={**md, **FORM, "X-HTTP-Method-Override": "DELETE"}) as response:
        assert response.status == 400
        assert reason(await response.json()) == "INVALID_ARGUMENT"
    status, kept, _ = await call(http, "GET", f"{gateway}{media}", md)
    assert status == 200, kept


async def test_weak_listed_and_wildcard_etags_are_304(gateway, http, bearer, user_id):
    md = bearer(user_id)
    status, feed, headers = await call(http, "GET", f"{gateway}/v1/feed", md)
    assert status == 200, feed
    etag = headers["ETag"]
    opaque = feed["etag"]
    for if_none_match in (etag, f'"{opaque}"', f'"other", "{opaque}"', f'W/"other", {etag}', "*"):
        async with http.get(f"{gateway}/v1/feed", headers={**md, "If-None-Match": if_none_match}) as response:
            assert response.status == 304, if_none_match
            assert await response.read() == b""
            assert response.headers["ETag"] == etag
            assert response.headers["Vary"] == "Accept, Authorization"
    status, _, _ = await call(http, "GET", f"{gateway}/v1/feed", {**md, "If-None-Match": '"other", W/"another"'})
    assert status == 200


async def test_every_path_the_mux_serves_the_feed_at_is_private_and_takes_if_none_match(gateway, http, bearer, user_id):
    md = bearer(user_id)
    status, feed, headers = await call(http, "GET", f"{gateway}/v1/feed", md)
    assert status == 200, feed
    # The mux reads a verb after the last colon: /v1/feed: is ListFeed's route, its verb empty.
    for path in ("/v1/feed:", "/v1/fe%65d"):
        status, body, got = await call(http, "GET", f"{gateway}{path}", md)
        assert status == 200, (path, body)
        assert body["etag"] == feed["etag"], path
        assert (got.get("Cache-Control"), got.get("Vary"), got.get("ETag")) == ("private", "Accept, Authorization", headers["ETag"]), path
        async with http.get(f"{gateway}{path}", headers={**md, "If-None-Match": headers["ETag"]}) as response:
            assert response.status == 304, path


async def test_only_a_bare_star_is_the_if_none_match_wildcard(gateway, http, bearer, user_id):
    md = bearer(user_id)
    status, feed, _ = await call(http, "GET", f"{gateway}/v1/feed", md)
    assert status == 200, feed
    # RFC 9110 13.1.2: "*" is an entity-tag, which no page has.
    for if_none_match in ('"*"', 'W/"*"', '"other", "*"'):
        status, answer, _ = await call(http, "GET", f"{gateway}/v1/feed", {**md, "If-None-Match": if_none_match})
        assert status == 200, if_none_match
        assert answer["etag"] == feed["etag"]
    async with http.get(f"{gateway}/v1/feed", headers={**md, "If-None-Match": "*"}) as response:
        assert response.status == 304


async def test_the_feed_etag_is_weak_since_its_answers_urls_are_signed_anew(gateway, http, bearer, user_id):
    md = bearer(user_id)
    await processed(http, gateway, md, small_jpeg())
    async with http.get(f"{gateway}/v1/feed", headers=md) as first:
        first_body = await first.read()
    # The URLs' expiry is in whole seconds.
    await asyncio.sleep(1.1)
    async with http.get(f"{gateway}/v1/feed", headers=md) as second:
        second_body = await second.read()
    assert second.headers["ETag"] == first.headers["ETag"]
    assert second_body != first_body
    # RFC 9110 8.8.1: a strong validator promises the same bytes; these answers are only equivalent.
    opaque = json.loads(first_body)["etag"]
    assert opaque.isalnum(), "the field gRPC clients read is the bare etag"
    assert first.headers["ETag"] == f'W/"{opaque}"'
    # What a client got back is current, and so is the etag in its strong form.
    for if_none_match in (first.headers["ETag"], f'"{opaque}"'):
        async with http.get(f"{gateway}/v1/feed", headers={**md, "If-None-Match": if_none_match}) as response:
            assert response.status == 304, if_none_match
            assert response.headers["ETag"] == first.headers["ETag"]


async def test_a_304_carries_each_header_once(gateway, http, bearer, user_id):
    md = bearer(user_id)
    status, _, headers = await call(http, "GET", f"{gateway}/v1/feed", md)
    assert status == 200
    async with http.get(f"{gateway}/v1/feed", headers={**md, "If-None-Match": headers["ETag"]}) as response:
        assert response.status == 304
        for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "X-Request-Id", "ETag", "Vary"):
            assert len(response.headers.getall(name)) == 1, (name, response.headers)


async def test_an_unreachable_server_is_503_without_its_address(gateway_binary, http):
    port = free_port()
    async with gateway_process(gateway_binary, port) as url:
        status, body, _ = await call(http, "GET", f"{url}/v1/storage/summary")
    assert status == 503
    assert body["code"] == 14
    assert reason(body) == "UNAVAILABLE"
    assert str(port) not in body["message"]
    assert body["message"] == "the service is unavailable; retry"


async def test_a_newline_in_the_path_cannot_forge_a_log_line(gateway_binary, http, tmp_path):
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        # The server is unreachable, so the gateway logs the call's method, path and error.
        async with started_gateway(gateway_binary, free_port(), stderr=log) as (url, _):
            status, _, _ = await call(http, "GET", f"{url}/v1/media/abc%0AFORGED%20user%20admin%20logged%20in")
    assert status == 503
    lines = log_path.read_text().splitlines()
    # Go's log prefix begins every line the gateway writes.
    assert all(re.match(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", line) for line in lines), lines
    (logged,) = [line for line in lines if "FORGED" in line]
    assert ' GET "/v1/media/abc\\nFORGED user admin logged in": ' in logged, logged


async def test_sigterm_lets_requests_in_flight_finish(gateway_binary, make_settings, http, bearer, user_id, pool):
    md = bearer(user_id)
    data = small_jpeg()
    async with running(make_settings()) as server, started_gateway(gateway_binary, server.grpc_port) as (url, process):
        status, begun, _ = await call(http, "POST", f"{url}/v1/uploads", md, begin_body(data))
        assert status == 200, begun
        await put_bytes(http, begun, data)
        # A transaction holding the account keeps the finalize waiting at the server.
        async with pool.acquire() as conn:
            holding = conn.transaction()
            await holding.start()
            try:
                await conn.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE", user_id)
                finalizing = asyncio.create_task(call(http, "POST", f"{url}/v1/uploads/{begun['upload']['upload_id']}:finalize", md, {}))
                await until_waiting_for_lock(pool, finalizing, "%UPDATE uploads u SET state = 'finalized'%")
                process.terminate()
                await asyncio.sleep(0.5)
                assert process.poll() is None, "the gateway waits for the request in flight"
            finally:
                await holding.rollback()
            status, done, _ = await finalizing
        assert status == 200, done
        assert done["upload"]["state"] == "UPLOAD_STATE_FINALIZED"
        assert await asyncio.to_thread(process.wait, 10) == 0


async def test_a_client_slow_to_send_its_headers_is_cut(gateway_binary):
    async with started_gateway(gateway_binary, free_port(), MEDIAVAULT_GATEWAY_READ_HEADER_TIMEOUT_SECONDS="1") as (url, _):
        reader, writer = await asyncio.open_connection(*url.removeprefix("http://").split(":"))
        writer.write(b"GET /v1/storage/summary HTTP/1.1\r\nHost: gateway\r\n")
        started, cut = time.monotonic(), None
        try:
            # A header line every 0.25 s for 5 s, each well within any idle timeout.
            for i in range(20):
                writer.write(b"X-Pad-%d: y\r\n" % i)
                await writer.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    if await asyncio.wait_for(reader.read(1024), 0.25) == b"":
                        cut = time.monotonic() - started
                        break
        except ConnectionError:
            cut = time.monotonic() - started
        finally:
            writer.close()
    assert cut is not None, "the gateway still waited for the headers after 5 s"
    assert cut < 3


def content_stream(upload_id: str, data: bytes, chunk_bytes: int = 64 * 1024) -> bytes:
    """An UploadContent body: its messages as JSON objects one after another (newline-separated)."""
    lines = [json.dumps({"upload_id": upload_id})]
    lines += [json.dumps({"chunk": base64.b64encode(data[i : i + chunk_bytes]).decode()}) for i in range(0, len(data), chunk_bytes)]
    return ("\n".join(lines) + "\n").encode()


async def test_upload_content_answers_the_servers_status_when_it_answers_before_the_body_ends(gateway, http, bearer, user_id):
    md = bearer(user_id)
    # Larger than the HTTP/2 windows between the gateway and the server, so that the server's
    # early answer comes while the gateway still has chunks to send.
    stream = content_stream(str(uuid.uuid4()), os.urandom(5 * 1024 * 1024))
    async with http.post(f"{gateway}/v1/uploads:uploadContent", data=stream, headers=md) as response:
        unknown = await response.json(content_type=None)
        assert response.status == 404, unknown
        assert reason(unknown) == "NOT_FOUND"
        assert response.headers["X-Request-Id"]

    data = fake_jpeg(2 * 1024 * 1024)
    status, begun, _ = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(data))
    assert status == 200, begun
    upload_id = begun["upload"]["upload_id"]
    for attempt in ("sends the bytes", "finds it finalized"):
        async with http.post(f"{gateway}/v1/uploads:uploadContent", data=content_stream(upload_id, data), headers=md) as response:
            done = await response.json(content_type=None)
            assert response.status == 200, (attempt, done)
            assert done["upload"]["state"] == "UPLOAD_STATE_FINALIZED", attempt

    small = fake_jpeg(1000)
    status, begun, _ = await call(http, "POST", f"{gateway}/v1/uploads", md, begin_body(small))
    assert status == 200, begun
    async with http.post(f"{gateway}/v1/uploads:uploadContent", data=content_stream(begun["upload"]["upload_id"], os.urandom(5 * 1024 * 1024)),
                         headers=md) as response:
        overrun = await response.json(content_type=None)
        assert response.status == 400, overrun
        assert reason(overrun) == "INVALID_ARGUMENT"


async def test_a_clients_grpc_timeout_header_is_not_the_calls_deadline(gateway, http, bearer, user_id):
    status, summary, _ = await call(http, "GET", f"{gateway}/v1/storage/summary", {**bearer(user_id), "Grpc-Timeout": "1n"})
    assert status == 200, summary
    assert int(summary["summary"]["quota_bytes"]) > 0


async def test_an_account_whose_user_id_holds_a_slash_is_frozen_and_unfrozen_through_rest(gateway, http, authenticator):
    admin = {"Authorization": f"Bearer {authenticator.issue('ops', ['admin'])}"}
    for user_id in (f"org/{uuid.uuid4().hex}/user", f"plain-{uuid.uuid4().hex}", f"a:b-{uuid.uuid4().hex}"):
        path = urllib.parse.quote(user_id, safe="")
        status, frozen, _ = await call(http, "POST", f"{gateway}/v1/accounts/{path}:freeze", admin, {"reason": "chargeback"})
        assert status == 200, (user_id, frozen)
        assert (frozen["account"]["user_id"], frozen["account"]["frozen"]) == (user_id, True)
        status, thawed, _ = await call(http, "POST", f"{gateway}/v1/accounts/{path}:unfreeze", admin, {})
        assert status == 200, (user_id, thawed)
        assert (thawed["account"]["user_id"], thawed["account"]["frozen"]) == (user_id, False)
