"""The service's HTTP listener: on the fs backend it serves signed PUT and GET URLs like S3
presigned URLs do; on both backends it carries the tus endpoints (mediavault.tus).

PUT needs the signed Content-Length and Content-Type, streams the body to a temp file,
cuts off anything past the signed length and publishes the object only when complete,
and only once (a second PUT to the same key is 412, as S3's If-None-Match: *). A body that stops
coming is held to the tus PATCH's rule (pacing.making_progress): refused (400), nothing stored, so
that it holds neither its connection nor a temp file for as long as the client keeps it; one cut
off (the client gone) is refused as short (400), nothing stored, as a tus creation cut off is. It hashes
the body as it arrives: a body that differs from a signed SHA-256 is refused (400 BadDigest,
as S3 refuses one that differs from a signed x-amz-checksum-sha256), and the digest is recorded
with the object, so FinalizeUpload does not read the object again. Like S3's, its 200 means the
object is durable: its bytes and its name are synced first. A PUT that asks before sending its
body (Expect: 100-continue) is answered its refusal, when it has one, instead of 100 Continue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import _default_expect_handler

from mediavault import logs, metrics, tracing
from mediavault.blobs.fs import FileWriter, FsBlobStore, remove_quietly
from mediavault.pacing import making_progress

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
# Variant keys are versioned per processing run, so their bytes never change.
IMMUTABLE_PREFIX = "variants/"


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


_STORE = web.AppKey("store", FsBlobStore)
# Not traced: a load balancer's probe every few seconds would make a trace each, as the gRPC health checks do not.
_HEALTH_ROUTE = "/healthz"
_IDLE_SECONDS = web.AppKey("idle_seconds", float)


def create_app(store: FsBlobStore | None, *, idle_seconds: float) -> web.Application:
    """The listener's application; the blob routes only when the fs backend serves the blobs.

    idle_seconds: how long a PUT's body may keep the listener waiting without bringing
    pacing.MIN_PROGRESS_BYTES before it is refused (TUS_IDLE_TIMEOUT_SECONDS)."""
    app = web.Application(client_max_size=0, middlewares=[_served])
    app.on_response_prepare.append(_answer_request_id)
    app.on_response_prepare.append(_count_answer)
    if store is not None:
        app[_STORE] = store
        app[_IDLE_SECONDS] = idle_seconds
        app.router.add_put(r"/blobs/{key:[a-z0-9][a-z0-9_./\-]*}", _put_object, expect_handler=expecting(_expect_put))
        app.router.add_get(r"/blobs/{key:[a-z0-9][a-z0-9_./\-]*}", _get_object)
    app.router.add_get(_HEALTH_ROUTE, _healthz)
    return app


_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID = web.RequestKey("request_id", str)
_SPAN = web.RequestKey("span", tracing.HttpSpan)
# Set on a request whose handler failed unexpectedly, once that failure is logged.
_FAILED = web.RequestKey("failed", bool)
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def _request_id_of(request: web.Request) -> str:
    """The id the request is known by, as a gRPC call's is (logs.request_id_for): its X-Request-Id, or one made for it."""
    if _REQUEST_ID not in request:
        request[_REQUEST_ID] = logs.request_id_for(request.headers.get("X-Request-Id"))
    return request[_REQUEST_ID]


def _route_of(request: web.Request) -> str | None:
    """The route's pattern, never the path: upload ids and object keys would make a metric series, and a span name, each."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


@contextlib.contextmanager
def _serving(request: web.Request) -> Iterator[None]:
    """The request's id on every log line written meanwhile, and its span, while tracing is on, the current one."""
    token = logs.request_id.set(_request_id_of(request))
    try:
        span = request.get(_SPAN)
        if span is None:
            yield
        else:
            with span.current():
                yield
    finally:
        logs.request_id.reset(token)


