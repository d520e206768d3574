"""Resumable uploads: chunks appended from any replica, progress and hash state in PostgreSQL.

A writer leases the upload for as long as it appends: one UPDATE names its token in the
upload_progress row until lease_until, and only when no writer's lease is running, so of two
writers (on any replicas) exactly one proceeds and the other is told UploadBusy at once. The
writer stores bytes through the blob backend's PartialWriter and records each durable point in
upload_checkpoints (offset, SHA-256 state over exactly those bytes, the first bytes for the
magic-byte check, the S3 part list), each in one statement that records only while the row
still names its token, and renews the lease; the chunk's last one gives the lease back. While
bytes come slowly between checkpoints, a task renews the lease. No transaction waits for a
client: behind a transaction pooler, a writer takes a server connection only for each of its
statements.

A writer that loses its lease (it lapsed, and another writer took the upload) records nothing
more, and stops as soon as a renewal or checkpoint finds the lease gone; one whose renewals
cannot get through stops while a third of its lease is left, before any other writer may take
the upload, since the bytes it would still write are in the place the next writer writes to. A
writer that dies holds the upload until its lease lapses (settings.tus_lease_seconds); whatever
it stored past its last checkpoint is dropped by the next. A writer that is cancelled (a gRPC
client's cancel, a server's shutdown cutting a PATCH body) records a last checkpoint of what it
wrote, as a cut connection's writer does, if it can within a few seconds and before its fence.

Finalize reads the last checkpoint instead of the object: size, digest and leading bytes
are there, and publishing the bytes as the object is a rename or a multipart completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from mediavault.blobs import BlobStore, BlobStoreError, DirectParts, PartialState, PartialWriter, is_sha256_hex
from mediavault.blobs.signing import UrlSigner
from mediavault.config import S3_MAX_PARTS, Settings
from mediavault.db.pool import DATABASE_ERRORS
from mediavault.domain import content_types
from mediavault.domain.uploads import statements
from mediavault.domain.uploads.records import COLUMNS, Upload, partial_key_for
from mediavault.domain.uploads.validation import Observed, observe_object
from mediavault.errors import (
    BeyondDeclaredSize,
    BlobStoreUnavailable,
    ChunkChecksumMismatch,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OffsetMismatch,
    UploadBusy,
    UploadNotPending,
    WritersBusy,
)
from mediavault.sha256state import Sha256

log = logging.getLogger(__name__)

# tus checksum extension: the algorithms a chunk's Upload-Checksum may use.
CHECKSUM_ALGORITHMS = ("sha1", "sha256")
TUS_VERSION = "1.0.0"
# The signature covers no HTTP method: one URL serves HEAD, PATCH and DELETE.
_TUS_URL_METHOD = "TUS"
TUS_ROUTE = "tus"

_ENSURE_PROGRESS = (
    "INSERT INTO upload_progress (upload_id, tus_metadata) VALUES ($1, $2) ON CONFLICT (upload_id) DO NOTHING"
)
# Of concurrent starts of one upload, the first to record its multipart upload keeps it.
# Only for an upload still pending: one released meanwhile (a begin cancelled twice, the second
# time while its start waited on S3) must not record a multipart upload no one would abort. The
# share lock orders this against the release's update of the row.
_SET_MULTIPART = """
UPDATE upload_progress SET multipart_id = $2
WHERE upload_id = $1 AND multipart_id IS NULL
  AND EXISTS (SELECT 1 FROM uploads WHERE upload_id = $1 AND state = 'pending' FOR SHARE)
RETURNING true
"""

_UPLOAD_COLUMNS = ", ".join(f"u.{column}" for column in COLUMNS)
_PROGRESS = f"""
SELECT {_UPLOAD_COLUMNS}, p.multipart_id, p.tus_metadata, u.expires_at <= now() AS lapsed,
       c.received_bytes AS checkpoint_bytes, c.sha256_state, c.head, c.parts, c.tail_bytes
