"""The one exception tree of mediavault.

Every error a caller can see is a ``MediavaultError`` whose ``reason`` is the
UPPER_SNAKE_CASE ErrorInfo reason of the google.rpc error model::

    MediavaultError
    ├── Unauthenticated       UNAUTHORIZED            missing, malformed or expired token
    ├── PermissionDenied      FORBIDDEN               role does not allow the call
    ├── NotFound              NOT_FOUND               unknown, or not the caller's
    ├── InvalidArgument       INVALID_ARGUMENT        carries field violations
    ├── StorageLimitReached   STORAGE_LIMIT_REACHED   reservation does not fit the quota
    ├── AccountFrozen         ACCOUNT_FROZEN
    ├── UploadNotPending      UPLOAD_NOT_PENDING      finalize/fail of a finished upload
    ├── UploadBusy            UPLOAD_BUSY             another writer is appending to the resumable upload
    ├── OffsetMismatch        OFFSET_MISMATCH         a tus chunk or UploadContent stream that does not start at the stored offset
    ├── ChunkChecksumMismatch CHUNK_CHECKSUM_MISMATCH a tus chunk that differs from its Upload-Checksum
    ├── StreamStalled         STREAM_STALLED          a SINGLE upload's UploadContent stream that stopped making progress
    ├── MediaBusy             MEDIA_BUSY              reprocess while a processing run is in progress
    ├── IdempotencyConflict   IDEMPOTENCY_CONFLICT    key reused with other parameters
    ├── RateLimited           RATE_LIMIT_EXCEEDED     carries the delay and the quota that was hit
    ├── VerificationFailed    OBJECT_MISSING | SIZE_MISMATCH | CHECKSUM_MISMATCH | UNSUPPORTED_MEDIA_TYPE
    ├── ServerShuttingDown    SERVER_SHUTTING_DOWN    refused or cut short by a draining server; retry
    ├── WritersBusy           SERVER_BUSY             every resumable-upload writer slot stayed taken; retry
    ├── BlobStoreUnavailable  BLOB_STORE_UNAVAILABLE  the blob store failed a step a retry may get through
    └── InternalError         INTERNAL_ERROR          anything unexpected; details stay in the logs

``domain`` raises these; ``rpc.errors`` is the single place that turns them into
gRPC status codes. Messages are written for clients: no SQL, paths or other
users' data.
"""

from __future__ import annotations

from dataclasses import dataclass


class MediavaultError(Exception):
    reason = "INTERNAL_ERROR"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}


class Unauthenticated(MediavaultError):
    reason = "UNAUTHORIZED"


class PermissionDenied(MediavaultError):
    reason = "FORBIDDEN"


class NotFound(MediavaultError):
    reason = "NOT_FOUND"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


# An answer names at most this many violations and counts the others: a repeated field can
# break its rule once per item, and gRPC clients refuse trailers (where the message and the
# violations both go) past 8 KiB at random and past 16 KiB always.
MAX_REPORTED_VIOLATIONS = 20


class InvalidArgument(MediavaultError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        reported = violations[:MAX_REPORTED_VIOLATIONS]
        message = "; ".join(f"{v.field}: {v.description}" for v in reported)
        if len(violations) > len(reported):
            message += f"; and {len(violations) - len(reported)} more"
        super().__init__(message)
        self.violations = violations
        self.reported = reported

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class StorageLimitReached(MediavaultError):
    reason = "STORAGE_LIMIT_REACHED"


class AccountFrozen(MediavaultError):
    reason = "ACCOUNT_FROZEN"


class UploadNotPending(MediavaultError):
    reason = "UPLOAD_NOT_PENDING"


class UploadBusy(MediavaultError):
    reason = "UPLOAD_BUSY"


class OffsetMismatch(MediavaultError):
    reason = "OFFSET_MISMATCH"


class ChunkChecksumMismatch(MediavaultError):
    reason = "CHUNK_CHECKSUM_MISMATCH"


class StreamStalled(MediavaultError):
    reason = "STREAM_STALLED"


class BeyondDeclaredSize(InvalidArgument):
    """Bytes past the upload's declared size: INVALID_ARGUMENT on gRPC, 413 on tus."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__([FieldViolation("chunk", f"stream exceeds the declared {size_bytes} bytes")])


class MediaBusy(MediavaultError):
    reason = "MEDIA_BUSY"


class IdempotencyConflict(MediavaultError):
    reason = "IDEMPOTENCY_CONFLICT"


class RateLimited(MediavaultError):
    reason = "RATE_LIMIT_EXCEEDED"

    def __init__(self, decision, subject: str, description: str) -> None:
        retry = decision.retry_after_seconds
        super().__init__(f"rate limit exceeded; retry in {retry} s", retry_after_seconds=str(retry))
        self.decision = decision
        self.retry_after_seconds = retry
        self.subject = subject
        self.description = description


VERIFICATION_REASONS = frozenset({"OBJECT_MISSING", "SIZE_MISMATCH", "CHECKSUM_MISMATCH", "UNSUPPORTED_MEDIA_TYPE"})


class VerificationFailed(MediavaultError):
    def __init__(self, reason: str, message: str) -> None:
        if reason not in VERIFICATION_REASONS:
            raise ValueError(f"unknown verification reason {reason}")
        super().__init__(message)
        self.reason = reason


class ServerShuttingDown(MediavaultError):
    reason = "SERVER_SHUTTING_DOWN"


class WritersBusy(MediavaultError):
    """No writer slot of this process freed in time for a resumable chunk; nothing was stored."""

    reason = "SERVER_BUSY"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message, retry_after_seconds=str(retry_after_seconds))
        self.retry_after_seconds = retry_after_seconds


class BlobStoreUnavailable(MediavaultError):
    reason = "BLOB_STORE_UNAVAILABLE"


class InternalError(MediavaultError):
    reason = "INTERNAL_ERROR"