async def _handled(request: web.Request, handler: ExpectHandler, *, may_continue: bool) -> web.StreamResponse | None:
    """handler(request)'s answer, under the request's id and in its span, which ends with the
    answer, or with the handler when it fails or is cancelled (the server's shutdown); when
    may_continue, handler is an expect handler (expecting), whose answer is given before the body
    (_answer_expectation), and a None answer leaves the span to the request's handler.

    A failure that is no answer (anything but an HTTPException) is logged here, under the
    request's id, and answered 500: left to aiohttp, it was logged outside the request's context."""
    span = request.get(_SPAN)
    if span is None and tracing.tracer is not None and (route := _route_of(request)) != _HEALTH_ROUTE:
        span = tracing.start_http(request.method, route, request.path, request.scheme, request.headers, _request_id_of(request))
        if span is not None:
            request[_SPAN] = span
    answer: web.StreamResponse | None = None
    failure: BaseException | None = None
    try:
        with _serving(request):
            try:
                answer = await handler(request)
                if may_continue:
                    await _answer_expectation(request, answer)
            except web.HTTPException as refusal:  # aiohttp's own answers (404, 405) are raised
                answer = refusal
                raise
            except Exception as error:
                failure = error
                answer = _failed(request, error)
    except BaseException as error:
        if answer is None:  # cancelled (the server's shutdown)
            failure = error
        raise
    finally:
        if span is not None and not (may_continue and answer is None and failure is None):
            if request.transport is None:
                # The connection is gone: no answer reaches the client, whatever the handler made of it.
                span.end(None, tracing.CLIENT_DISCONNECTED)
            else:
                span.end(answer.status if answer is not None else None, failure)
    return answer


async def _answer_expectation(request: web.Request, refusal: web.StreamResponse | None) -> None:
    """Answers a request that asks before sending its body (Expect: 100-continue): its refusal,
    when it has one, so that the client does not send a body only to have it refused, or else 100
    Continue, as aiohttp answers it. A refusal ends the connection (Connection: close): on a kept
    one, the client's next request would be read as the body it held back.

    The 100 Continue is sent, and waited for, here rather than by aiohttp, which waits next between
    the expect handler and the request's handler, before any middleware: a client gone meanwhile
    (writing to its closed connection, or the wait failing while its writes were paused) raised
    there, which skipped the handler, and the span's end with it, and was aiohttp's "Error handling
    request" and a 500. Here a client gone is left to the request's handler: its body ends at once
    as a cut one does, the handler undoes what the expect handler did for it (a tus creation is
    released), and aiohttp's own wait then passes, the connection closed."""
    if refusal is not None:
        refusal.force_close()
        return
    with contextlib.suppress(ConnectionError):
        await _default_expect_handler(request)
        await request.writer.drain()


def _failed(request: web.Request, error: Exception) -> web.Response:
    method, route = _method_of(request), _route_of(request) or "unmatched"
    log.error("http request failed", exc_info=error, extra={"route": route, "method": method, "status": 500})
    request[_FAILED] = True
    response = web.Response(status=500, text="500: Internal Server Error")
    # As aiohttp ends the connection after a failure: the body may be left unread.
    response.force_close()
    return response


@web.middleware
async def _served(request: web.Request, handler: Handler) -> web.StreamResponse:
    answer = await _handled(request, handler, may_continue=False)
    assert answer is not None
    return answer


def expecting(expect_handler: ExpectHandler) -> ExpectHandler:
    """A route's expect handler (Expect: 100-continue), which runs before any middleware does,
    as the request's handler does: it may do the request's work (a tus creation). expect_handler
    returns the request's refusal, or None to have its body sent (see _answer_expectation)."""

    async def handle(request: web.Request) -> web.StreamResponse | None:
        return await _handled(request, expect_handler, may_continue=True)

    return handle


async def _answer_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # Here rather than in the middleware, so that every answer carries it: refusals given before
    # the body and aiohttp's own (404, 405, a handler's failure, 500) too.
    response.headers["X-Request-Id"] = _request_id_of(request)


def _method_of(request: web.Request) -> str:
    return request.method if request.method in _METHODS else "OTHER"


