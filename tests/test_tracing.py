"""Traces of one upload, from the client's BeginUpload to the worker's transcode, received by OTLP."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent import futures

import aiohttp
import asyncpg
import grpc
import pytest
from aiohttp import web
from arq.connections import RedisSettings
from arq.connections import create_pool as create_arq_pool
from arq.constants import job_key_prefix
from arq.jobs import deserialize_job_raw
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from PIL import Image

from mediavault import jobs, logs, tracing
from mediavault.blobs import open_blob_store
from mediavault.blobs.fs import FsBlobStore
from mediavault.blobs.http import Body, create_app, expecting
from mediavault.blobs.signing import UrlSigner
from mediavault.db import create_pool
from mediavault.media.v1 import media_pb2 as mpb
from mediavault.media.v1 import media_pb2_grpc
from mediavault.storage.v1 import storage_pb2, storage_pb2_grpc
from tests.conftest import running, running_worker
from tests.helpers import fake_jpeg, logged_lines, settled, upload
from tests.test_shutdown import free_port
from tests.test_tus import PATCH_HEADERS, asked, begin_tus, patch, response_head

BEGIN = "mediavault.storage.v1.StorageService/BeginUpload"
FINALIZE = "mediavault.storage.v1.StorageService/FinalizeUpload"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that keeps every span it is sent, with its resource's service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def otlp_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A receiver on a free port, and the standard environment that sends this process's traces to it."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    try:
        yield receiver
    finally:
        server.stop(0)


@pytest.fixture
def collector_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard environment that sends this process's traces to a port where nothing listens."""
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")


def small_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 120, 40)).save(out, "JPEG")
    return out.getvalue()


def attribute(span: trace_pb2.Span, key: str):
    for a in span.attributes:
        if a.key == key:
            value = a.value
            return getattr(value, value.WhichOneof("value"))
    return None


def render(spans: list[trace_pb2.Span], root_parent: bytes) -> str:
    """The trace as an indented tree: name, duration, service and the attributes that say what it did."""
    children: dict[bytes, list[trace_pb2.Span]] = {}
    for span in spans:
        children.setdefault(span.parent_span_id, []).append(span)
    lines: list[str] = []

    def walk(parent: bytes, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time_unix_nano):
            ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
            detail = attribute(span, "db.query.text") or attribute(span, "mediavault.blob.key") or ""
            detail = " ".join(str(detail).split())[:70]
            lines.append(f"{'  ' * depth}{span.name} [{span.span_id.hex()}] {ms:.2f} ms {detail}".rstrip())
            walk(span.span_id, depth + 1)

    walk(root_parent, 0)
    return "\n".join(lines)


