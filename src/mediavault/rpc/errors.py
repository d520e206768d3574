"""The one boundary where domain errors become gRPC statuses with google.rpc details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from mediavault.errors import InvalidArgument, MediavaultError, RateLimited, WritersBusy

DOMAIN = "mediavault"

_CODES: dict[str, grpc.StatusCode] = {
    "UNAUTHORIZED": grpc.StatusCode.UNAUTHENTICATED,
    "FORBIDDEN": grpc.StatusCode.PERMISSION_DENIED,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "STORAGE_LIMIT_REACHED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "RATE_LIMIT_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "ACCOUNT_FROZEN": grpc.StatusCode.FAILED_PRECONDITION,
    "UPLOAD_NOT_PENDING": grpc.StatusCode.FAILED_PRECONDITION,
    "MEDIA_BUSY": grpc.StatusCode.FAILED_PRECONDITION,
    "UPLOAD_BUSY": grpc.StatusCode.ABORTED,
    "OFFSET_MISMATCH": grpc.StatusCode.FAILED_PRECONDITION,
    "STREAM_STALLED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "OBJECT_MISSING": grpc.StatusCode.FAILED_PRECONDITION,
    "SIZE_MISMATCH": grpc.StatusCode.FAILED_PRECONDITION,
    "CHECKSUM_MISMATCH": grpc.StatusCode.FAILED_PRECONDITION,
    "UNSUPPORTED_MEDIA_TYPE": grpc.StatusCode.FAILED_PRECONDITION,
    "IDEMPOTENCY_CONFLICT": grpc.StatusCode.ALREADY_EXISTS,
    "SERVER_SHUTTING_DOWN": grpc.StatusCode.UNAVAILABLE,
    "SERVER_BUSY": grpc.StatusCode.UNAVAILABLE,
    "BLOB_STORE_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL_ERROR": grpc.StatusCode.INTERNAL,
}

STATUS_DETAILS_KEY = "grpc-status-details-bin"


def status_code(error: MediavaultError) -> grpc.StatusCode:
    return _CODES.get(error.reason, grpc.StatusCode.INTERNAL)


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: MediavaultError) -> tuple[grpc.StatusCode, str, bytes]:
    """(code, message, serialized google.rpc.Status) with exactly one ErrorInfo."""
    code = status_code(error)
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))]
    if isinstance(error, InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.reported
                    ]
                )
            )
        )
    if isinstance(error, (RateLimited, WritersBusy)):
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=error.retry_after_seconds))))
    if isinstance(error, RateLimited):
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[error_details_pb2.QuotaFailure.Violation(subject=error.subject, description=error.description)]
                )
            )
        )
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=details)
    return code, error.message, status.SerializeToString()
