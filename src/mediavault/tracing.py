"""OpenTelemetry traces: off unless the standard OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, then exported by OTLP/gRPC.

Every instrumented place reads `tracer` and does nothing more while it is None: with tracing
off the database pool and blob store are not even wrapped, and an RPC pays a few calls that
find it None.
Spans of the database and the blob store are made only inside a sampled trace (an RPC, an HTTP
request or a job), so the health probe and the cron jobs send nothing. docs/operations.md lists the spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode

from mediavault.blobs.base import (
    BlobStore,
    Digest,
    DirectParts,
    Inspection,
    ListedObject,
    MultipartUpload,
    ObjectInfo,
    PartialState,
    PartialWriter,
    SignedRequest,
    StoredPart,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

# The tracer of this process while tracing is on; None when off.
tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_processor: BatchSpanProcessor | None = None
# Servers and workers that started tracing in this process (tests run both in one).
_users = 0

# How long stop() lets the spans still buffered take to reach the collector before it drops
# them: a server's or worker's shutdown must not wait on a collector that is down.
STOP_BUDGET_SECONDS = 2.0

# Longer statements are cut in db.query.text: the text is the parameterized SQL, never values.
_MAX_QUERY_TEXT = 2000


def configured() -> bool:
    """Whether the standard OpenTelemetry environment asks for traces to be exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def start(service_name: str) -> bool:
    """Turns tracing on when the environment asks for it; True when it did (then call stop()).

    The first start in a process makes the provider, and its service_name names the
    resource unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name it.
    """
    global tracer, _provider, _processor, _users
    if _provider is None:
        if not configured():
            return False
        # Imported here: a process that does not trace never loads the SDK or the exporter.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: service_name}))
        _provider = TracerProvider(resource=resource)
        _processor = BatchSpanProcessor(OTLPSpanExporter())
        _provider.add_span_processor(_processor)
        tracer = _provider.get_tracer("mediavault")
    _users += 1
    return True


async def stop() -> None:
    """Ends what start() began; the last user's stop exports the spans still buffered, for at
    most STOP_BUDGET_SECONDS."""
    global tracer, _provider, _processor, _users
    _users -= 1
    if _users > 0 or _provider is None or _processor is None:
        return
    provider, processor = _provider, _processor
    _provider, _processor, tracer = None, None, None
    # The exports block their thread: not on the loop.
    await asyncio.to_thread(_shut_down, provider, processor)


def _shut_down(provider: TracerProvider, processor: BatchSpanProcessor) -> None:
    # BatchSpanProcessor.shutdown() waits for its thread's last exports as long as the SDK's
    # default limit, far longer than a drain, and each export retries a collector that is down
    # until OTEL_EXPORTER_OTLP_TIMEOUT. The batch processor underneath takes a limit: past it,
    # it shuts the exporter down, which ends the retries and the call in flight, and what is
    # left in the queue is dropped. force_flush is no way round: the SDK ignores its timeout.
    processor._batch_processor.shutdown(timeout_millis=int(STOP_BUDGET_SECONDS * 1000))
    provider.shutdown()


def _recording_parent() -> bool:
    return trace.get_current_span().is_recording()


# RPCs -------------------------------------------------------------------------------------


class RpcSpan:
    """The server span of one call, current from start_rpc until end."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span, token: object) -> None:
        self._span = span
        self._token = token

    def end(self, *, status_code: int, outcome: str, user_id: str | None) -> None:
        span = self._span
        span.set_attribute("rpc.grpc.status_code", status_code)
        span.set_attribute("mediavault.outcome", outcome)
        if user_id is not None:
            span.set_attribute("enduser.id", user_id)
        if outcome != "OK":
            span.set_status(Status(StatusCode.ERROR, outcome))
        otel_context.detach(self._token)  # type: ignore[arg-type]  # the token attach() returned
        span.end()


def start_rpc(service: str, method: str, metadata: Any, request_id: str) -> RpcSpan | None:
    """The server span of one call (None while tracing is off); its parent is the caller's W3C traceparent, if any."""
    if tracer is None:
        return None
    carrier = {key: value for key, value in metadata if isinstance(value, str) and key in ("traceparent", "tracestate")}
    parent = propagate.extract(carrier) if carrier else None
    span = tracer.start_span(
        f"{service}/{method}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, "mediavault.request_id": request_id},
    )
    return RpcSpan(span, otel_context.attach(trace.set_span_in_context(span, parent)))