FROM upload_progress p JOIN uploads u USING (upload_id) LEFT JOIN upload_checkpoints c USING (upload_id)
WHERE p.upload_id = $1
"""
# The lease goes to $2 when no other writer's is running; found tells a missing upload (or
# another owner's: NotFound, as if missing) from one another writer holds. The progress is read
# by the next statement: this one's snapshot may predate a checkpoint committed by the writer
# whose lease it then finds given back.
_TAKE_LEASE = """
WITH target AS (
    SELECT p.upload_id FROM upload_progress p JOIN uploads u USING (upload_id)
    WHERE p.upload_id = $1 AND ($4::text IS NULL OR u.user_id = $4)
), taken AS (
    UPDATE upload_progress p SET writer = $2, lease_until = now() + make_interval(secs => $3)
    FROM target
    WHERE p.upload_id = target.upload_id AND (p.writer IS NULL OR p.lease_until <= now())
    RETURNING p.upload_id
)
SELECT EXISTS (SELECT FROM target) AS found, EXISTS (SELECT FROM taken) AS taken
"""
_RENEW_LEASE = """
UPDATE upload_progress SET lease_until = now() + make_interval(secs => $3)
WHERE upload_id = $1 AND writer = $2
RETURNING true
"""
_GIVE_BACK_LEASE = "UPDATE upload_progress SET writer = NULL, lease_until = NULL WHERE upload_id = $1 AND writer = $2"


def _checkpoint_statement(lease_after: str) -> str:
    """Records a checkpoint only while the row names the writer's token ($7), and only of a pending
    upload (once it is finalized, failed or expired nothing is recorded); sets lease_after."""
    return f"""