async def test_one_upload_is_one_trace_from_begin_through_the_enqueue_to_the_transcode(
    otlp_receiver: Receiver, make_settings, auth, user_id: str
):
    # The client's (the BFF's) trace: both RPCs join it through the W3C traceparent metadata.
    trace_id, client_span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    md = (*auth(user_id), ("traceparent", f"00-{trace_id.hex()}-{client_span_id.hex()}-01"))
    # A queue of this test's own: the session's worker must not take the job.
    settings = make_settings(queue_name=f"mediavault-test-tracing:{uuid.uuid4().hex}")
    rpc_lines = io.StringIO()
    line_handler = logging.StreamHandler(rpc_lines)
    line_handler.setFormatter(logs.JsonFormatter())
    rpc_log = logging.getLogger("mediavault.rpc")
    level = rpc_log.level
    rpc_log.addHandler(line_handler)
    rpc_log.setLevel(logging.INFO)
    try:
        async with running(settings) as server, running_worker(settings):
            assert tracing.tracer is not None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                storage = storage_pb2_grpc.StorageServiceStub(channel)
                finalized = await upload(storage, md, small_jpeg())
                # Polled outside the client's trace: the trace shows the upload only.
                item = await settled(media_pb2_grpc.MediaServiceStub(channel), auth(user_id), finalized.upload.media_id)
                assert item.processing_status == mpb.PROCESSING_STATUS_COMPLETE
    finally:
        rpc_log.removeHandler(line_handler)
        rpc_log.setLevel(level)
    # Stopping the server and the worker exported every span; tracing is off again.
    assert tracing.tracer is None

    # Server and worker share this process, so one provider (the first start's, "mediavault-server")
    # sends both; in production each process names its own service.
    spans = [span for _, span in otlp_receiver.spans if span.trace_id == trace_id]
    print(f"\ntrace {trace_id.hex()}: {len(spans)} spans, from services {sorted({s for s, _ in otlp_receiver.spans})}")
    print(render(spans, client_span_id))
    by_id = {span.span_id: span for span in spans}

    def named(name: str, parent: trace_pb2.Span | None = None) -> list[trace_pb2.Span]:
        return [s for s in spans if s.name == name and (parent is None or s.parent_span_id == parent.span_id)]

    def under(span: trace_pb2.Span, ancestor: trace_pb2.Span) -> bool:
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            if span.span_id == ancestor.span_id:
                return True
        return False

    # Every span of the trace hangs from the client's span: one tree.
    assert all(s.parent_span_id in by_id or s.parent_span_id == client_span_id for s in spans)
    (begin,) = named(BEGIN)
    (finalize,) = named(FINALIZE)
    assert begin.parent_span_id == finalize.parent_span_id == client_span_id
    assert begin.kind == finalize.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert attribute(finalize, "rpc.grpc.status_code") == 0
    assert attribute(finalize, "enduser.id") == user_id
    (enqueue,) = named("enqueue transcode_media", finalize)
    assert enqueue.kind == trace_pb2.Span.SPAN_KIND_PRODUCER
    assert attribute(enqueue, "messaging.message.id") == f"transcode:{finalized.upload.media_id}"
    (job,) = named("process transcode_media", enqueue)
    assert job.kind == trace_pb2.Span.SPAN_KIND_CONSUMER
    (transcode,) = named("transcode", job)
    assert attribute(transcode, "mediavault.width") == 96

    db_spans = [s for s in spans if attribute(s, "db.system.name") == "postgresql"]
    blob_spans = [s for s in spans if s.name.startswith("blob ")]
    for rpc in (begin, finalize, job):
        assert any(under(s, rpc) for s in db_spans), f"no database span under {rpc.name}"
    assert {s.name for s in blob_spans if under(s, begin)} == {"blob presign_put"}
    assert any(under(s, finalize) for s in blob_spans)
    assert {"blob read", "blob write"} <= {s.name for s in blob_spans if under(s, job)}
    assert all(s.kind == trace_pb2.Span.SPAN_KIND_CLIENT for s in db_spans + blob_spans)

    # The JSON log line of each RPC names its trace and its span.
    lines = [json.loads(line) for line in rpc_lines.getvalue().splitlines()]
    finalize_line = next(line for line in lines if line.get("rpc") == "StorageService/FinalizeUpload")
    assert (finalize_line["trace_id"], finalize_line["span_id"]) == (trace_id.hex(), finalize.span_id.hex())


async def test_a_traced_job_is_what_arq_enqueue_job_writes_with_the_trace_context_keyword(otlp_receiver: Receiver, redis_url: str):
    redis = await create_arq_pool(RedisSettings.from_dsn(redis_url), default_queue_name=f"test-tracing:{uuid.uuid4().hex}")
    media_id = uuid.uuid4()
    ours = jobs.transcode_job_id(media_id, 0)
    theirs = f"{ours}:arq"
    assert tracing.start("mediavault-test")
    try:
        assert await jobs.enqueue_transcode(redis, media_id, 0)
        our_job = deserialize_job_raw(await redis.get(job_key_prefix + ours))
        carried = our_job[2]["trace_context"]
        assert await redis.enqueue_job(jobs.TRANSCODE, str(media_id), 0, trace_context=carried, _job_id=theirs) is not None
        their_job = deserialize_job_raw(await redis.get(job_key_prefix + theirs))
    finally:
        await tracing.stop()
        await redis.delete(redis.default_queue_name, job_key_prefix + ours, job_key_prefix + theirs)
        await redis.aclose()
    # (function, args, kwargs, job_try): the one keyword more is the only difference from arq's plain job.
    assert our_job[:4] == their_job[:4] == (jobs.TRANSCODE, (str(media_id), 0), {"trace_context": carried}, None)
    (enqueue,) = [span for _, span in otlp_receiver.spans if span.name == "enqueue transcode_media"]
    version, trace_id, span_id, flags = carried["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", enqueue.trace_id.hex(), enqueue.span_id.hex())
    assert int(flags, 16) & 1, "sampled"