# HTTP requests (the listener: mediavault.blobs.http, mediavault.tus) ---------------------------

# The methods OpenTelemetry's HTTP conventions name; any other is _OTHER, its name kept apart.
_HTTP_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
# error.type of a request whose connection was lost before its answer was sent.
CLIENT_DISCONNECTED = "client_disconnected"


class HttpSpan:
    """The server span of one HTTP request: current inside current(), which the answer to
    Expect: 100-continue and the handler enter one after the other, and ended once by end()."""

    __slots__ = ("_context", "_span")

    def __init__(self, span: Span, context: otel_context.Context) -> None:
        self._span = span
        self._context = context

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        token = otel_context.attach(self._context)
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self, status_code: int | None, error: BaseException | str | None = None) -> None:
        """Ends the span: status_code is the answer's (None when none was sent); error, what failed
        (an exception, or a name such as CLIENT_DISCONNECTED), makes it an error, as a 5xx does."""
        span = self._span
        if status_code is not None:
            span.set_attribute("http.response.status_code", status_code)
        if isinstance(error, BaseException):
            span.record_exception(error)
            error = type(error).__qualname__
        elif error is None and status_code is not None and status_code >= 500:
            error = str(status_code)
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


def start_http(method: str, route: str | None, path: str, scheme: str, headers: Mapping[str, str], request_id: str) -> HttpSpan | None:
    """The server span of one HTTP request (None while tracing is off), named and described by
    OpenTelemetry's HTTP conventions; its parent is the caller's W3C traceparent header, if any.

    path is the URL's path alone: the query of a signed URL holds its signature, a credential."""
    if tracer is None:
        return None
    known = method if method in _HTTP_METHODS else "_OTHER"
    attributes = {"http.request.method": known, "url.path": path, "url.scheme": scheme, "mediavault.request_id": request_id}
    if known != method:
        attributes["http.request.method_original"] = method
    if route is not None:
        attributes["http.route"] = route
    parent = propagate.extract(headers) if "traceparent" in headers else None
    name = "HTTP" if known == "_OTHER" else known
    span = tracer.start_span(f"{name} {route}" if route else name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    return HttpSpan(span, trace.set_span_in_context(span, parent))


# Batches (mediavault.batching) --------------------------------------------------------------


def submitter() -> SpanContext | None:
    """What a Batcher keeps of a submission: the span it was submitted in."""
    return trace.get_current_span().get_span_context() if tracer is not None else None


@contextlib.contextmanager
def batch_span(name: str, submitters: Sequence[SpanContext | None]) -> Iterator[None]:
    """Runs a batch in a span of the first traced submitter's trace, linked to every other one.

    Without a traced submitter the batch runs outside any trace, whatever trace started the
    task that drains the batches.
    """
    traced = [sc for sc in submitters if sc is not None and sc.is_valid]
    if tracer is None or not traced:
        token = otel_context.attach(trace.set_span_in_context(trace.INVALID_SPAN))
        try:
            yield
        finally:
            otel_context.detach(token)
        return
    parent = trace.set_span_in_context(NonRecordingSpan(traced[0]))
    links = [Link(sc) for sc in traced[1:]]
    with tracer.start_as_current_span(
        f"batch {name}", context=parent, links=links, attributes={"mediavault.batch.size": len(submitters)}
    ):
        yield


# The transcode queue (mediavault.jobs, workers.transcode) -----------------------------------


@contextlib.contextmanager
def enqueue_span(function: str, job_id: str, queue_name: str) -> Iterator[dict[str, str] | None]:
    """The producer span of one job; yields the trace context (W3C traceparent) the job carries, None when off."""
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(
        f"enqueue {function}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "arq",
            "messaging.operation.type": "send",
            "messaging.destination.name": queue_name,
            "messaging.message.id": job_id,
        },
    ):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield carrier