WITH leased AS (
    UPDATE upload_progress SET {lease_after} WHERE upload_id = $1 AND writer = $7 RETURNING upload_id
), recorded AS (
    INSERT INTO upload_checkpoints (upload_id, received_bytes, sha256_state, head, parts, tail_bytes)
    SELECT upload_id, $2, $3, $4, $5, $6 FROM leased JOIN uploads USING (upload_id) WHERE state = 'pending'
    ON CONFLICT (upload_id) DO UPDATE
    SET received_bytes = excluded.received_bytes, sha256_state = excluded.sha256_state, head = excluded.head,
        parts = excluded.parts, tail_bytes = excluded.tail_bytes, updated_at = now()
    RETURNING received_bytes
)
SELECT EXISTS (SELECT FROM leased) AS leased, EXISTS (SELECT FROM recorded) AS recorded
"""


_CHECKPOINT = _checkpoint_statement("lease_until = now() + make_interval(secs => $8)")
_LAST_CHECKPOINT = _checkpoint_statement("writer = NULL, lease_until = NULL")

# A lease is renewed every quarter of its length. The writer stops once a third of it is all
# that may be left since the last renewal it saw: the remaining third is for the bytes its
# threads are still writing to settle, before another writer may take the upload.
_RENEWALS_PER_LEASE = 4
_FENCE_FRACTION = 2 / 3
# A cancelled writer's last checkpoint (see _Chunk.store) gets this long, and never past its fence:
# under the 5 s the HTTP listener gives a request's handler to end once it has cut its body.
_CANCELLED_CHECKPOINT_SECONDS = 3.0

# A chunk waits at most this long for a writer slot, then is refused WritersBusy (SERVER_BUSY, tus
# 503) before any lease is taken or byte stored: a client that gets no slot hears so and retries,
# instead of its request hanging while slow bodies hold every slot. Slots free as chunks end (a
# body that stops making progress ends within TUS_IDLE_TIMEOUT_SECONDS, tus.py), so the retry,
# after WRITERS_BUSY_RETRY_AFTER_SECONDS (tus-js-client's and Uppy's last default retry delay),
# usually finds one.
WRITER_SLOT_WAIT_SECONDS = 10.0
WRITERS_BUSY_RETRY_AFTER_SECONDS = 5

_MULTIPART_ID = "SELECT multipart_id FROM upload_progress WHERE upload_id = $1"

# The per-call bound keeps one answer small.
MAX_PARTS_PER_CALL = 100


@dataclass(frozen=True)
class PartRequest:
    """A part of an S3_MULTIPART upload to presign, with the SHA-256 S3 must check it against."""

    part_number: int
    sha256: str | None


@dataclass(frozen=True)
class PresignedPart:
    part_number: int
    url: str
    headers: dict[str, str]


@dataclass(frozen=True)
class ChunkChecksum:
    """A tus Upload-Checksum: the digest the whole chunk must have."""

    algorithm: str
    digest: bytes


@dataclass(frozen=True)
class Progress:
    """A resumable upload and its last durable point."""

    upload: Upload
    received_bytes: int
    lapsed: bool
    # The Upload-Metadata of its tus creation, as sent; None when it had none.
    tus_metadata: str | None


def _progress(row: asyncpg.Record) -> Progress:
    # A finalized upload has received all its bytes, whatever its last checkpoint says.
    received = row["size_bytes"] if row["state"] == "finalized" else row["checkpoint_bytes"] or 0
    upload = Upload(**{column: row[column] for column in COLUMNS}, received_bytes=received)
    return Progress(upload, received, row["lapsed"], row["tus_metadata"])


def check_writable(progress: Progress) -> None:
    """Raises UploadNotPending when no chunk may be added: finalized, failed, expired or lapsed."""
    if progress.upload.state != "pending":
        raise UploadNotPending(f"upload is {progress.upload.state}", state=progress.upload.state)
    if progress.lapsed:
        raise UploadNotPending("upload is expired", state="expired")


def _check_chunk(
    progress: Progress, offset: int | None, length: int | None, owner_may_write: Callable[[str], None] | None
) -> None:
    """Raises what refuses a chunk from its offset and length alone, before any of its bytes: an
    owner who may not write, an upload that takes no more, another offset than the stored bytes'
    end, or bytes past the declared size."""
    upload = progress.upload
    if owner_may_write is not None:
        owner_may_write(upload.user_id)
    if upload.state != "finalized":
        check_writable(progress)
    received = progress.received_bytes
    if offset is not None and offset != received:
        raise OffsetMismatch(f"the upload's offset is {received}", offset=str(received))
    if length is not None and received + length > upload.size_bytes:
        raise BeyondDeclaredSize(upload.size_bytes)


class Resumable:
    """Starts, appends to, publishes and discards resumable uploads."""

    def __init__(self, pool: asyncpg.Pool, blobs: BlobStore, settings: Settings) -> None:
        self._pool = pool
        self._blobs = blobs
        self._signer = UrlSigner(settings.url_signing_key, settings.public_url)
        self.chunk_size_bytes = settings.tus_chunk_size_bytes
        # Checkpoints inside a chunk: after every part on S3, whose writer holds a part in memory
        # until it is sent; every chunk size on fs, whose writer keeps nothing back.
        self._checkpoint_every = blobs.partial_part_size or self.chunk_size_bytes
        # What an S3_MULTIPART client is told to send per part: a cut part is sent again whole.
        self.part_size_bytes = self._checkpoint_every
        self._part_url_ttl_seconds = settings.upload_url_ttl_seconds
        self._lease_seconds = settings.tus_lease_seconds
        # Bounds what this process's writers hold at once: each keeps up to a part (S3) or its
        # write-ahead (fs) in memory and worker threads busy. Not connections: a writer holds
        # one only for each short statement, and one waiting here holds none. Half of
        # DB_POOL_MAX_SIZE, the figure operators size a process by.
        self._writers = asyncio.Semaphore(max(1, settings.db_pool_max_size // 2))

    @contextlib.asynccontextmanager
    async def _writer_slot(self) -> AsyncIterator[None]:
        """Holds one of the process's writer slots; WritersBusy when none frees within WRITER_SLOT_WAIT_SECONDS."""
        try:
            async with asyncio.timeout(WRITER_SLOT_WAIT_SECONDS):
                await self._writers.acquire()
        except TimeoutError:
            raise WritersBusy("every upload writer of this server is busy; retry", WRITERS_BUSY_RETRY_AFTER_SECONDS) from None
        try:
            yield
        finally:
            self._writers.release()

    async def start(self, upload: Upload, tus_metadata: str | None = None) -> None:
        """Creates the upload's progress row (with its tus creation's Upload-Metadata) and, on S3, its
        multipart upload; once, however often called.

        No transaction waits for S3, which may take seconds to answer (behind PgBouncer, a server
        connection idle in transaction all that time): the multipart upload is made first, then
        recorded by one guarded statement; a concurrent start that recorded its own first wins,
        and the loser's is aborted.
        """
        await self._pool.execute(_ENSURE_PROGRESS, upload.upload_id, tus_metadata)
        if await self._pool.fetchval(_MULTIPART_ID, upload.upload_id) is not None:
            return
        # Once S3 has made the multipart upload, only its recorded id lets a discard abort it: the
        # making and the recording go on in a task of their own, which a cancellation of this call
        # does not stop, and which ends before the cancellation goes on (a failed begin's release
        # then finds the id, and aborts the upload).
        starting = asyncio.ensure_future(self._start_multipart(upload))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            await asyncio.wait([starting])
            raise

    async def _start_multipart(self, upload: Upload) -> None:
        multipart_id = await self._blobs.start_partial(upload.object_key, content_type=upload.content_type)
        if multipart_id is None:
            return
        recorded = False
        try:
            recorded = bool(await self._pool.fetchval(_SET_MULTIPART, upload.upload_id, multipart_id))
        finally:
            if not recorded:
                await self._abort_unrecorded(upload, multipart_id)

    async def _abort_unrecorded(self, upload: Upload, multipart_id: str) -> None:
        """Aborts the multipart upload a start made and could not record (another start's was recorded
        first, the upload was released meanwhile, or the statement failed), unless the row names it
        after all: a statement whose answer was lost may have recorded it."""
        try:
            if await self._pool.fetchval(_MULTIPART_ID, upload.upload_id) != multipart_id:
                await self._blobs.abort_multipart_upload(upload.object_key, multipart_id)
        except Exception:  # the start's own outcome is what goes up; this one is logged
            log.warning(
                "unrecorded multipart upload not aborted; left for the orphan sweep",
                extra={"upload_id": str(upload.upload_id)},
                exc_info=True,
            )

    def url(self, upload: Upload) -> str:
        """The tus upload URL: signed for this upload alone, valid as long as its reservation, naming
        its owner, whose rate limits the requests on it spend."""
        return self._signer.sign_until(
            _TUS_URL_METHOD,
            str(upload.upload_id),
            expires=int(upload.expires_at.timestamp()),
            route=TUS_ROUTE,
            owner=upload.user_id,
        )

    def verify_url(self, upload_id: str, query: dict[str, str]) -> str | None:
        """None when the query signs a tus URL for upload_id and has not expired, else why not."""
        return self._signer.verify(_TUS_URL_METHOD, upload_id, query)

    async def progress(self, upload_id: uuid.UUID) -> Progress:
        """The upload and its durable offset; NotFound when it is not a resumable upload."""
        row = await self._pool.fetchrow(_PROGRESS, upload_id)
        if row is None:
            raise NotFound("upload not found")
        return _progress(row)

    async def check_append(
        self,
        upload_id: uuid.UUID,
        *,
        offset: int | None = None,
        length: int | None = None,
        owner_may_write: Callable[[str], None] | None = None,
    ) -> None:
        """Raises what append would refuse the chunk before reading a byte of it, as the upload
        stands now: for a client that asks before sending its chunk (Expect: 100-continue). Takes
        no lease, so append checks again under its own."""
        _check_chunk(await self.progress(upload_id), offset, length, owner_may_write)

    async def append(
        self,
        upload_id: uuid.UUID,
        chunks: AsyncIterable[bytes],
        *,
        offset: int | None = None,
        length: int | None = None,
        checksum: ChunkChecksum | None = None,
        owner: str | None = None,
        owner_may_write: Callable[[str], None] | None = None,
    ) -> Progress:
        """Appends the chunk after the stored bytes; returns the upload with the durable offset after it.

        offset: the client's idea of the stored offset (tus Upload-Offset, UploadContent's offset),
        None to continue wherever the bytes end (an UploadContent without one); a finalized
        upload's is its size, where it takes no more bytes; OffsetMismatch when it is not, before
        any byte is read or stored. length: the chunk's length when known up
        front. owner: the caller whose upload it must be (None: the URL signature vouched).
        owner_may_write: called with the upload's owner before anything is read or stored, to
        raise when that account may not write (a frozen one, for a caller the URL vouched for).
        Without a checksum, the bytes become durable step by step as they come (S3: part by
        part; fs: chunk size by chunk size) and at the chunk's end, so a chunk cut short keeps
        what arrived, one cancelled (a gRPC client's cancel, a server shutting down) keeps what
        arrived if a last checkpoint can still be recorded in time, and one that fails keeps what
        its last step made durable; with a checksum, the chunk is kept whole or not at all.
        WritersBusy when no writer slot frees in time: then no lease is taken and nothing is read or stored.
        """
        async with self._writer_slot():
            lease = _Lease(self._pool, upload_id, self._lease_seconds)
            try:
                await lease.take(owner)
                row = await self._pool.fetchrow(_PROGRESS, upload_id)
                assert row is not None  # the lease is on the row, and progress rows stay
                progress = _progress(row)
                _check_chunk(progress, offset, length, owner_may_write)
                upload = progress.upload
                received = progress.received_bytes
                if received == upload.size_bytes:
                    # Complete: a chunk at its end that brings no bytes is answered with its offset
                    # (a client repeating its last request is done), any byte is past the declared
                    # size, and no writer is opened: on fs one would make the partial file anew once
                    # a finalize had published it, for a concurrent finalize to publish over the object.
                    async for data in chunks:
                        if data:
                            raise BeyondDeclaredSize(upload.size_bytes)
                    return progress
                state = PartialState(received, tuple(row["parts"] or ()), row["tail_bytes"] or 0)
                hashes = _Hashes(
                    Sha256.restore(row["sha256_state"]) if received else Sha256(),
                    hashlib.new(checksum.algorithm) if checksum else None,
                )
                async with lease.kept():
                    writer = await self._blobs.open_partial(
                        partial_key_for(upload_id), upload.object_key, row["multipart_id"], state, hashes.update
                    )
                    chunk = _Chunk(
                        lease,
                        upload,
                        writer,
                        hashes,
                        row["head"] or b"",
                        received,
                        None if length is None else received + length,
                        self._checkpoint_every,
                        checksum,
                    )
                    durable = await chunk.store(chunks)
            except BlobStoreError as exc:
                # A fail or expiry that lands while the chunk is stored aborts the multipart upload
                # under it (S3): the upload's new state is then the answer, as on fs, not a retry.
                check_writable(await self.progress(upload_id))
                # What the last checkpoint recorded stays; the retry goes on from there.
                raise BlobStoreUnavailable("the blob store could not store the chunk; retry") from exc
            finally:
                await asyncio.shield(lease.give_back())
            return dataclasses.replace(progress, upload=dataclasses.replace(upload, received_bytes=durable), received_bytes=durable)

    async def observe(self, upload_id: uuid.UUID, owner: str) -> Observed | None:
        """The received bytes of the owner's pending upload as finalize checks them, published as the object when complete.

        None when the upload is not resumable, not the owner's, no longer pending, lapsed, or
        nothing was received: publishing is for its owner's finalize alone, and a released
        upload's parts are gone. Nothing is read back: size, digest and leading bytes come from
        the last checkpoint. S3_MULTIPART parts never passed through the service, so their
        object is completed and then read once.
        """
        row = await self._pool.fetchrow(_PROGRESS, upload_id)
        if row is None or row["user_id"] != owner or row["state"] != "pending" or row["lapsed"]:
            return None
        if row["protocol"] == "s3_multipart":
            return await self._observe_direct(row["object_key"], row["multipart_id"], row["size_bytes"])
        if row["checkpoint_bytes"] is None:
            return None
        received = row["checkpoint_bytes"]
        if received == row["size_bytes"]:
            state = PartialState(received, tuple(row["parts"]), row["tail_bytes"])
            await self._blobs.publish_partial(partial_key_for(upload_id), row["object_key"], row["multipart_id"], state)
        head = bytes(row["head"])
        return Observed(received, Sha256.restore(row["sha256_state"]).hexdigest(), content_types.sniff(head))

    async def _observe_direct(self, object_key: str, multipart_id: str, size_bytes: int) -> Observed | None:
        store = self._direct_parts()
        parts = await store.list_parts(object_key, multipart_id)
        if not parts:
            # Completed by an earlier finalize whose commit did not follow, or never sent.
            return await observe_object(self._blobs, object_key)
        received = sum(part.size for part in parts)
        if received != size_bytes:
            # Not all there: the size check refuses it, and nothing is completed.
            return Observed(received, "", None)
        await store.complete_parts(object_key, multipart_id, parts)
        return await observe_object(self._blobs, object_key)

    def _direct_parts(self) -> DirectParts:
        # validate_begin admits S3_MULTIPART only on the S3 backend.
        if not isinstance(self._blobs, DirectParts):
            raise RuntimeError("the blob backend takes no direct multipart parts")
        return self._blobs

    async def received_direct(self, upload: Upload) -> int:
        """The bytes of the parts S3 holds for an S3_MULTIPART upload (its progress)."""
        multipart_id = await self._pool.fetchval(_MULTIPART_ID, upload.upload_id)
        if multipart_id is None:
            return 0
        parts = await self._direct_parts().list_parts(upload.object_key, multipart_id)
        if not parts:
            # A finalize may have completed the parts into the object before its commit.
            stored = await self._blobs.stat(upload.object_key)
            return 0 if stored is None else stored.size
        return sum(part.size for part in parts)

    async def presign_parts(self, owner: str, upload_id: uuid.UUID, parts: Sequence[PartRequest]) -> list[PresignedPart]:
        """Presigned UploadPart URLs for parts of the owner's pending S3_MULTIPART upload."""
        row = await self._pool.fetchrow(statements.GET, upload_id)
        if row is None or row["user_id"] != owner:
            raise NotFound("upload not found")
        upload = Upload(**row)
        violations = [] if upload.protocol == "s3_multipart" else [FieldViolation("upload_id", "not an S3_MULTIPART upload")]
        violations += _part_violations(parts, -(-upload.size_bytes // self.part_size_bytes))
        if violations:
            raise InvalidArgument(violations)
        progress = await self.progress(upload_id)
        check_writable(progress)
        multipart_id = await self._pool.fetchval(_MULTIPART_ID, upload_id)
        store = self._direct_parts()
        signed = []
        for part in parts:
            start = (part.part_number - 1) * self.part_size_bytes
            try:
                request = await store.presign_upload_part(
                    upload.object_key,
                    multipart_id,
                    part.part_number,
                    size_bytes=min(self.part_size_bytes, upload.size_bytes - start),
                    sha256=part.sha256,
                    expires_in=upload.url_lifetime(self._part_url_ttl_seconds),
                )
            except BlobStoreError as exc:
                # Signing is local, but its credentials may not be: a role's are fetched anew as they expire.
                raise BlobStoreUnavailable("the blob store could not sign the parts; retry") from exc
            signed.append(PresignedPart(part.part_number, request.url, dict(request.headers)))
        return signed

    async def discard(self, upload: Upload) -> None:
        """Deletes the partial bytes and aborts the multipart upload of a released upload."""
        multipart_id = await self._pool.fetchval(_MULTIPART_ID, upload.upload_id)
        await self._blobs.discard_partial(partial_key_for(upload.upload_id), upload.object_key, multipart_id)

    async def abort_started(self, upload: Upload) -> None:
        """Aborts the multipart upload a released upload's start recorded, if any: all an upload
        whose URL was never answered can hold."""
        multipart_id = await self._pool.fetchval(_MULTIPART_ID, upload.upload_id)
        if multipart_id is not None:
            await self._blobs.abort_multipart_upload(upload.object_key, multipart_id)


def _part_violations(parts: Sequence[PartRequest], part_count: int) -> list[FieldViolation]:
    """What is wrong with the parts asked for, of an upload of part_count parts."""
    if not 1 <= len(parts) <= MAX_PARTS_PER_CALL:
        # A list refused for its length is not read: it may hold millions of parts.
        return [FieldViolation("parts", f"must hold 1 to {MAX_PARTS_PER_CALL} parts")]
    violations = []
    numbers = [part.part_number for part in parts]
    if len(set(numbers)) != len(numbers):
        violations.append(FieldViolation("parts", "repeats a part_number"))
    for i, part in enumerate(parts):
        if not 1 <= part.part_number <= S3_MAX_PARTS:
            violations.append(FieldViolation(f"parts[{i}].part_number", f"must be 1 to {S3_MAX_PARTS}"))
        elif part.part_number > part_count:
            violations.append(FieldViolation(f"parts[{i}].part_number", f"must be 1 to {part_count}, this upload's part count"))
        if part.sha256 is not None and not is_sha256_hex(part.sha256):
            violations.append(FieldViolation(f"parts[{i}].sha256", "must be 64 lowercase hex characters"))
    return violations


class _Hashes:
    """The upload's SHA-256, carried chunk to chunk, and the chunk's Upload-Checksum digest.

    The writer updates them in its worker thread as it stores the bytes; they are read only once
    the writer says it has caught up (flush, digested).
    """

    def __init__(self, upload: Sha256, chunk: hashlib._Hash | None) -> None:
        self.upload = upload
        self.chunk = chunk

    def update(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.upload.update(piece)
            if self.chunk is not None:
                self.chunk.update(piece)


class _Lease:
    """A writer's lease on an upload: taken, renewed and given back by one guarded statement each.

    PostgreSQL decides who holds the upload; the writer only stops itself in time. kept() runs
    the writing with a task that renews the lease, and stops it (UploadBusy) when a renewal finds
    the lease gone, or when none has got through for long enough that another writer might soon
    take the upload.
    """

    def __init__(self, pool: asyncpg.Pool, upload_id: uuid.UUID, seconds: float) -> None:
        self._upload_id = upload_id
        self._token = uuid.uuid4()
        self._seconds = seconds
        self._pool = pool
        self._renew_every = seconds / _RENEWALS_PER_LEASE
        # Whether the row may name this writer: from the take's sending until the lease is
        # known not taken or given back.
        self._held = False
        # When the last statement that ran the lease on was sent (the event loop's clock):
        # the lease lasts at least until then plus its length.
        self._confirmed = 0.0
        self._fence: asyncio.Timeout | None = None
        # Set as the statement that gives the lease back is sent: a renewal finding no lease
        # from then on tells nothing.
        self._ending = False

    async def take(self, owner: str | None) -> None:
        """Takes the lease; NotFound when owner has no such upload, UploadBusy when another writer holds it."""
        self._held = True
        sent = asyncio.get_running_loop().time()
        row = await self._pool.fetchrow(_TAKE_LEASE, self._upload_id, self._token, self._seconds, owner)
        assert row is not None  # a SELECT without FROM returns one row
        if not row["taken"]:
            self._held = False
            if not row["found"]:
                raise NotFound("upload not found")
            raise UploadBusy("another chunk of this upload is being stored; retry")
        self._confirmed = sent

    def extended(self, sent: float) -> None:
        """A statement sent at `sent` ran the lease on."""
        self._confirmed = max(self._confirmed, sent)
        if self._fence is not None:
            self._fence.reschedule(self._fence_at())

    def given_back(self) -> None:
        self._held = False
        if self._fence is not None:
            self._fence.reschedule(None)

    def lost(self) -> None:
        self._held = False
        if self._fence is not None and not self._ending:
            self._fence.reschedule(asyncio.get_running_loop().time())

    def _fence_at(self) -> float:
        return self._confirmed + self._seconds * _FENCE_FRACTION

    def fence_at(self) -> float:
        """When the writer must have stopped writing and recording (the event loop's clock)."""
        return self._fence_at()

    def may_record(self) -> bool:
        """Whether the lease may still be this writer's and its fence has not fallen."""
        return self._held and not (self._fence is not None and self._fence.expired())

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[None]:
        """Keeps the lease while the block writes; UploadBusy when the block had to stop for it."""
        keeper = asyncio.create_task(self._keep())
        try:
            async with asyncio.timeout_at(self._fence_at()) as fence:
                self._fence = fence
                yield
        except TimeoutError:
            if fence.expired():
                raise UploadBusy("the upload's lease was lost while this chunk was stored; retry") from None
            raise
        finally:
            self._fence = None
            keeper.cancel()
            await asyncio.wait([keeper])

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        due = self._confirmed + self._renew_every
        while True:
            await asyncio.sleep(due - loop.time())
            if self._confirmed + self._renew_every > loop.time():
                # A checkpoint ran the lease on meanwhile.
                due = self._confirmed + self._renew_every
                continue
            sent = loop.time()
            due = sent + self._renew_every
            try:
                renewed = await self._pool.fetchval(_RENEW_LEASE, self._upload_id, self._token, self._seconds)
            except (*DATABASE_ERRORS, TimeoutError) as exc:
                # The next renewal may still get through before the fence.
                log.warning("upload lease not renewed", extra={"upload_id": str(self._upload_id), "error": repr(exc)})
                continue
            if not renewed:
                self.lost()
                return
            self.extended(sent)

    async def give_back(self) -> None:
        """Gives the lease back, if this writer may still hold it; if that fails, it lapses."""
        if not self._held:
            return
        try:
            await self._pool.execute(_GIVE_BACK_LEASE, self._upload_id, self._token)
        except (*DATABASE_ERRORS, TimeoutError) as exc:
            log.warning("upload lease not given back", extra={"upload_id": str(self._upload_id), "error": repr(exc)})
            return
        self._held = False

    async def checkpoint(self, state: PartialState, sha256_state: bytes, head: bytes, *, last: bool) -> bool:
        """Records the checkpoint while the lease holds, running it on, or giving it back when last;
        False when the upload is no longer pending, UploadBusy when the lease is gone."""
        if last:
            self._ending = True
        sent = asyncio.get_running_loop().time()
        args = [self._upload_id, state.received, sha256_state, head, list(state.parts), state.tail_bytes, self._token]
        if last:
            row = await self._pool.fetchrow(_LAST_CHECKPOINT, *args)
        else:
            row = await self._pool.fetchrow(_CHECKPOINT, *args, self._seconds)
        assert row is not None  # a SELECT without FROM returns one row
        if not row["leased"]:
            self._held = False
            raise UploadBusy("the upload's lease was lost while this chunk was stored; retry")
        if last:
            self.given_back()
        else:
            self.extended(sent)
        return bool(row["recorded"])


class _Chunk:
    """One writer's pass: bytes to the backend, hash and head carried, checkpoints recorded.

    Each checkpoint commits on its own, so that it stands when the chunk then fails; the one at
    the chunk's end (end: where its bytes stop, when its length was given) also gives the lease
    back, once every byte is flushed and nothing more will be written. A cancelled chunk ends the
    same way, within a bounded time (see store).
    """

    def __init__(
        self,
        lease: _Lease,
        upload: Upload,
        writer: PartialWriter,
        hashes: _Hashes,
        head: bytes,
        received: int,
        end: int | None,
        checkpoint_every: int,
        checksum: ChunkChecksum | None,
    ) -> None:
        self._lease = lease
        self._end = end
        self._upload = upload
        self._writer = writer
        self._hashes = hashes
        self._head = head
        self._position = received
        self._durable = received
        self._checkpoint_every = checkpoint_every
        self._checksum = checksum
        # False once a write was stopped part way: the writer's bytes, digest and offset may then
        # disagree, and no checkpoint may vouch for them.
        self._writes_whole = True

    async def store(self, chunks: AsyncIterable[bytes]) -> int:
        """Stores the chunk and returns the durable offset after it; the writer is closed either way.

        Cancelled, the chunk keeps what arrived, as a cut one does (tus: the server should store
        as much of the received data as possible): a last checkpoint of the bytes written, in a
        task of its own that a second cancellation does not stop, bounded in time and by the
        lease's fence, then the CancelledError goes on. Not when the fence itself cancelled the
        chunk or the lease is lost, nor for a chunk with a checksum, kept whole or not at all.
        """
        closes_here = True
        try:
            await self._receive(chunks)
        except asyncio.CancelledError:
            if self._checksum is None and self._writes_whole and self._lease.may_record():
                # The writer is closed after the checkpoint, by the same task: a second
                # cancellation must not close it under the checkpoint's flush.
                closes_here = False
                await asyncio.shield(asyncio.ensure_future(self._keep_what_arrived()))
            raise
        finally:
            if closes_here:
                await self._writer.close()
        return self._durable

    async def _keep_what_arrived(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._position > self._durable:
                async with asyncio.timeout_at(min(loop.time() + _CANCELLED_CHECKPOINT_SECONDS, self._lease.fence_at())):
                    await self._checkpoint(last=True)
        except Exception as exc:  # noqa: BLE001 - the chunk is cancelled whatever happens here; the cause is logged
            log.warning(
                "cancelled chunk's last checkpoint not recorded; its bytes since the one before are dropped",
                extra={"upload_id": str(self._upload.upload_id), "error": repr(exc)},
            )
        finally:
            await self._writer.close()

    async def _receive(self, chunks: AsyncIterable[bytes]) -> None:
        size = self._upload.size_bytes
        async for data in chunks:
            if self._position + len(data) > size:
                # What came since the last checkpoint is dropped with the chunk: nothing past
                # the declared size is ever stored.
                raise BeyondDeclaredSize(size)
            while data:
                # Pieces end on multiples of the checkpoint interval, where a checkpoint may fall.
                room = self._checkpoint_every - self._position % self._checkpoint_every
                piece, data = data[:room], data[room:]
                await self._write(piece)
                if self._checkpoint_due():
                    await self._checkpoint(last=False)
        if self._checksum is not None and self._hashes.chunk is not None:
            await self._writer.digested()
            if not hmac.compare_digest(self._hashes.chunk.digest(), self._checksum.digest):
                raise ChunkChecksumMismatch(f"the chunk's {self._checksum.algorithm} differs from Upload-Checksum")
        if self._position > self._durable:
            await self._checkpoint(last=True)

    def _checkpoint_due(self) -> bool:
        """Whether the bytes so far end on an inner checkpoint (only chunks without a checksum have them).

        Not at the chunk's known end: the checkpoint there is the last one, which gives the lease
        back. Nor at the declared size: only the chunk's end shows that no byte past it follows
        (a stream may go on past it, and then none of its bytes since the last checkpoint may
        stand), so the checkpoint there is the last one too.
        """
        at_boundary = self._position % self._checkpoint_every == 0 and self._position != self._upload.size_bytes
        return self._checksum is None and at_boundary and self._position != self._end

    async def _write(self, piece: bytes) -> None:
        # First: the head then covers every byte the writer may hold (a checkpoint cuts it to its offset).
        if len(self._head) < content_types.SNIFF_BYTES:
            self._head += piece[: content_types.SNIFF_BYTES - len(self._head)]
        writing = asyncio.ensure_future(self._writer.write(piece))
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            self._writes_whole = False
            if not self._lease.may_record():
                # Fenced off, or the lease is lost: it may soon be another writer's, so the
                # writing stops at once.
                writing.cancel()
                raise
            # The piece is written whole before the cancellation goes on (it is queued, or waits
            # for a part upload), so that a last checkpoint can vouch for it; a second
            # cancellation stops it, and then none may.
            await writing
            self._writes_whole = True
            self._position += len(piece)
            raise
        self._position += len(piece)

    async def _checkpoint(self, *, last: bool) -> None:
        state = await self._writer.flush(final=self._position == self._upload.size_bytes)
        head = self._head[: state.received]
        if not await self._lease.checkpoint(state, self._hashes.upload.save(), head, last=last):
            # Failed or expired while the chunk was being stored: its bytes go with the upload.
            raise UploadNotPending("upload is no longer pending", state="failed")
        self._durable = state.received