async def test_without_an_endpoint_tracing_stays_off_and_nothing_is_wrapped(monkeypatch: pytest.MonkeyPatch, make_settings):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    settings = make_settings()
    assert tracing.start("mediavault-test") is False
    assert tracing.tracer is None
    pool = await create_pool(settings)
    blobs = await open_blob_store(settings)
    try:
        async with pool.acquire() as conn:
            assert type(conn._con) is asyncpg.Connection
        assert tracing.traced_blobs(blobs, settings.blob_backend) is blobs
        assert tracing.start_http("PATCH", "/tus/{upload_id}", "/tus/x", "http", {}, "request-1") is None
    finally:
        await blobs.close()
        await pool.close()


@pytest.mark.parametrize(
    ("environment", "on"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({}, False),
    ],
)
def test_the_standard_environment_decides(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], on: bool):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert tracing.configured() is on


async def test_stop_gives_up_on_a_collector_that_is_down_within_its_budget(collector_down):
    assert tracing.start("mediavault-test")
    for n in range(2000):
        span = tracing.start_rpc("mediavault.test.v1.TestService", "Call", (), f"request-{n}")
        assert span is not None
        span.end(status_code=0, outcome="OK", user_id=None)
    started = time.monotonic()
    await tracing.stop()
    assert time.monotonic() - started < tracing.STOP_BUDGET_SECONDS + 1


