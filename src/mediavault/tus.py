"""tus 1.0.0 on the service's HTTP listener: HTTP in, one call on a domain service, HTTP out.

Extensions: creation (POST with the same bearer JWT as gRPC), creation-with-upload (the POST's
body is the upload's first chunk, stored as a PATCH at offset 0 stores it), checksum (sha1, sha256),
expiration (Upload-Expires: the reservation's expiry) and termination (DELETE = FailUpload); not
creation-defer-length nor concatenation, whose creations are refused 400.
An upload URL is signed for its upload alone (domain.uploads.resumable), so HEAD, PATCH
and DELETE need no other credential; it names its owner, whose rate limits they spend (tus/HEAD,
tus/PATCH, tus/DELETE) before any statement runs. A finalized upload stays a complete tus upload (HEAD: its
Upload-Offset is its Upload-Length, so a client resuming it is done at once) that takes no more
bytes and is not terminated (DELETE: 403; it is media now, which DeleteMedia deletes); a failed or
expired one is gone (410), as is any request on its URL once past its expiry, the reservation's. Which replica takes a chunk does not matter: the offset, the hash state
and the writer's lock live in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from aiohttp import web

from mediavault.admission import Admission
from mediavault.auth import Principal
from mediavault.blobs.http import Body, expecting
from mediavault.blobs.signing import URL_EXPIRED, signed_owner
from mediavault.config import Settings
from mediavault.domain.uploads import BeginRequest, ChunkChecksum, Resumable, Uploads
from mediavault.domain.uploads.resumable import CHECKSUM_ALGORITHMS, TUS_ROUTE, TUS_VERSION, Progress, check_writable
from mediavault.errors import (
    AccountFrozen,
    BeyondDeclaredSize,
    BlobStoreUnavailable,
    ChunkChecksumMismatch,
    InvalidArgument,
    MediavaultError,
    NotFound,
    OffsetMismatch,
    RateLimited,
    StorageLimitReached,
    Unauthenticated,
    UploadBusy,
    UploadNotPending,
    WritersBusy,
)
from mediavault.pacing import making_progress

log = logging.getLogger(__name__)

_OFFSET_TYPE = "application/offset+octet-stream"
_EXTENSIONS = "creation,creation-with-upload,expiration,termination,checksum"
# 460 Checksum Mismatch: the tus checksum extension's own status.
_CHECKSUM_MISMATCH = 460
_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_CREATION_LIMITED_AS = "StorageService/BeginUpload"
# The creation headers of extensions not offered, each refused (400) before anything is reserved:
# made an ordinary upload, such a creation is not what its client asked for. A concatenation's
# part would reserve its bytes for a final creation refused once every part is sent (tus-js-client's
# parallelUploads); the whole length is reserved at creation, so it cannot be deferred, and
# Upload-Defer-Length beside an Upload-Length leaves which one holds unsaid.
_NOT_OFFERED = {"Upload-Concat": "concatenation", "Upload-Defer-Length": "creation-defer-length"}
_CORS_METHODS = "POST, HEAD, PATCH, DELETE, OPTIONS"
# What the creation URL and an upload URL answer; a POST is one of these by its X-HTTP-Method-Override.
_CREATION_URL_METHODS = "POST, OPTIONS"
_UPLOAD_URL_METHODS = "HEAD, PATCH, DELETE, OPTIONS"
_CORS_HEADERS = (
    "Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Metadata, Upload-Offset, "
    "Upload-Checksum, Upload-Defer-Length, Upload-Concat, X-HTTP-Method-Override, X-Requested-With"
)
_CORS_EXPOSED = "Location, X-Request-Id, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm, Upload-Offset, Upload-Length, Upload-Expires, Upload-Metadata"

# Statuses of the domain errors a tus request can meet.
_STATUS: dict[type[MediavaultError], int] = {
    Unauthenticated: 401,
    AccountFrozen: 403,
    NotFound: 404,
    OffsetMismatch: 409,
    UploadNotPending: 410,
    BeyondDeclaredSize: 413,
    StorageLimitReached: 413,
    UploadBusy: 423,
    RateLimited: 429,
    ChunkChecksumMismatch: _CHECKSUM_MISMATCH,
    InvalidArgument: 400,
    # 503, which tus-js-client and Uppy retry by default, as they do 423.
    WritersBusy: 503,
    BlobStoreUnavailable: 503,
}


# The failures of a creation's first chunk that tus clients retry (503, 423): the creation is
# answered 201 with the offset its upload kept, and the client goes on with PATCHes at the Location it
# was told, where a failure that lasts meets it again. Answered as themselves, they would have
# tus-js-client and Uppy, which read Location only from a 2xx creation answer, create another upload
# on their retry, and this one stay reserved until it expired.
_PASSING_FAILURES = (WritersBusy, BlobStoreUnavailable, UploadBusy)

_Answer = TypeVar("_Answer")


@dataclass(frozen=True)
class _Creation:
    """An upload a tus creation made, and the headers its answer carries whatever becomes of its body."""

    upload_id: uuid.UUID
    owner: str
    headers: dict[str, str]
    # creation-with-upload: whether the body is the upload's first chunk, and that chunk's Upload-Checksum.
    carries_chunk: bool
    checksum: ChunkChecksum | None


# The creation a POST that asked before sending its body (Expect: 100-continue) made before its answer.
_CREATION = web.RequestKey("tus_creation", _Creation)


@dataclass(frozen=True)
class _Admitted:
    """The upload a request's URL is signed for, and the rate-limit headers of the budget it spent."""

    upload_id: uuid.UUID
    limits: tuple[tuple[str, str], ...]


