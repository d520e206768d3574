"""The upload state machine: pending -> finalized | failed | expired.

Each transition is one guarded statement on a pending row, so that concurrent finalize,
fail and expiry of one upload end in exactly one outcome (the row lock decides, the
loser sees no row). The quota change and its ledger entry ride in the same statement.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from mediavault import metrics
from mediavault.auth import Principal
from mediavault.blobs import BlobStore, BlobStoreError
from mediavault.config import Settings
from mediavault.domain import accounts, content_types
from mediavault.domain.uploads import statements
from mediavault.domain.uploads.batches import StatementBatches, columns_of
from mediavault.domain.uploads.records import BeginRequest, BeginResult, Upload, object_key_for
from mediavault.domain.uploads.resumable import TUS_VERSION, PartRequest, PresignedPart, Resumable
from mediavault.domain.uploads.streaming import store_stream
from mediavault.domain.uploads.validation import (
    Observed,
    check_object,
    check_stream_offset,
    observe_object,
    same_parameters,
    validate_begin,
)
from mediavault.errors import (
    AccountFrozen,
    BlobStoreUnavailable,
    IdempotencyConflict,
    InvalidArgument,
    NotFound,
    StorageLimitReached,
    UploadNotPending,
    VerificationFailed,
)
from mediavault.jobs import TranscodeQueue
from mediavault.pacing import making_progress

log = logging.getLogger(__name__)

# A reservation that neither succeeded nor failed is diagnosed and asked again this often:
# the account may be created or credited between the statement and the diagnosis.
_BEGIN_ATTEMPTS = 3


def _finished(upload: Upload) -> Upload:
    """What finalize answers for an upload no longer pending: a finalized one is success (finalize
    is idempotent), a failed or expired one UploadNotPending."""
    if upload.state == "finalized":
        return upload
    raise UploadNotPending(f"upload is {upload.state}", state=upload.state)


def _lapsed(upload: Upload) -> bool:
    """Whether a pending upload's reservation has run out, though the expiry run may not have expired it yet."""
    return upload.expires_at <= datetime.now(UTC)


