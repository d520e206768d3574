"""The fs backend's signed URLs behave like S3 presigned URLs, over a real HTTP listener."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import urllib.parse
from pathlib import Path

import aiohttp
import pytest
import yarl
from aiohttp import web
from multidict import CIMultiDict

from mediavault import metrics
from mediavault.blobs.base import BlobStoreError, Inspection, ObjectInfo, SignedRequest, single_chunk
from mediavault.blobs.fs import FsBlobStore
from mediavault.blobs.http import create_app, expecting
from mediavault.blobs.signing import UrlSigner, signed_owner
from tests.helpers import http_answers_counted, http_answers_counted_since, logged_lines


@pytest.fixture
async def store(tmp_path, unused_tcp_port):
    signer = UrlSigner(b"k" * 32, f"http://127.0.0.1:{unused_tcp_port}")
    store = FsBlobStore(tmp_path, signer)
    runner = web.AppRunner(create_app(store, idle_seconds=60))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    yield store
    await runner.cleanup()


async def send(method: str, url: str | yarl.URL, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
    async with aiohttp.ClientSession() as session, session.request(method, url, data=body, headers=headers or {}) as response:
        return response.status, await response.read(), dict(response.headers)


async def test_put_then_get(store):
    signed = await store.presign_put("originals/ab/one", size_bytes=5, content_type="image/png", sha256=None, expires_in=60)
    assert (await send("PUT", signed.url, b"hello", signed.headers))[0] == 200
    assert store.path("originals/ab/one").read_bytes() == b"hello"
    status, body, headers = await send("GET", await store.presign_get("originals/ab/one", expires_in=60, content_type="image/png"))
    assert (status, body) == (200, b"hello")
    assert headers["Content-Type"] == "image/png"
    assert headers["X-Content-Type-Options"] == "nosniff"


async def test_put_of_several_megabytes_stores_every_byte(store):
    body = bytes(range(256)) * (3 * 4096 + 17)
    signed = await store.presign_put(
        "originals/ab/big", size_bytes=len(body), content_type="video/mp4", sha256=None, expires_in=60
    )
    assert (await send("PUT", signed.url, body, signed.headers))[0] == 200
    assert store.path("originals/ab/big").read_bytes() == body
    assert not any(Path(store.new_temp_file()).parent.iterdir()), "no temp file is left behind"


@pytest.mark.parametrize("size", [0, 10, 256 * 1024, 256 * 1024 + 1, 3_000_001])
async def test_inspect_reads_size_checksum_and_head_of_small_and_large_objects(store, size):
    # Up to 256 KiB in one read on the event loop, larger ones chunk by chunk in a thread.
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    await store.write("originals/ab/inspected", single_chunk(body), content_type="image/jpeg")
    expected = Inspection(size, hashlib.sha256(body).hexdigest(), body[:1024])
    assert await store.inspect("originals/ab/inspected", 1024) == expected
    assert await store.inspect("originals/ab/missing", 1024) is None


async def test_download_copies_the_object_into_a_file_and_refuses_a_missing_one(store, tmp_path):
    data = os.urandom(9 * 1024 * 1024 + 5)
    await store.write("originals/ab/big", single_chunk(data), content_type="video/mp4")

    assert await store.download("originals/ab/big", tmp_path / "copy") == len(data)

    assert (tmp_path / "copy").read_bytes() == data
    with pytest.raises(BlobStoreError):
        await store.download("originals/ab/missing", tmp_path / "other")


async def test_write_of_many_chunks_replaces_the_object_whole(store):
    chunks = [bytes([i]) * 300_000 for i in range(10)]

    async def stream():
        for chunk in chunks:
            yield chunk

    await store.write("variants/ab/old", single_chunk(b"previous"), content_type="image/jpeg")
    assert await store.write("variants/ab/old", stream(), content_type="image/jpeg") == 3_000_000
    assert store.path("variants/ab/old").read_bytes() == b"".join(chunks)
    assert not any(Path(store.new_temp_file()).parent.iterdir())


async def test_a_failing_stream_leaves_neither_object_nor_temp_file(store):
    async def stream():
        yield b"x" * 2_000_000
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        await store.write("variants/ab/none", stream(), content_type="image/jpeg")
    assert not store.path("variants/ab/none").exists()
    assert not any(Path(store.new_temp_file()).parent.iterdir())


async def cut_put(store: FsBlobStore, signed: SignedRequest, body: bytes) -> None:
    """Sends the signed PUT's head and half its body, closes the connection once the listener is
    writing the body, and waits until the listener has removed its temp file."""
    url = urllib.parse.urlsplit(signed.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    headers = {"Content-Length": str(len(body)), **signed.headers}
    head = [f"PUT {url.path}?{url.query} HTTP/1.1", f"Host: {url.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body[: len(body) // 2])
    await writer.drain()
    temp_dir = Path(store.new_temp_file()).parent
    deadline = time.monotonic() + 10
    # Cut once the server is writing the body.
    while not any(temp_file.stat().st_size > 0 for temp_file in temp_dir.iterdir()):
        assert time.monotonic() < deadline, "the server never started writing the body"
        await asyncio.sleep(0.01)
    writer.close()
    await writer.wait_closed()
    while any(temp_dir.iterdir()):
        assert time.monotonic() < deadline, "the cut PUT's temp file was never removed"
        await asyncio.sleep(0.01)


async def test_a_put_cut_mid_body_leaves_neither_object_nor_temp_file_and_the_url_still_works(store):
    body = bytes(range(256)) * 40_000
    signed = await store.presign_put(
        "originals/ab/cut", size_bytes=len(body), content_type="video/mp4", sha256=None, expires_in=60
    )
    await cut_put(store, signed, body)
    assert not store.path("originals/ab/cut").exists()
    assert (await send("PUT", signed.url, body, signed.headers))[0] == 200
    assert store.path("originals/ab/cut").read_bytes() == body


async def test_a_client_lost_mid_put_is_no_server_error(store):
    """A client that leaves mid-body (a phone losing signal) was a server error: the read's
    ConnectionResetError escaped the handler, logged "http request failed" at error and counted
    500. It is a body shorter than signed, as a tus creation cut off is: 400, nothing logged."""
    body = bytes(range(256)) * 40_000
    signed = await store.presign_put(
        "originals/ab/lost", size_bytes=len(body), content_type="video/mp4", sha256=None, expires_in=60
    )
    endpoint = metrics.MetricsEndpoint("127.0.0.1:0")
    try:
        with logged_lines() as lines:
            before = await http_answers_counted(endpoint.port, "/blobs/{key}", "PUT")
            await cut_put(store, signed, body)
            counted = await http_answers_counted_since(endpoint.port, "/blobs/{key}", "PUT", before, 1)
    finally:
        endpoint.close()
    assert counted == {"400": 1.0}
    assert [(line["logger"], line["msg"]) for line in lines] == []
    assert not store.path("originals/ab/lost").exists()


async def test_a_put_records_the_sha256_of_its_body_with_the_object(store):
    body = os.urandom(3 * 1024 * 1024 + 11)
    signed = await store.presign_put(
        "originals/ab/hashed", size_bytes=len(body), content_type="video/mp4", sha256=None, expires_in=60
    )
    assert (await send("PUT", signed.url, body, signed.headers))[0] == 200

    digest = hashlib.sha256(body).hexdigest()
    assert os.getxattr(store.path("originals/ab/hashed"), "user.mediavault.sha256") == digest.encode()
    assert await store.stat("originals/ab/hashed") == ObjectInfo(len(body), digest)
    assert await store.inspect("originals/ab/hashed", 64) == Inspection(len(body), digest, body[:64])


@pytest.mark.parametrize("record", [None, b"not a digest", b"AB" * 32])
async def test_an_object_without_a_valid_recorded_sha256_is_hashed(store, record):
    # A copy that drops extended attributes (plain cp), or a value nobody could have recorded.
    body = os.urandom(300 * 1024)
    await store.write("originals/ab/copied", single_chunk(body), content_type="video/mp4")
    if record is not None:
        os.setxattr(store.path("originals/ab/copied"), "user.mediavault.sha256", record)

    assert await store.stat("originals/ab/copied") == ObjectInfo(len(body), None)
    digest = hashlib.sha256(body).hexdigest()
    assert await store.inspect("originals/ab/copied", 8) == Inspection(len(body), digest, body[:8])


async def test_a_put_whose_body_differs_from_the_signed_sha256_is_refused_and_stores_nothing(store):
    declared = b"\xff\xd8\xff" + os.urandom(600 * 1024)
    sent = declared[:-1] + bytes([declared[-1] ^ 1])
    signed = await store.presign_put(
        "originals/ab/digest",
        size_bytes=len(declared),
        content_type="image/jpeg",
        sha256=hashlib.sha256(declared).hexdigest(),
        expires_in=60,
    )

    status, body, _ = await send("PUT", signed.url, sent, signed.headers)

    assert (status, json.loads(body)["error"]) == (400, "BadDigest")
    assert await store.stat("originals/ab/digest") is None
    assert not any(Path(store.new_temp_file()).parent.iterdir()), "no temp file is left behind"
    assert (await send("PUT", signed.url, declared, signed.headers))[0] == 200
    assert store.path("originals/ab/digest").read_bytes() == declared


async def test_presign_put_rejects_a_malformed_sha256(store):
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex digits"):
        await store.presign_put("originals/ab/x", size_bytes=1, content_type="image/png", sha256="AB" * 32, expires_in=60)


async def test_second_put_cannot_replace_the_object(store):
    signed = await store.presign_put("originals/ab/two", size_bytes=5, content_type="image/png", sha256=None, expires_in=60)
    assert (await send("PUT", signed.url, b"first", signed.headers))[0] == 200
    assert (await send("PUT", signed.url, b"other", signed.headers))[0] == 412
    assert store.path("originals/ab/two").read_bytes() == b"first"


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"toolong", {"Content-Type": "image/png"}, 403),
        (b"shrt", {"Content-Type": "image/png"}, 403),
        (b"hello", {"Content-Type": "image/jpeg"}, 403),
    ],
)
async def test_put_must_match_what_was_signed(store, body, headers, status):
    signed = await store.presign_put("originals/ab/three", size_bytes=5, content_type="image/png", sha256=None, expires_in=60)
    assert (await send("PUT", signed.url, body, headers))[0] == status
    assert not store.path("originals/ab/three").exists()


async def first_answer(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
    """The status and headers the listener answers a PUT's head that asks Expect: 100-continue, its body unsent."""
    split = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(split.hostname, split.port)
    head = [f"PUT {split.path}?{split.query} HTTP/1.1", f"Host: {split.netloc}", "Expect: 100-continue"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    answered = {}
    async with asyncio.timeout(10):
        status = int((await reader.readline()).split()[1])
        while line := (await reader.readline()).strip():
            name, _, value = line.decode().partition(":")
            answered[name.strip().lower()] = value.strip()
    return status, answered, reader, writer


async def test_a_put_that_will_be_refused_is_answered_before_its_body_is_sent(store):
    # aiohttp answered 100 Continue before any check ran, so a client that asks first sent the
    # whole body of a PUT that was then refused.
    signed = await store.presign_put("originals/ab/asks", size_bytes=5, content_type="image/png", sha256=None, expires_in=60)
    expired = store.signer.sign("PUT", "originals/ab/asks", expires_in=-1, length=5, content_type="image/png")
    refused = [
        (signed.url.replace("asks", "other"), {"Content-Length": "5", **signed.headers}, 403),
        (expired, {"Content-Length": "5", **signed.headers}, 403),
        (signed.url, {"Content-Length": "6", "Content-Type": "image/png"}, 403),
        (signed.url, {"Content-Length": "5", "Content-Type": "image/jpeg"}, 403),
    ]
    for url, headers, expected in refused:
        status, answered, _, writer = await first_answer(url, headers)
        writer.close()
        assert status == expected, (url, headers)
        assert answered["connection"] == "close", "a next request on it would be read as the body held back"
    status, _, reader, writer = await first_answer(signed.url, {"Content-Length": "5", **signed.headers})
    try:
        assert status == 100
        writer.write(b"hello")
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert store.path("originals/ab/asks").read_bytes() == b"hello"
    status, _, _, writer = await first_answer(signed.url, {"Content-Length": "5", **signed.headers})
    writer.close()
    assert status == 412, "an object is uploaded once"


async def test_signed_put_and_get_answer_with_the_request_id(store):
    signed = await store.presign_put("originals/ab/rid", size_bytes=5, content_type="image/png", sha256=None, expires_in=60)
    given = {"X-Request-Id": "blob-req-7"}
    put = await send("PUT", signed.url, b"hello", {**signed.headers, **given})
    get = await send("GET", await store.presign_get("originals/ab/rid", expires_in=60), headers=given)
    again = await send("PUT", signed.url, b"hello", {**signed.headers, **given})
    # aiohttp's client spells the header names it knows its own way: X-Request-ID.
    assert [(status, CIMultiDict(headers).get("X-Request-Id")) for status, _, headers in (put, get, again)] == [
        (200, "blob-req-7"), (200, "blob-req-7"), (412, "blob-req-7")
    ]
    status, answered, _, writer = await first_answer(signed.url.replace("rid", "other"), {"Content-Length": "5", **signed.headers, **given})
    writer.close()
    assert (status, answered["x-request-id"]) == (403, "blob-req-7")
    _, _, made = await send("GET", await store.presign_get("originals/ab/rid", expires_in=60))
    assert len(CIMultiDict(made)["X-Request-Id"]) == 32


async def test_an_unexpected_failure_is_logged_once_with_the_request_id_and_answered_500(unused_tcp_port):
    """aiohttp's own "Error handling request" line was written outside the request's context, so
    it had no request_id while the 500 answer carried X-Request-Id."""

    async def broken(_request: web.Request) -> web.StreamResponse:
        raise RuntimeError("broken on purpose")

    app = create_app(None, idle_seconds=60)
    app.router.add_get("/broken", broken)
    # An expect handler runs before any middleware (a tus PATCH's checks, a creation).
    app.router.add_put("/broken", broken, expect_handler=expecting(broken))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    url = f"http://127.0.0.1:{unused_tcp_port}/broken"
    try:
        with logged_lines() as lines:
            status, body, headers = await send("GET", url, headers={"X-Request-Id": "broken-get"})
            assert (status, CIMultiDict(headers)["X-Request-Id"]) == (500, "broken-get")
            assert b"broken on purpose" not in body
            status, answered, _, writer = await first_answer(url, {"Content-Length": "5", "X-Request-Id": "broken-asked"})
            writer.close()
            assert (status, answered["x-request-id"], answered["connection"]) == (500, "broken-asked", "close")
    finally:
        await runner.cleanup()
    assert [(line["level"], line["msg"], line.get("request_id"), line.get("status")) for line in lines] == [
        ("error", "http request failed", "broken-get", 500),
        ("error", "http request failed", "broken-asked", 500),
    ]
    assert all("RuntimeError: broken on purpose" in line["exc"] for line in lines)


async def test_chunked_body_without_length_is_refused(store):
    signed = await store.presign_put("originals/ab/four", size_bytes=5, content_type="image/png", sha256=None, expires_in=60)

    async def chunks():
        yield b"hel"
        yield b"lo"

    async with (
        aiohttp.ClientSession() as session,
        session.put(signed.url, data=chunks(), headers={"Content-Type": "image/png"}) as response,
    ):
        assert response.status == 411
    assert not store.path("originals/ab/four").exists()


async def test_tampered_expired_or_wrong_method_urls_are_refused(store):
    signed = await store.presign_put("originals/ab/five", size_bytes=5, content_type="image/png", sha256=None, expires_in=60)
    assert (await send("PUT", signed.url.replace("five", "six"), b"hello", signed.headers))[0] == 403
    assert (await send("PUT", signed.url.replace("X-Length=5", "X-Length=6"), b"hello!", {"Content-Type": "image/png"}))[0] == 403
    assert (await send("GET", signed.url))[0] == 403
    expired = store.signer.sign("PUT", "originals/ab/five", expires_in=-1, length=5, content_type="image/png")
    assert (await send("PUT", expired, b"hello", signed.headers))[0] == 403
    assert not store.path("originals/ab/five").exists()


async def test_a_signature_of_non_ascii_characters_is_refused_not_an_error(store):
    # hmac.compare_digest raises TypeError on a str holding non-ASCII characters: the listener
    # answered 500 to a URL whose X-Signature was percent-encoded UTF-8.
    signed = await store.presign_put("originals/ab/seven", size_bytes=5, content_type="image/png", sha256=None, expires_in=60)
    for signature in ("%C3%A9", "%FF"):
        put = signed.url.split("X-Signature=")[0] + "X-Signature=" + signature
        assert (await send("PUT", yarl.URL(put, encoded=True), b"hello", signed.headers))[0] == 403
        get = (await store.presign_get("originals/ab/seven", expires_in=60)).split("X-Signature=")[0] + "X-Signature=" + signature
        assert (await send("GET", yarl.URL(get, encoded=True)))[0] == 403
    assert not store.path("originals/ab/seven").exists()


def test_signature_expires():
    signer = UrlSigner(b"k" * 32, "http://x")
    url = signer.sign("GET", "a/b", expires_in=10)
    params = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    assert signer.verify("GET", "a/b", params) is None
    assert signer.verify("GET", "a/b", params, now=time.time() + 11) == "URL expired"


def test_a_signed_sha256_cannot_be_dropped_added_or_changed():
    signer = UrlSigner(b"k" * 32, "http://x")
    digest = hashlib.sha256(b"body").hexdigest()
    with_digest = dict(urllib.parse.parse_qsl(signer.sign("PUT", "a/b", expires_in=10, length=4, sha256=digest).split("?")[1]))
    without = dict(urllib.parse.parse_qsl(signer.sign("PUT", "a/b", expires_in=10, length=4).split("?")[1]))

    assert with_digest["X-Sha256"] == digest
    assert signer.verify("PUT", "a/b", with_digest) is None
    assert signer.verify("PUT", "a/b", without) is None
    dropped = {k: v for k, v in with_digest.items() if k != "X-Sha256"}
    added = {**without, "X-Sha256": digest}
    changed = {**with_digest, "X-Sha256": hashlib.sha256(b"other").hexdigest()}
    for params in (dropped, added, changed):
        assert signer.verify("PUT", "a/b", params) == "signature does not match"


def test_a_signed_owner_is_read_back_and_cannot_be_dropped_added_changed_or_taken_for_a_checksum():
    signer = UrlSigner(b"k" * 32, "http://x")
    owner = "user 1+\n\u00e9/&="
    url = signer.sign_until("TUS", "a/b", expires=int(time.time()) + 10, route="tus", owner=owner)
    with_owner = dict(urllib.parse.parse_qsl(url.split("?")[1]))
    without = dict(urllib.parse.parse_qsl(signer.sign_until("TUS", "a/b", expires=int(with_owner["X-Expires"])).split("?")[1]))

    assert signer.verify("TUS", "a/b", with_owner) is None
    assert signed_owner(with_owner) == owner
    assert signer.verify("TUS", "a/b", without) is None
    assert signed_owner(without) is None
    dropped = {k: v for k, v in with_owner.items() if k != "X-Owner"}
    added = {**without, "X-Owner": owner}
    changed = {**with_owner, "X-Owner": owner + "x"}
    digest = hashlib.sha256(b"body").hexdigest()
    as_checksum = {**without, "X-Sha256": digest}
    checksummed = dict(urllib.parse.parse_qsl(
        signer.sign_until("TUS", "a/b", expires=int(with_owner["X-Expires"]), owner=digest).split("?")[1]
    ))
    moved = {**{k: v for k, v in checksummed.items() if k != "X-Owner"}, "X-Sha256": digest}
    for params in (dropped, added, changed, as_checksum, moved):
        assert signer.verify("TUS", "a/b", params) == "signature does not match"


def test_signed_urls_escape_the_content_type_and_refuse_keys_that_are_not_generated():
    signer = UrlSigner(b"k" * 32, "http://x/")
    url = signer.sign("PUT", "originals/ab/c-d_e.f", expires_in=10, length=7, content_type="image/svg+xml")
    path, _, query = url.partition("?")
    assert path == "http://x/blobs/originals/ab/c-d_e.f"
    params = dict(urllib.parse.parse_qsl(query))
    assert params["X-Content-Type"] == "image/svg+xml"
    assert params["X-Length"] == "7"
    assert signer.verify("PUT", "originals/ab/c-d_e.f", params) is None
    for key in ("../etc/passwd", "a b", "A/b", "a/b?c", ""):
        with pytest.raises(ValueError, match="invalid object key"):
            signer.sign("GET", key, expires_in=10)


async def test_signed_fields_cannot_be_shifted_into_one_another(store):
    # The signature covers the fields joined by newlines, so a URL whose X-Length took in the
    # content type and whose X-Content-Type took the SHA-256 signed the same message without one:
    # it passed the signature and its X-Length was an int() ValueError, a 500.
    declared = b"hello"
    signed = await store.presign_put(
        "originals/ab/eight", size_bytes=5, content_type="image/png", sha256=hashlib.sha256(declared).hexdigest(), expires_in=60
    )
    params = dict(urllib.parse.parse_qsl(signed.url.split("?", 1)[1]))
    shifted = {**params, "X-Length": f"{params['X-Length']}\n{params['X-Content-Type']}", "X-Content-Type": params.pop("X-Sha256")}
    del shifted["X-Sha256"]
    assert store.signer.verify("PUT", "originals/ab/eight", shifted) is not None
    url = signed.url.split("?", 1)[0] + "?" + urllib.parse.urlencode(shifted)
    status, _, _ = await send("PUT", yarl.URL(url, encoded=True), b"other", {"Content-Type": shifted["X-Content-Type"]})
    assert status == 403
    assert not store.path("originals/ab/eight").exists()