async def _count_answer(request: web.Request, response: web.StreamResponse) -> None:
    """Counts every answer of the listener as it starts, a refusal given before the body
    (Expect: 100-continue) included, which no middleware sees."""
    route, method = _route_of(request) or "unmatched", _method_of(request)
    metrics.HTTP_REQUESTS.labels(route, method, str(response.status)).inc()
    # A failure _failed logged already, with its traceback, is not logged twice.
    if response.status >= 500 and _FAILED not in request:
        with _serving(request):
            log.warning("http request failed", extra={"route": route, "method": method, "status": response.status})


def _put_refusal(request: web.Request, store: FsBlobStore, key: str) -> web.Response | None:
    """Why the PUT may not store its body under key, as the error response; None when it may."""
    problem = store.signer.verify("PUT", key, dict(request.query))
    if problem:
        return _error(403, "SignatureDoesNotMatch" if "signature" in problem else "AccessDenied", problem)
    if request.content_length is None:
        return _error(411, "MissingContentLength", "Content-Length is required")
    if request.content_length != int(request.query.get("X-Length", "-1")):
        return _error(403, "SignatureDoesNotMatch", "Content-Length differs from the signed length")
    if request.headers.get("Content-Type", "") != request.query.get("X-Content-Type", ""):
        return _error(403, "SignatureDoesNotMatch", "Content-Type differs from the signed type")
    if store.exists(key):
        return _error(412, "PreconditionFailed", "object already uploaded")
    return None


async def _expect_put(request: web.Request) -> web.StreamResponse | None:
    return _put_refusal(request, request.app[_STORE], request.match_info["key"])


async def _put_object(request: web.Request) -> web.StreamResponse:
    store = request.app[_STORE]
    key = request.match_info["key"]
    refusal = _put_refusal(request, store, key)
    if refusal is not None:
        return refusal
    signed_length = int(request.query["X-Length"])
    tmp = store.new_temp_file()
    received = 0
    body_hash = hashlib.sha256()

    def digest(batch: list[bytes]) -> None:
        for piece in batch:
            body_hash.update(piece)

    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        writer = FileWriter(fd, digest)
        try:
            async for chunk in making_progress(Body(request).chunks(), request.app[_IDLE_SECONDS]):
                received += len(chunk)
                if received > signed_length:
                    return _error(400, "EntityTooLarge", "body exceeds the signed length")
                await writer.write(chunk)
            if received != signed_length:
                return _error(400, "IncompleteBody", "body shorter than the signed length")
            # A 200 says the object is stored, as S3's does: its bytes are on disk before it.
            await writer.sync()
        finally:
            await writer.settle()
            os.close(fd)
        sha256 = body_hash.hexdigest()
        if sha256 != request.query.get("X-Sha256", sha256):
            return _error(400, "BadDigest", "body does not match the signed SHA-256")
        if not await asyncio.to_thread(store.publish_new, tmp, key, sha256=sha256):
            return _error(412, "PreconditionFailed", "object already uploaded")
    finally:
        remove_quietly(tmp)
    return web.Response(status=200)


class Body:
    """A request's body as chunks: a connection cut mid-body (the client gone, a phone losing signal)
    just ends them, what arrived kept, and cut says so; its handler answers it as a body that stops
    short, never as a server error."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.cut = False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while data := await self._request.content.read(_CHUNK):
                yield data
        except (OSError, HttpProcessingError):
            self.cut = True


async def _get_object(request: web.Request) -> web.StreamResponse:
    store = request.app[_STORE]
    key = request.match_info["key"]
    problem = store.signer.verify("GET", key, dict(request.query))
    if problem:
        return _error(403, "AccessDenied", problem)
    path = store.path(key)
    if not path.is_file():
        return _error(404, "NoSuchKey", "no such object")
    # FileResponse answers If-None-Match with 304 from its ETag (mtime and size).
    response = web.FileResponse(path, chunk_size=_CHUNK)
    content_type = request.query.get("X-Content-Type")
    if content_type:
        response.content_type = content_type
    response.headers["X-Content-Type-Options"] = "nosniff"
    if key.startswith(IMMUTABLE_PREFIX):
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    else:
        response.headers["Cache-Control"] = "private, max-age=3600"
    return response


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")