# The admission a PATCH that asked before sending its body (Expect: 100-continue) was given then.
_ADMITTED = web.RequestKey("tus_admitted", _Admitted)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _http_date(moment: datetime) -> str:
    return email.utils.format_datetime(moment, usegmt=True)


class TusEndpoints:
    def __init__(self, resumable: Resumable, uploads: Uploads, admission: Admission, settings: Settings) -> None:
        self._resumable = resumable
        self._uploads = uploads
        self._admission = admission
        self._max_size = settings.tus_max_size
        self._idle_seconds = settings.tus_idle_timeout_seconds
        self._origins = frozenset(settings.tus_cors_origins)

    def add_routes(self, app: web.Application) -> None:
        base = f"/{TUS_ROUTE}"
        one = rf"{base}/{{upload_id:{_UUID}}}"
        app.router.add_route("OPTIONS", base, self._options)
        app.router.add_route("OPTIONS", base + "/", self._options)
        app.router.add_route("OPTIONS", one, self._options)
        # tus core: X-HTTP-Method-Override, when present, is the request's method whatever was sent
        # (a POST standing for a PATCH, from clients and proxies that cannot send PATCH), so one
        # handler per URL takes every method but OPTIONS and dispatches on the method it stands for.
        app.router.add_route("*", base, self._creation_url, expect_handler=expecting(self._expect_creation))
        app.router.add_route("*", base + "/", self._creation_url, expect_handler=expecting(self._expect_creation))
        app.router.add_route("*", one, self._upload_url, expect_handler=expecting(self._expect))

    def _respond(self, request: web.Request, status: int, headers: dict[str, str] | None = None, text: str | None = None) -> web.Response:
        response = web.Response(status=status, text=text, headers={"Tus-Resumable": TUS_VERSION, **(headers or {})})
        origin = request.headers.get("Origin")
        if origin and ("*" in self._origins or origin in self._origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSED
            response.headers["Vary"] = "Origin"
        return response

    async def _options(self, request: web.Request) -> web.Response:
        headers = {
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": _EXTENSIONS,
            "Tus-Max-Size": str(self._max_size),
            "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
        }
        response = self._respond(request, 204, headers)
        if "Access-Control-Allow-Origin" in response.headers:
            response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = _CORS_HEADERS
            response.headers["Access-Control-Max-Age"] = "86400"
        return response

    async def _handle(self, request: web.Request, action: Callable[[web.Request], Awaitable[_Answer]]) -> _Answer | web.Response:
        """Runs action(request) with the checks every tus request shares; errors become statuses."""
        if request.headers.get("Tus-Resumable") != TUS_VERSION:
            return self._respond(request, 412, {"Tus-Version": TUS_VERSION}, "Tus-Resumable must be 1.0.0")
        try:
            return await action(request)
        except _Refused as refused:
            return self._respond(request, refused.status, text=refused.message)
        except MediavaultError as error:
            return self._refusal(request, error)

    def _refusal(self, request: web.Request, error: MediavaultError) -> web.Response:
        headers = {}
        if isinstance(error, OffsetMismatch):
            headers["Upload-Offset"] = error.metadata["offset"]
        if isinstance(error, RateLimited):
            headers.update(error.decision.metadata())
        if isinstance(error, WritersBusy):
            headers["Retry-After"] = str(error.retry_after_seconds)
        return self._respond(request, _status(error), headers, error.message)

    def _signed_upload_id(self, request: web.Request) -> uuid.UUID:
        upload_id = request.match_info["upload_id"]
        problem = self._resumable.verify_url(upload_id, dict(request.query))
        if problem:
            # tus expiration: an upload URL is signed until its reservation expires, and requests for
            # an expired upload are answered that it is gone (410), which tus clients take for an
            # end rather than a credential to fix; a URL not signed as it stands stays forbidden.
            raise _Refused(410 if problem == URL_EXPIRED else 403, problem)
        return uuid.UUID(upload_id)

    def _not_allowed(self, request: web.Request, url: str, method: str, allowed: str) -> web.Response:
        # Quoted: a header's bytes that are not UTF-8 come as surrogate escapes, which a body cannot carry.
        return self._respond(request, 405, {"Allow": allowed}, f"{url} takes no {method!r}")

    async def _creation_url(self, request: web.Request) -> web.Response:
        method = _method(request)
        if method == "OPTIONS":
            return await self._options(request)
        if method != "POST":
            return self._not_allowed(request, "the creation URL", method, _CREATION_URL_METHODS)
        return await self._handle(request, self._create_upload)

    async def _create_upload(self, request: web.Request) -> web.Response:
        # Made already when the POST asked before sending its body (_expect_creation).
        creation = request.get(_CREATION) or await self._create(request)
        if not creation.carries_chunk:
            return self._respond(request, 201, creation.headers)
        return await self._store_first_chunk(request, creation)

    async def _create(self, request: web.Request) -> _Creation:
        # A creation is a BeginUpload: the same authentication, rate limit (the BeginUpload
        # limits, whichever way the upload begins) and freeze.
        credentials = [("authorization", request.headers.get("Authorization", "")), *_forwarded_for(request)]
        principal, limits = await self._admission.admit(_CREATION_LIMITED_AS, credentials, request.remote or "")
        for header, extension in _NOT_OFFERED.items():
            if header in request.headers:
                raise _Refused(400, f"{header}: the {extension} extension is not supported")
        length = _non_negative(request.headers.get("Upload-Length"), "Upload-Length")
        if length is None:
            raise _Refused(400, "Upload-Length is required")
        if length > self._max_size:
            raise _Refused(413, f"Upload-Length exceeds Tus-Max-Size {self._max_size}")
        carries_chunk, checksum = _first_chunk_head(request, length)
        raw_metadata = request.headers.get("Upload-Metadata")
        metadata = _metadata(raw_metadata or "")
        result = await self._uploads.begin(
            principal,
            BeginRequest(
                filename=metadata.get("filename", ""),
                content_type=metadata.get("filetype", ""),
                size_bytes=length,
                sha256=None,
                idempotency_key=None,
                retention="permanent",
                protocol="tus",
                tus_metadata=raw_metadata,
            ),
        )
        headers = {"Location": result.upload_url, "Upload-Expires": _http_date(result.upload.expires_at), **dict(limits)}
        return _Creation(result.upload.upload_id, result.upload.user_id, headers, carries_chunk, checksum)

    async def _store_first_chunk(self, request: web.Request, creation: _Creation) -> web.Response:
        """creation-with-upload: the body is appended as a PATCH at offset 0 appends its chunk, and the
        creation answered 201 with the offset kept, as the PATCH's 204 would be. A refusal of the body
        (460, 413, ...) is answered as the PATCH's, with Location and the offset beside it: the upload
        exists, and the client may go on with it. A failure tus clients retry is answered 201 (see
        _PASSING_FAILURES). A body cut off (the connection lost, the server shutting down) leaves the
        creation unanswered, and its Location, told only there, with it: no one could go on with the
        upload, which is released, as a creation that fails before its answer is, rather than left
        reserved until it expires while the client, told nothing, creates another."""
        body = Body(request)
        progress: Progress | None = None
        failure: MediavaultError | None = None
        try:
            progress = await self._append(request, body, creation.upload_id, offset=0, checksum=creation.checksum)
        except MediavaultError as error:
            failure = error
        except asyncio.CancelledError:
            # In a task of its own, which a second cancellation does not stop.
            await asyncio.shield(asyncio.ensure_future(self._release_unanswered(creation)))
            raise
        if body.cut:
            await self._release_unanswered(creation)
            raise _Refused(400, "the body was cut off before its end; the upload was released")
        if progress is None:
            progress = await self._resumable.progress(creation.upload_id)
        headers = creation.headers | _progress_headers(progress)
        if failure is not None and not isinstance(failure, _PASSING_FAILURES):
            response = self._refusal(request, failure)
            response.headers.update(headers)
            return response
        return self._respond(request, 201, headers)

    async def _release_unanswered(self, creation: _Creation) -> None:
        owner = Principal(creation.owner, frozenset())
        try:
            await self._uploads.fail(owner, creation.upload_id, "tus creation cut off before its answer")
        except Exception:  # the request ends either way; an unreleased reservation lapses at its expiry
            log.warning("cut-off tus creation not released", extra={"upload_id": str(creation.upload_id)}, exc_info=True)

    async def _upload_url(self, request: web.Request) -> web.Response:
        method = _method(request)
        if method == "OPTIONS":
            return await self._options(request)
        if method not in ("HEAD", "PATCH", "DELETE"):
            return self._not_allowed(request, "an upload URL", method, _UPLOAD_URL_METHODS)
        return await self._handle(request, functools.partial(self._admitted_upload_url, method))

    async def _admitted_upload_url(self, method: str, request: web.Request) -> web.Response:
        # Admitted already when the PATCH asked before sending its body (_check_patch).
        admitted = request.get(_ADMITTED) or await self._admitted(method, request)
        actions = {"HEAD": self._head_upload, "PATCH": self._patch_upload, "DELETE": self._delete_upload}
        response = await actions[method](request, admitted.upload_id)
        response.headers.extend(admitted.limits)
        return response

    async def _admitted(self, method: str, request: web.Request) -> _Admitted:
        """The upload the URL is signed for, and the rate-limit headers of its owner's budget, spent
        before any statement: each request on an upload URL costs the database at least one."""
        upload_id = self._signed_upload_id(request)
        limits = await self._admission.admit_signed_url(
            f"tus/{method}", signed_owner(dict(request.query)), _forwarded_for(request), request.remote or ""
        )
        return _Admitted(upload_id, limits)

    async def _head_upload(self, request: web.Request, upload_id: uuid.UUID) -> web.Response:
        progress = await self._resumable.progress(upload_id)
        # tus: HEAD always carries Upload-Offset, an upload's that is complete too.
        if progress.upload.state != "finalized":
            check_writable(progress)
        headers = _progress_headers(progress) | {"Cache-Control": "no-store"}
        # tus creation: the Upload-Metadata the upload was created with, as it came.
        if progress.tus_metadata:
            headers["Upload-Metadata"] = progress.tus_metadata
        return self._respond(request, 200, headers)

    def _patch_head(self, request: web.Request) -> tuple[int, ChunkChecksum | None]:
        """The PATCH's Upload-Offset and Upload-Checksum, from headers that pass."""
        if request.headers.get("Content-Type") != _OFFSET_TYPE:
            raise _Refused(415, f"Content-Type must be {_OFFSET_TYPE}")
        offset = _non_negative(request.headers.get("Upload-Offset"), "Upload-Offset")
        if offset is None:
            raise _Refused(400, "Upload-Offset is required")
        return offset, _checksum(request.headers.get("Upload-Checksum"))

    async def _patch_upload(self, request: web.Request, upload_id: uuid.UUID) -> web.Response:
        offset, checksum = self._patch_head(request)
        progress = await self._append(request, Body(request), upload_id, offset=offset, checksum=checksum)
        return self._respond(request, 204, _progress_headers(progress))

    async def _append(
        self, request: web.Request, body: Body, upload_id: uuid.UUID, *, offset: int, checksum: ChunkChecksum | None
    ) -> Progress:
        """Appends the request's body at offset: a PATCH's chunk, or a creation's first one."""
        return await self._resumable.append(
            upload_id,
            making_progress(body.chunks(), self._idle_seconds),
            offset=offset,
            length=request.content_length,
            checksum=checksum,
            # A frozen account writes nothing, through its signed URLs included, as UploadContent.
            owner_may_write=self._admission.refuse_frozen,
        )

    async def _expect_creation(self, request: web.Request) -> web.StreamResponse | None:
        """A creation that asks before sending its body (Expect: 100-continue) is made before 100
        Continue, so that one the creation refuses (its headers, its rate limit, the owner's quota)
        is answered that refusal before a byte of its body is sent; the POST then goes on with the
        upload made, having spent the BeginUpload budget once. A client gone before its 100 Continue
        is left to the POST (blobs.http.expecting), whose body is then cut off: the upload is released
        (_store_first_chunk) rather than left reserved, its Location never told."""
        if _method(request) == "POST" and request.headers.get("Expect", "").lower() == "100-continue":
            return await self._handle(request, self._create_before_body)
        return None

    async def _create_before_body(self, request: web.Request) -> None:
        request[_CREATION] = await self._create(request)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """A PATCH that asks before sending its chunk (Expect: 100-continue) is answered what
        _patch_upload would refuse it before reading a byte, instead of 100 Continue."""
        if _method(request) == "PATCH":
            return await self._handle(request, self._check_patch)
        return None

    async def _check_patch(self, request: web.Request) -> None:
        # The check reads the upload: it spends the PATCH's budget, once, for the PATCH that follows.
        admitted = request[_ADMITTED] = await self._admitted("PATCH", request)
        offset, _ = self._patch_head(request)
        await self._resumable.check_append(
            admitted.upload_id, offset=offset, length=request.content_length, owner_may_write=self._admission.refuse_frozen
        )

    async def _delete_upload(self, request: web.Request, upload_id: uuid.UUID) -> web.Response:
        progress = await self._resumable.progress(upload_id)
        check_writable(progress)
        self._admission.refuse_frozen(progress.upload.user_id)
        # The signed URL is the owner's credential for this one upload.
        owner = Principal(progress.upload.user_id, frozenset())
        await self._uploads.fail(owner, progress.upload.upload_id, "tus termination")
        return self._respond(request, 204)


def _method(request: web.Request) -> str:
    """The method the request stands for: tus core's X-HTTP-Method-Override when present."""
    return request.headers.get("X-HTTP-Method-Override", request.method).strip().upper()


def _forwarded_for(request: web.Request) -> list[tuple[str, str]]:
    """Every X-Forwarded-For line, in order, as the x-forwarded-for admission reads: they are one
    list (RFC 9110 5.3), and a proxy may add its hop as a line of its own below the client's
    (HAProxy does), so the first alone is the client's own text."""
    forwarded = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    return [("x-forwarded-for", forwarded)] if forwarded else []


def _status(error: MediavaultError) -> int:
    # A finalized upload is complete, not gone (HEAD answers it 200): only a termination meets it
    # here, directly or as the release a finalize committed first, and is refused.
    if isinstance(error, UploadNotPending) and error.metadata.get("state") == "finalized":
        return 403
    return next((code for kind, code in _STATUS.items() if isinstance(error, kind)), 500)


def _progress_headers(progress: Progress) -> dict[str, str]:
    headers = {"Upload-Offset": str(progress.received_bytes), "Upload-Length": str(progress.upload.size_bytes)}
    # A finalized upload no longer expires: its reservation became the media's bytes.
    if progress.upload.state != "finalized":
        headers["Upload-Expires"] = _http_date(progress.upload.expires_at)
    return headers


def _non_negative(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    # str.isdigit alone admits digits int() reads differently or not at all ("١٢", "²").
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise _Refused(400, f"{name} must be a non-negative integer")
    return int(value)


def _metadata(header: str) -> dict[str, str]:
    """Upload-Metadata: comma-separated "key base64(value)" pairs (a key alone has an empty value)."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in header.split(","))):
        key, _, encoded = item.partition(" ")
        # Header bytes that are not UTF-8 come as surrogate escapes, which no text column takes.
        if not _is_utf8(key):
            raise _Refused(400, f"Upload-Metadata key {key!r} is not UTF-8")
        try:
            pairs[key] = base64.b64decode(encoded.strip(), validate=True).decode()
        # ValueError: a header value holding non-ASCII characters, which aiohttp passes on as str.
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise _Refused(400, f"Upload-Metadata value of {key!r} is not base64 of UTF-8") from None
    return pairs


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _checksum(header: str | None) -> ChunkChecksum | None:
    if header is None:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise _Refused(400, f"Upload-Checksum algorithm must be one of {', '.join(CHECKSUM_ALGORITHMS)}")
    try:
        return ChunkChecksum(algorithm, base64.b64decode(encoded, validate=True))
    except ValueError:  # binascii.Error, or non-ASCII characters in the header
        raise _Refused(400, "Upload-Checksum digest is not base64") from None


def _first_chunk_head(request: web.Request, length: int) -> tuple[bool, ChunkChecksum | None]:
    """creation-with-upload: whether the creation's body is the upload's first chunk, and its
    Upload-Checksum, from headers that pass, before anything is reserved. A body of another type is
    refused (415, as a PATCH's): dropped unread, as tusd drops it, its client would take its bytes
    for sent. A Content-Type without a body, which some HTTP clients send with every POST, is a
    creation without one."""
    if request.headers.get("Content-Type") != _OFFSET_TYPE:
        if request.body_exists:
            raise _Refused(415, f"a creation's body must be {_OFFSET_TYPE}")
        return False, None
    if request.content_length is not None and request.content_length > length:
        raise BeyondDeclaredSize(length)
    return True, _checksum(request.headers.get("Upload-Checksum"))