async def test_a_server_shuts_down_promptly_with_the_collector_down(collector_down, make_settings, auth, user_id):
    grace = 1.0
    async with running(make_settings(shutdown_grace_seconds=grace)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            await storage.GetStorageSummary(storage_pb2.GetStorageSummaryRequest(), metadata=auth(user_id))
        started = time.monotonic()
        await server.shutdown(grace)
        elapsed = time.monotonic() - started
    assert tracing.tracer is None
    # No call is in flight, so the grace period is not waited out.
    assert elapsed < tracing.STOP_BUDGET_SECONDS + 2


def signature_in_any_span(spans: list[trace_pb2.Span], signature: str) -> bool:
    values = [a.value.string_value for s in spans for a in s.attributes]
    values += [a.value.string_value for s in spans for e in s.events for a in e.attributes]
    return any(signature in value or "X-Signature" in value for value in values)


async def test_tus_patches_are_server_spans_of_the_callers_trace_over_their_statements_and_blob_calls(
    otlp_receiver: Receiver, make_settings, auth, user_id
):
    """The HTTP listener had no spans: a tus PATCH, the slowest request served, was invisible in
    traces, and its caller's traceparent was dropped."""
    trace_id, client_span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    traceparent = f"00-{trace_id.hex()}-{client_span_id.hex()}-01"
    data = fake_jpeg(300_000)
    async with running(make_settings()) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            begun = await begin_tus(storage_pb2_grpc.StorageServiceStub(channel), auth(user_id), data)
        url = begun.upload_url
        target = url.split(f":{server.http_port}", 1)[1]
        async with aiohttp.ClientSession() as http:
            plain = await patch(http, url, 0, data[:100_000], traceparent=traceparent, **{"X-Request-Id": "traced-patch"})
            assert plain.status == 204
            async with http.get(f"http://127.0.0.1:{server.http_port}/nowhere", headers={"traceparent": traceparent}) as nowhere:
                assert nowhere.status == 404
            async with http.get(f"http://127.0.0.1:{server.http_port}/healthz", headers={"traceparent": traceparent}) as probed:
                assert probed.status == 200
        # Asked first (Expect: 100-continue): the checks before its body and the chunk are one span.
        headers = {**PATCH_HEADERS, "Upload-Offset": "100000", "Content-Length": "100000", "traceparent": traceparent}
        status, _, reader, writer = await asked(server, "PATCH", target, headers)
        try:
            assert status == 100
            continued = time.time_ns()
            writer.write(data[100_000:200_000])
            async with asyncio.timeout(30):
                assert (await response_head(reader))[0] == 204
        finally:
            writer.close()
        # Cut mid-body: the span ends all the same, with no answer sent.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        header_lines = "".join(f"{name}: {value}\r\n" for name, value in {**headers, "Upload-Offset": "200000"}.items())
        writer.write(f"PATCH {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header_lines}\r\n".encode() + data[200_000:250_000])
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()
        await asyncio.sleep(0.5)
    assert tracing.tracer is None

    spans = [span for _, span in otlp_receiver.spans if span.trace_id == trace_id]
    print(f"\ntrace {trace_id.hex()}: {len(spans)} spans")
    print(render(spans, client_span_id))
    by_id = {span.span_id: span for span in spans}

    def under(span: trace_pb2.Span, ancestor: trace_pb2.Span) -> bool:
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            if span.span_id == ancestor.span_id:
                return True
        return False

    patches = sorted((s for s in spans if s.name == "PATCH /tus/{upload_id}"), key=lambda s: s.start_time_unix_nano)
    assert len(patches) == 3
    assert all(s.parent_span_id == client_span_id and s.kind == trace_pb2.Span.SPAN_KIND_SERVER for s in patches)
    assert all(
        (attribute(s, "http.request.method"), attribute(s, "http.route"), attribute(s, "url.path"), attribute(s, "url.scheme"))
        == ("PATCH", "/tus/{upload_id}", target.split("?")[0], "http")
        for s in patches
    )
    first, asked_first, cut = patches
    assert (attribute(first, "http.response.status_code"), attribute(first, "mediavault.request_id")) == (204, "traced-patch")
    assert attribute(asked_first, "http.response.status_code") == 204
    assert first.status.code == asked_first.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    # Every statement and blob call of the three is inside one of them; nothing hangs from the client's span directly.
    assert {s.span_id for s in spans if s.parent_span_id == client_span_id} == {s.span_id for s in patches} | {
        s.span_id for s in spans if s.name == "GET"
    }
    db_spans = [s for s in spans if attribute(s, "db.system.name") == "postgresql"]
    blob_spans = [s for s in spans if s.name.startswith("blob ")]
    for request in patches:
        assert any(under(s, request) for s in db_spans), f"no database span under {request.name}"
        assert any(under(s, request) for s in blob_spans), f"no blob span under {request.name}"
    assert any(under(s, asked_first) and s.end_time_unix_nano < continued for s in db_spans), "the checks before 100 Continue"
    assert attribute(cut, "http.response.status_code") is None
    assert attribute(cut, "error.type") == tracing.CLIENT_DISCONNECTED
    assert cut.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert not [s for s in spans if s.name == "GET /healthz"], "a load balancer's probe is no trace"
    (nowhere_span,) = [s for s in spans if s.name == "GET"]
    assert (attribute(nowhere_span, "http.route"), attribute(nowhere_span, "http.response.status_code")) == (None, 404)
    assert nowhere_span.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    signature = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["X-Signature"][0]
    assert not signature_in_any_span([span for _, span in otlp_receiver.spans], signature)


async def test_signed_blob_requests_and_a_failure_are_spans_and_the_failures_log_line_names_its_span(
    otlp_receiver: Receiver, tmp_path, unused_tcp_port
):
    signer = UrlSigner(b"k" * 32, f"http://127.0.0.1:{unused_tcp_port}")
    store = FsBlobStore(tmp_path, signer)

    async def broken(_request: web.Request) -> web.StreamResponse:
        raise RuntimeError("broken on purpose")

    lines = io.StringIO()
    line_handler = logging.StreamHandler(lines)
    line_handler.setFormatter(logs.JsonFormatter())
    logging.getLogger("mediavault").addHandler(line_handler)
    assert tracing.start("mediavault-test")
    app = create_app(store, idle_seconds=60)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app)
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
        signed = await store.presign_put("originals/ab/traced", size_bytes=5, content_type="image/png", sha256=None, expires_in=60)
        get_url = await store.presign_get("originals/ab/traced", expires_in=60)
        async with aiohttp.ClientSession() as http:
            async with http.put(signed.url, data=b"hello", headers=signed.headers) as put:
                assert put.status == 200
            async with http.get(get_url) as got:
                assert (got.status, await got.read()) == (200, b"hello")
            async with http.get(f"http://127.0.0.1:{unused_tcp_port}/broken") as failed:
                assert failed.status == 500
    finally:
        logging.getLogger("mediavault").removeHandler(line_handler)
        await runner.cleanup()
        await tracing.stop()
    spans = [span for _, span in otlp_receiver.spans]
    (put_span,) = [s for s in spans if s.name == "PUT /blobs/{key}"]
    (get_span,) = [s for s in spans if s.name == "GET /blobs/{key}"]
    for span, status in ((put_span, 200), (get_span, 200)):
        assert (attribute(span, "url.path"), attribute(span, "http.response.status_code")) == ("/blobs/originals/ab/traced", status)
    (failed_span,) = [s for s in spans if s.name == "GET /broken"]
    assert (attribute(failed_span, "http.response.status_code"), attribute(failed_span, "error.type")) == (500, "RuntimeError")
    assert failed_span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert [event.name for event in failed_span.events] == ["exception"]
    (line,) = [json.loads(text) for text in lines.getvalue().splitlines() if json.loads(text).get("exc")]
    assert (line["trace_id"], line["span_id"]) == (failed_span.trace_id.hex(), failed_span.span_id.hex())
    for url in (signed.url, get_url):
        signature = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["X-Signature"][0]
        assert not signature_in_any_span(spans, signature)