class Uploads:
    """Begin, finalize, fail and stream uploads; one entry point per operation.

    Concurrent calls share statements (see statements.py): a BeginUpload without an
    idempotency key and every FinalizeUpload first go into the batched statement of
    their operation; what the batch could not place for sure is settled by the single
    form, which waits for locks and reads the row to name the exact outcome.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        blobs: BlobStore,
        settings: Settings,
        transcodes: TranscodeQueue,
        resumable: Resumable,
    ) -> None:
        self._pool = pool
        self._blobs = blobs
        self._settings = settings
        self._transcodes = transcodes
        self._resumable = resumable
        spacing = settings.upload_batch_spacing_seconds
        self._reservations = StatementBatches(pool, statements.BEGIN_MANY, spacing=spacing, name="reserve uploads")
        self._commits = StatementBatches(pool, statements.COMMIT_MANY, spacing=spacing, name="commit uploads")
        # Releases of reservations whose call ended first (_reserve_keyless), held until they end.
        self._releases: set[asyncio.Task[None]] = set()

    async def begin(self, principal: Principal, request: BeginRequest) -> BeginResult:
        request = validate_begin(request, self._settings)
        user_id = principal.user_id
        if request.idempotency_key and (existing := await self._replay(user_id, request)):
            return await self._begun(existing, request.tus_metadata)
        upload_id = uuid.uuid4()
        row = (
            upload_id, user_id, request.filename, request.content_type, request.size_bytes, request.sha256,
            request.idempotency_key, request.retention, object_key_for(upload_id),
            float(self._settings.reservation_ttl_seconds), request.protocol, self._settings.quota_counts_derived_bytes,
        )
        if request.idempotency_key is None:
            upload = await self._reserve_keyless(principal, request, row)
        else:
            upload = await self._reserve_alone(principal, request, row)
        return await self._begun(upload, request.tus_metadata)

    async def _reserve_keyless(self, principal: Principal, request: BeginRequest, row: tuple[Any, ...]) -> Upload:
        """Reserves an upload that no retry could find again, in a task of its own: a cancelled call
        (the client's deadline, a draining server shedding it) does not stop its statement, which may
        commit all the same, and what it reserved is then released as a failed begin, not left
        reserved until it expires while every retry reserves more. The call ends at once: the
        release waits for the statement on its own, however long a lock holds it."""
        reserving = asyncio.ensure_future(self._reserve(principal, request, row))
        try:
            return await asyncio.shield(reserving)
        except asyncio.CancelledError:
            release = asyncio.create_task(self._release_unanswered(reserving))
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)
            raise

    async def _reserve(self, principal: Principal, request: BeginRequest, row: tuple[Any, ...]) -> Upload:
        # A batch never carries an idempotency key: one duplicate would abort everyone's insert.
        # The batch places only what it can place for sure; None is settled alone.
        if (reserved := await self._reservations.submit(row)) is not None:
            return Upload(**reserved)
        return await self._reserve_alone(principal, request, row)

    async def _release_unanswered(self, reserving: asyncio.Future[Upload]) -> None:
        await asyncio.wait([reserving])
        if not reserving.cancelled() and reserving.exception() is None:
            await self._abandon(reserving.result(), asyncio.CancelledError("the call ended before its answer"))

    async def _begun(self, upload: Upload, tus_metadata: str | None) -> BeginResult:
        """The upload's destination. When it cannot be made (the blob store fails to start a resumable
        upload, the call is cancelled), an upload without an idempotency key is released before the
        error goes up: no retry could find it again (a tus creation never has a key), so its bytes
        would stay reserved until it expired while every retry reserved more. One with a key stays
        for the retry with that key, which makes its destination then."""
        try:
            return await self._destination(upload, tus_metadata)
        except BaseException as exc:
            if upload.idempotency_key is None:
                # In a task of its own, which a cancellation of this call does not stop.
                await asyncio.shield(asyncio.ensure_future(self._abandon(upload, exc)))
            if isinstance(exc, BlobStoreError):
                raise BlobStoreUnavailable("the blob store could not start the upload; retry") from exc
            raise

    async def _abandon(self, upload: Upload, cause: BaseException) -> None:
        # No URL was answered, so nothing was stored: what is left to undo is the multipart upload
        # the start recorded, if it got that far (when the blob store failed, it did not). A full
        # discard would make the answer wait on that store once per request of it.
        try:
            failed = await self.release(
                upload.upload_id, state="failed", reason="BEGIN_FAILED", detail=str(cause) or type(cause).__name__
            )
            if failed is not None and upload.protocol != "single":
                await self._resumable.abort_started(upload)
        except Exception:  # the begin's own error is what goes up; this one is logged
            log.warning(
                "failed begin not undone: an unreleased reservation lapses at its expiry, a multipart upload left is the sweep's",
                extra={"upload_id": str(upload.upload_id)},
                exc_info=True,
            )

    async def _reserve_alone(self, principal: Principal, request: BeginRequest, row: tuple[Any, ...]) -> Upload:
        user_id = principal.user_id
        for _ in range(_BEGIN_ATTEMPTS):
            try:
                reserved = await self._pool.fetchrow(statements.BEGIN_ONE, *columns_of([row]))
            except asyncpg.UniqueViolationError:
                # A concurrent begin with the same idempotency key won the insert.
                existing = await self._replay(user_id, request)
                if existing is None:
                    raise
                return existing
            except asyncpg.CheckViolationError:
                raise StorageLimitReached(
                    "upload does not fit in the remaining storage", requested_bytes=str(request.size_bytes)
                ) from None
            if reserved is not None:
                return Upload(**reserved)
            await self._diagnose_refusal(user_id, request.size_bytes)
        raise RuntimeError("reservation neither succeeded nor failed after retries")

    async def _diagnose_refusal(self, user_id: str, size_bytes: int) -> None:
        """Raises why a reservation placed nothing; returns when it is worth asking again."""
        standing = await accounts.standing(self._pool, user_id)
        if standing is None:
            await accounts.ensure(self._pool, user_id, self._settings.free_quota_bytes)
            return
        if standing.frozen:
            raise AccountFrozen("account is frozen")
        available = standing.available_bytes(counts_derived=self._settings.quota_counts_derived_bytes)
        if available < size_bytes:
            raise StorageLimitReached(
                "upload does not fit in the remaining storage",
                requested_bytes=str(size_bytes),
                available_bytes=str(max(available, 0)),
            )

    async def _replay(self, user_id: str, request: BeginRequest) -> Upload | None:
        row = await self._pool.fetchrow(statements.GET_BY_KEY, user_id, request.idempotency_key)
        if row is None:
            return None
        upload = Upload(**row)
        if not same_parameters(upload, request):
            raise IdempotencyConflict("idempotency_key was already used with different parameters")
        if upload.state == "pending" and _lapsed(upload):
            # Expired here, as finalize would, rather than left for the expiry run: the replay then
            # answers what GetUpload answers from now on, and no URL.
            await self._expire_if_lapsed(upload)
            row = await self._pool.fetchrow(statements.GET, upload.upload_id)
            assert row is not None  # upload rows are never deleted
            upload = Upload(**row)
        return upload

    async def _destination(self, upload: Upload, tus_metadata: str | None) -> BeginResult:
        """Where and how the client sends the upload's bytes, by its protocol (tus_metadata: see
        BeginRequest), until its reservation lapses at the latest; nowhere once it is no longer
        pending (a replayed key): a failed or expired upload has released its bytes and its object,
        and a URL would let the client store an object no quota counts."""
        if upload.state != "pending":
            return BeginResult(upload, "", "", {})
        if upload.protocol == "s3_multipart":
            # The parts' URLs come from presign_parts, as many at a time as the client asks.
            await self._resumable.start(upload)
            return BeginResult(upload, "", "PUT", {}, self._resumable.part_size_bytes)
        if upload.protocol == "tus":
            await self._resumable.start(upload, tus_metadata)
            return BeginResult(
                upload,
                self._resumable.url(upload),
                "PATCH",
                {"Tus-Resumable": TUS_VERSION},
                self._resumable.chunk_size_bytes,
            )
        signed = await self._blobs.presign_put(
            upload.object_key,
            size_bytes=upload.size_bytes,
            content_type=upload.content_type,
            sha256=upload.sha256,
            expires_in=upload.url_lifetime(self._settings.upload_url_ttl_seconds),
        )
        return BeginResult(upload, signed.url, signed.method, dict(signed.headers))

    async def get(self, principal: Principal, upload_id: uuid.UUID) -> Upload:
        upload = await self._row(principal, upload_id)
        if upload.protocol == "s3_multipart" and upload.state == "pending":
            return dataclasses.replace(upload, received_bytes=await self._resumable.received_direct(upload))
        return upload

    async def _row(self, principal: Principal, upload_id: uuid.UUID) -> Upload:
        """The caller's upload as its row says, without a look at the blob store."""
        row = await self._pool.fetchrow(statements.GET, upload_id)
        # Someone else's upload is indistinguishable from a missing one.
        if row is None or row["user_id"] != principal.user_id:
            raise NotFound("upload not found")
        return Upload(**row)

    async def presign_parts(self, principal: Principal, upload_id: uuid.UUID, parts: Sequence[PartRequest]) -> list[PresignedPart]:
        """Presigned S3 UploadPart URLs for parts of the caller's S3_MULTIPART upload."""
        return await self._resumable.presign_parts(principal.user_id, upload_id, parts)

    async def finalize(self, principal: Principal, upload_id: uuid.UUID) -> Upload:
        """Commits the upload when its object is what it declared, then queues the new media's processing.

        Idempotent: finalizing a finalized upload answers it again.
        """
        upload = await self._finalize(principal, upload_id)
        assert upload.media_id is not None  # a finalized upload names its media
        # The new media's transcode run and its owner's feed bump; a repeat finds the run queued or done.
        await self._transcodes.enqueue(upload.media_id, 0, feed_owner=upload.user_id)
        return upload

    async def _finalize(self, principal: Principal, upload_id: uuid.UUID) -> Upload:
        # The row first, by its primary key: looking at the object may mean reading all of it
        # (S3 without a full-object checksum), which only the owner's pending upload is worth.
        # A finalized upload is answered as it is, a failed, expired or someone else's one
        # from the row alone.
        upload = await self._row(principal, upload_id)
        if upload.state != "pending":
            return _finished(upload)
        if _lapsed(upload):
            await self._expire_if_lapsed(upload)
            return await self._settled(principal, upload_id)
        try:
            observed = await self._observe(principal, upload_id, upload.object_key)
        except BlobStoreError as exc:
            # A fail or expiry that lands while a resumable upload's parts are completed aborts
            # them under the completion: the upload's new state is then the answer.
            current = await self._row(principal, upload_id)
            if current.state != "pending":
                return _finished(current)
            raise BlobStoreUnavailable("the blob store could not check the object; retry") from exc
        if observed is not None:
            # What the upload declared commits in one guarded statement, batched with concurrent
            # finalizes; anything else (not the declared bytes, a row another transaction holds)
            # is settled alone, which names the outcome.
            committed = await self._commits.submit(self._commit_row(upload_id, principal.user_id, observed))
            if committed is not None:
                metrics.UPLOAD_OUTCOMES.labels("finalized", "").inc()
                return Upload(**committed)
        return await self._commit_alone(principal, upload, observed)

    async def _observe(self, principal: Principal, upload_id: uuid.UUID, object_key: str) -> Observed | None:
        """The object as finalize checks it: as stored, or else as a resumable upload's checkpoint says."""
        observed = await observe_object(self._blobs, object_key)
        if observed is None:
            observed = await self._resumable.observe(upload_id, principal.user_id)
        return observed

    async def _commit_alone(self, principal: Principal, upload: Upload, observed: Observed | None) -> Upload:
        try:
            check_object(upload, observed)
        except VerificationFailed as failure:
            failed = await self.release(upload.upload_id, state="failed", reason=failure.reason, detail=failure.message)
            if failed is None:
                return await self._settled(principal, upload.upload_id)
            await self._discard(upload)
            raise
        assert observed is not None  # check_object refused a missing object
        row = self._commit_row(upload.upload_id, upload.user_id, observed)
        committed = await self._pool.fetchrow(statements.COMMIT_ONE, *columns_of([row]))
        if committed is None:
            # A concurrent fail, expiry or finalize changed the state first, or the
            # reservation lapsed by the database's clock though not by ours.
            current = await self._row(principal, upload.upload_id)
            if current.state == "pending":
                await self._expire_if_lapsed(current)
            return await self._settled(principal, upload.upload_id)
        metrics.UPLOAD_OUTCOMES.labels("finalized", "").inc()
        return Upload(**committed)

    def _commit_row(self, upload_id: uuid.UUID, user_id: str, observed: Observed) -> tuple[Any, ...]:
        """One row of statements.COMMIT_PARAMETERS."""
        return (
            upload_id,
            uuid.uuid4(),
            content_types.kind_of(observed.sniffed or ""),
            observed.sha256,
            float(self._settings.ephemeral_ttl_seconds),
            user_id,
            observed.size,
            ",".join(content_types.declarable_as(observed.sniffed)),
        )

    async def _settled(self, principal: Principal, upload_id: uuid.UUID) -> Upload:
        """The outcome after losing a race."""
        return _finished(await self.get(principal, upload_id))

    async def _expire_if_lapsed(self, upload: Upload) -> None:
        expired = await self.release(upload.upload_id, state="expired", reason="EXPIRED")
        if expired is not None:
            await self._discard(upload)

    async def fail(self, principal: Principal, upload_id: uuid.UUID, reason: str) -> Upload:
        """The client gives up: the reservation is released and whatever was uploaded deleted."""
        # The row alone: a pending S3_MULTIPART upload's parts (what get lists) are not needed to
        # release it, and a blob store that is down must not keep its bytes reserved.
        upload = await self._row(principal, upload_id)
        failed = await self.release(upload_id, state="failed", reason="CLIENT_FAILED", detail=reason or None)
        if failed is None:
            state = (await self._row(principal, upload_id)).state
            raise UploadNotPending(f"upload is {state}", state=state)
        await self._discard(upload)
        return failed

    async def release(self, upload_id: uuid.UUID, *, state: str, reason: str, detail: str | None = None) -> Upload | None:
        """Moves a pending upload to failed/expired and frees its reservation; None if it was not pending."""
        row = await self._pool.fetchrow(statements.RELEASE, upload_id, state, reason, detail)
        if row is None:
            return None
        metrics.UPLOAD_OUTCOMES.labels(state, reason).inc()
        return Upload(**row)

    async def upload_content(
        self, principal: Principal, upload_id: uuid.UUID, chunks: AsyncIterable[bytes], *, offset: int | None = None
    ) -> Upload:
        """Stores streamed bytes as the upload's object, then finalizes it exactly like the URL path.

        A TUS upload is finalized only once its stored bytes reach size_bytes: a stream that ends
        before is one piece of the upload, which stays pending with its received_bytes for the
        next stream (or tus PATCH) to continue. offset: the received_bytes the client continues
        from (None: wherever the stored bytes end); OffsetMismatch, with nothing stored, when
        another writer has moved them since the client read them.
        """
        check_stream_offset(offset)
        upload = await self._row(principal, upload_id)
        if upload.state != "pending":
            return _finished(upload)
        if upload.protocol == "s3_multipart":
            raise InvalidArgument.single("upload_id", "an S3_MULTIPART upload takes its parts at presigned S3 URLs")
        if upload.protocol == "tus":
            # Held to the tus PATCH's rule, so that a silent stream cannot keep a writer slot.
            stream = making_progress(chunks, self._settings.tus_idle_timeout_seconds)
            progress = await self._resumable.append(upload_id, stream, offset=offset, owner=principal.user_id)
            if progress.received_bytes < upload.size_bytes:
                return progress.upload
        else:
            if offset:
                raise InvalidArgument.single("offset", "a SINGLE upload's stream starts at 0")
            await store_stream(self._blobs, upload, chunks, idle_seconds=self._settings.tus_idle_timeout_seconds)
        return await self.finalize(principal, upload_id)

    async def _discard(self, upload: Upload) -> None:
        """Deletes what a released upload stored: its object, and a resumable upload's partial bytes."""
        await self._delete_quietly(upload.object_key)
        if upload.protocol != "single":
            try:
                await self._resumable.discard(upload)
            except BlobStoreError:
                metrics.BLOB_DELETE_FAILURES.inc()
                log.warning(
                    "partial upload delete failed; left for the orphan sweep",
                    extra={"upload_id": str(upload.upload_id)},
                    exc_info=True,
                )

    async def _delete_quietly(self, key: str) -> None:
        # The row change is committed; a blob left behind is found by the orphan sweep.
        try:
            await self._blobs.delete(key)
        except BlobStoreError:
            metrics.BLOB_DELETE_FAILURES.inc()
            log.warning("blob delete failed; left for the orphan sweep", extra={"object_key": key}, exc_info=True)
