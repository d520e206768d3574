"""What a request and a stored object must be: checked before anything is written."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from mediavault.blobs import BlobStore, is_sha256_hex
from mediavault.config import S3_MAX_PARTS, S3_MAX_PUT_BYTES, Settings
from mediavault.domain import content_types
from mediavault.domain.uploads.records import PROTOCOLS, BeginRequest, Upload
from mediavault.errors import FieldViolation, InvalidArgument, VerificationFailed

RETENTIONS = ("permanent", "ephemeral")
MAX_FILENAME = 255
MAX_IDEMPOTENCY_KEY = 128
MAX_FAIL_REASON = 500
# As long as a header the HTTP listener takes (aiohttp's max_field_size): it refuses no header
# that was taken before it was stored, and bounds what one upload's row holds.
MAX_TUS_METADATA = 8190
# Characters a displayed name must not hold: controls (C0, DEL, C1), line and paragraph
# separators, surrogates and private use by category, and the bidirectional controls, which
# make "\u202egpj.exe" show as "exe.jpg". Other format characters stay: the zero-width joiner
# builds emoji.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Zl", "Zp"})
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(name: str) -> bool:
    """Whether a name shows as what it says: see _UNPRINTABLE_CATEGORIES."""
    return not any(c in _BIDI_CONTROLS or unicodedata.category(c) in _UNPRINTABLE_CATEGORIES for c in name)


def _size_violation(request: BeginRequest, content_type: str, settings: Settings) -> FieldViolation | None:
    limit = settings.max_video_bytes if content_types.kind_of(content_type) == "video" else settings.max_image_bytes
    if not 0 < request.size_bytes <= limit:
        return FieldViolation("size_bytes", f"must be between 1 and {limit} for {content_type}")
    if request.protocol == "tus" and request.size_bytes > settings.tus_max_size:
        return FieldViolation("size_bytes", f"must be at most {settings.tus_max_size} for protocol TUS")
    if settings.blob_backend == "s3" and request.size_bytes > (largest := _largest_on_s3(request.protocol, settings)):
        return FieldViolation("size_bytes", f"must be at most {largest} for protocol {request.protocol.upper()} on S3")
    return None


def _largest_on_s3(protocol: str, settings: Settings) -> int:
    """The most one upload by this protocol can store on S3: a SINGLE upload's URL is one PUT;
    an S3_MULTIPART upload is a multipart upload of s3_part_size parts (TUS: tus_max_size)."""
    return S3_MAX_PUT_BYTES if protocol == "single" else S3_MAX_PARTS * settings.s3_part_size


def validate_begin(request: BeginRequest, settings: Settings) -> BeginRequest:
    """The request normalized, or InvalidArgument naming every field that is wrong."""
    violations: list[FieldViolation] = []
    filename = request.filename.strip()
    # The length is the sent name's, before stripping; every way in (gRPC, tus) is judged here.
    if len(request.filename) > MAX_FILENAME:
        violations.append(FieldViolation("filename", f"must be at most {MAX_FILENAME} characters"))
    elif not filename or not printable(filename):
        violations.append(FieldViolation("filename", f"must be 1-{MAX_FILENAME} printable characters"))
    content_type = content_types.normalize(request.content_type)
    if content_type not in content_types.ALLOWED_TYPES:
        violations.append(
            FieldViolation("content_type", f"must be one of {', '.join(sorted(content_types.ALLOWED_TYPES))}")
        )
    elif (wrong_size := _size_violation(request, content_type, settings)) is not None:
        violations.append(wrong_size)
    sha256 = request.sha256.strip() if request.sha256 else None
    if sha256 is not None and not is_sha256_hex(sha256):
        violations.append(FieldViolation("sha256", "must be 64 lowercase hex characters"))
    key = request.idempotency_key or None
    if request.retention not in RETENTIONS:
        violations.append(FieldViolation("retention", "unknown retention"))
    if request.protocol not in PROTOCOLS:
        violations.append(FieldViolation("protocol", "unknown protocol"))
    elif request.protocol == "s3_multipart" and settings.blob_backend != "s3":
        violations.append(FieldViolation("protocol", "S3_MULTIPART needs the S3 blob backend"))
    if request.tus_metadata is not None and len(request.tus_metadata) > MAX_TUS_METADATA:
        violations.append(FieldViolation("Upload-Metadata", f"must be at most {MAX_TUS_METADATA} characters"))
    if violations:
        raise InvalidArgument(violations)
    return BeginRequest(
        filename, content_type, request.size_bytes, sha256, key, request.retention, request.protocol, request.tus_metadata
    )


def check_stream_offset(offset: int | None) -> None:
    """InvalidArgument when an UploadContent stream's offset (None: not given) cannot be an offset."""
    if offset is not None and offset < 0:
        raise InvalidArgument.single("offset", "must be at least 0")


def same_parameters(upload: Upload, request: BeginRequest) -> bool:
    """Whether a replay of an idempotency key asks for what the first call asked for."""
    return (
        upload.filename == request.filename
        and upload.content_type == request.content_type
        and upload.size_bytes == request.size_bytes
        and upload.sha256 == request.sha256
        and upload.retention == request.retention
        and upload.protocol == request.protocol
    )


@dataclass(frozen=True)
class Observed:
    """The stored object as it is: size, SHA-256, and the allowed type its bytes are (None: none)."""

    size: int
    sha256: str
    sniffed: str | None


async def observe_object(blobs: BlobStore, key: str) -> Observed | None:
    """What is stored under key, or None when nothing is."""
    inspection = await blobs.inspect(key, content_types.SNIFF_BYTES)
    if inspection is None:
        return None
    return Observed(inspection.size, inspection.sha256, content_types.sniff(inspection.head))


def check_object(upload: Upload, observed: Observed | None) -> None:
    """Raises VerificationFailed with the specific reason when the object is not what was declared."""
    if observed is None:
        raise VerificationFailed("OBJECT_MISSING", "no object was uploaded")
    if observed.size != upload.size_bytes:
        raise VerificationFailed("SIZE_MISMATCH", f"object has {observed.size} bytes, {upload.size_bytes} were declared")
    if upload.sha256 is not None and observed.sha256 != upload.sha256:
        raise VerificationFailed("CHECKSUM_MISMATCH", "object SHA-256 differs from the declared one")
    if not content_types.matches(upload.content_type, observed.sniffed):
        raise VerificationFailed(
            "UNSUPPORTED_MEDIA_TYPE",
            f"object content is {observed.sniffed or 'not an allowed type'}, not {upload.content_type}",
        )