async def test_the_span_of_a_request_whose_client_leaves_after_100_continue_ends(otlp_receiver: Receiver, unused_tcp_port):
    """aiohttp waits for the 100 Continue to be sent between the expect handler and the request's
    handler, before any middleware: that wait failing (the client gone while the connection's writes
    were paused) skipped the handler, so the request's span never ended (and aiohttp logged "Error
    handling request" and counted a 500). The client gone is now the handler's, its body cut off."""

    async def held_back(request: web.Request) -> web.StreamResponse | None:
        # As asyncio pauses a connection's writes while its send buffer is over the high-water mark
        # (a client that stopped reading): the 100 Continue is still being sent when the client goes.
        request.protocol.pause_writing()
        return None

    async def receive(request: web.Request) -> web.StreamResponse:
        body = Body(request)
        received = sum([len(chunk) async for chunk in body.chunks()])
        return web.Response(status=400 if body.cut else 200, text=str(received))

    assert tracing.start("mediavault-test")
    app = create_app(None, idle_seconds=60)
    app.router.add_put("/held", receive, expect_handler=expecting(held_back))
    runner = web.AppRunner(app)
    try:
        with logged_lines() as lines:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
            reader, writer = await asyncio.open_connection("127.0.0.1", unused_tcp_port)
            writer.write(b"PUT /held HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            async with asyncio.timeout(10):
                assert (await response_head(reader))[0] == 100
            # Gone as a lost link goes: a reset, not an orderly close.
            writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()
        await tracing.stop()
    held = [s for s in (span for _, span in otlp_receiver.spans) if s.name == "PUT /held"]
    assert [(attribute(s, "http.response.status_code"), attribute(s, "error.type"), s.status.code) for s in held] == [
        (None, tracing.CLIENT_DISCONNECTED, trace_pb2.Status.STATUS_CODE_ERROR)
    ]
    assert [(line["logger"], line["msg"]) for line in lines] == []