@contextlib.contextmanager
def job_span(function: str, carried: Mapping[str, str] | None, job_id: str, job_try: int) -> Iterator[None]:
    """The consumer span of one job run, a child of the enqueue span whose context the job carried."""
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(
        f"process {function}",
        context=propagate.extract(dict(carried)) if carried else otel_context.Context(),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "arq",
            "messaging.operation.type": "process",
            "messaging.message.id": job_id,
            "mediavault.job_try": job_try,
        },
    ):
        yield


def mark_failed(description: str) -> None:
    """Marks the current span failed, for a failure handled without an exception."""
    trace.get_current_span().set_status(Status(StatusCode.ERROR, description))


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Span | None]:
    """An internal span of the current trace (the transcode); None when off or outside a trace."""
    if tracer is None or not _recording_parent():
        yield None
        return
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


# The database -------------------------------------------------------------------------------


def _operation(query: str) -> str:
    words = query.lstrip(" \t\r\n(").split(None, 1)
    return words[0].rstrip(";").upper() if words else "SQL"


class TracedConnection(asyncpg.Connection):
    """An asyncpg connection whose statements are client spans of the current trace.

    db.pool makes its connections of this class only while tracing is on.
    """

    def _span(self, query: str) -> contextlib.AbstractContextManager[Any]:
        if tracer is None or not _recording_parent():
            return contextlib.nullcontext()
        operation = _operation(query)
        return tracer.start_as_current_span(
            operation,
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": "postgresql",
                "db.operation.name": operation,
                "db.query.text": query[:_MAX_QUERY_TEXT],
            },
        )

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        with self._span(query):
            return await super().execute(query, *args, **kwargs)

    async def executemany(self, command: str, args: Any, **kwargs: Any) -> Any:
        with self._span(command):
            return await super().executemany(command, args, **kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        with self._span(query):
            return await super().fetch(query, *args, **kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        with self._span(query):
            return await super().fetchrow(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        with self._span(query):
            return await super().fetchval(query, *args, **kwargs)


# The blob store -----------------------------------------------------------------------------


def traced_blobs(store: BlobStore, backend: str) -> BlobStore:
    """The store itself while tracing is off; else one whose calls are client spans of the current trace."""
    if tracer is None:
        return store
    # A store clients send parts to directly stays one after wrapping (isinstance(..., DirectParts)).
    return TracedDirectPartsStore(store, backend) if isinstance(store, DirectParts) else TracedBlobStore(store, backend)


class TracedBlobStore:
    def __init__(self, store: BlobStore, backend: str) -> None:
        self._store = store
        self._backend = backend

    def _span(self, operation: str, key: str) -> contextlib.AbstractContextManager[Span | None]:
        if tracer is None or not _recording_parent():
            return contextlib.nullcontext()
        return tracer.start_as_current_span(
            f"blob {operation}",
            kind=SpanKind.CLIENT,
            attributes={"mediavault.blob.backend": self._backend, "mediavault.blob.operation": operation, "mediavault.blob.key": key},
        )

    async def presign_put(self, key: str, *, size_bytes: int, content_type: str, sha256: str | None, expires_in: int) -> SignedRequest:
        with self._span("presign_put", key):
            return await self._store.presign_put(
                key, size_bytes=size_bytes, content_type=content_type, sha256=sha256, expires_in=expires_in
            )

    async def presign_get(self, key: str, *, expires_in: int, content_type: str | None = None) -> str:
        with self._span("presign_get", key):
            return await self._store.presign_get(key, expires_in=expires_in, content_type=content_type)

    async def stat(self, key: str) -> ObjectInfo | None:
        with self._span("stat", key):
            return await self._store.stat(key)

    async def inspect(self, key: str, head_length: int) -> Inspection | None:
        with self._span("inspect", key) as current:
            inspection = await self._store.inspect(key, head_length)
            if current is not None and inspection is not None:
                current.set_attribute("mediavault.blob.size", inspection.size)
            return inspection

    async def read(self, key: str) -> bytes:
        with self._span("read", key) as current:
            data = await self._store.read(key)
            if current is not None:
                current.set_attribute("mediavault.blob.size", len(data))
            return data

    async def download(self, key: str, path: Path) -> int:
        with self._span("download", key) as current:
            size = await self._store.download(key, path)
            if current is not None:
                current.set_attribute("mediavault.blob.size", size)
            return size

    async def write(self, key: str, chunks: AsyncIterable[bytes], *, content_type: str, create_only: bool = False) -> int:
        with self._span("write", key) as current:
            size = await self._store.write(key, chunks, content_type=content_type, create_only=create_only)
            if current is not None:
                current.set_attribute("mediavault.blob.size", size)
            return size

    async def delete(self, key: str) -> None:
        with self._span("delete", key):
            await self._store.delete(key)

    async def delete_many(self, keys: list[str]) -> list[str]:
        with self._span("delete_many", keys[0] if keys else "") as current:
            if current is not None:
                current.set_attribute("mediavault.blob.count", len(keys))
            return await self._store.delete_many(keys)

    async def list_page(self, prefix: str, *, after: str | None, limit: int) -> list[ListedObject]:
        with self._span("list_page", prefix):
            return await self._store.list_page(prefix, after=after, limit=limit)

    async def move(self, key: str, new_key: str) -> None:
        with self._span("move", key):
            await self._store.move(key, new_key)

    async def close(self) -> None:
        await self._store.close()

    @property
    def partial_part_size(self) -> int | None:
        return self._store.partial_part_size

    async def start_partial(self, key: str, *, content_type: str) -> str | None:
        with self._span("start_partial", key):
            return await self._store.start_partial(key, content_type=content_type)

    async def open_partial(
        self, partial_key: str, key: str, multipart_id: str | None, state: PartialState, digest: Digest
    ) -> PartialWriter:
        with self._span("open_partial", key):
            return await self._store.open_partial(partial_key, key, multipart_id, state, digest)

    async def publish_partial(self, partial_key: str, key: str, multipart_id: str | None, state: PartialState) -> None:
        with self._span("publish_partial", key):
            await self._store.publish_partial(partial_key, key, multipart_id, state)

    async def discard_partial(self, partial_key: str, key: str, multipart_id: str | None) -> None:
        with self._span("discard_partial", key):
            await self._store.discard_partial(partial_key, key, multipart_id)

    async def list_multipart_uploads(self, prefix: str, *, after: MultipartUpload | None, limit: int) -> list[MultipartUpload]:
        with self._span("list_multipart_uploads", prefix):
            return await self._store.list_multipart_uploads(prefix, after=after, limit=limit)

    async def abort_multipart_upload(self, key: str, multipart_id: str) -> None:
        with self._span("abort_multipart_upload", key):
            await self._store.abort_multipart_upload(key, multipart_id)


class TracedDirectPartsStore(TracedBlobStore):
    def __init__(self, store: BlobStore, backend: str) -> None:
        super().__init__(store, backend)
        assert isinstance(store, DirectParts)
        self._parts: DirectParts = store

    async def presign_upload_part(
        self, key: str, multipart_id: str, number: int, *, size_bytes: int, sha256: str | None, expires_in: int
    ) -> SignedRequest:
        with self._span("presign_upload_part", key):
            return await self._parts.presign_upload_part(
                key, multipart_id, number, size_bytes=size_bytes, sha256=sha256, expires_in=expires_in
            )

    async def list_parts(self, key: str, multipart_id: str) -> list[StoredPart]:
        with self._span("list_parts", key):
            return await self._parts.list_parts(key, multipart_id)

    async def complete_parts(self, key: str, multipart_id: str, parts: list[StoredPart]) -> None:
        with self._span("complete_parts", key):
            await self._parts.complete_parts(key, multipart_id, parts)

