"""What an upload is: its row, the request that begins one, and where its object lives."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

COLUMNS = (
    "upload_id",
    "user_id",
    "filename",
    "content_type",
    "size_bytes",
    "sha256",
    "idempotency_key",
    "retention",
    "state",
    "object_key",
    "media_id",
    "failure_reason",
    "created_at",
    "expires_at",
    "protocol",
)

# How the bytes of an upload arrive: one PUT or stream; resumable chunks through the service
# (tus, or UploadContent streams that continue one); or S3 multipart parts sent straight to S3.
PROTOCOLS = ("single", "tus", "s3_multipart")


@dataclass(frozen=True)
class Upload:
    upload_id: uuid.UUID
    user_id: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str | None
    idempotency_key: str | None
    retention: str
    state: str
    object_key: str
    media_id: uuid.UUID | None
    failure_reason: str | None
    created_at: datetime
    expires_at: datetime
    protocol: str
    # Durable bytes so far; the statements that read an upload say it, the others leave 0.
    received_bytes: int = 0

    def url_lifetime(self, ttl_seconds: int) -> int:
        """Seconds a URL that sends bytes to this upload may be signed for: its TTL, never past
        expires_at, when the expiry run releases the bytes and nothing counts what arrives after."""
        return min(ttl_seconds, int((self.expires_at - datetime.now(UTC)).total_seconds()))


@dataclass(frozen=True)
class BeginRequest:
    filename: str
    content_type: str
    size_bytes: int
    sha256: str | None
    idempotency_key: str | None
    retention: str
    protocol: str = "single"
    # A tus creation's Upload-Metadata header as the client sent it, for HEAD to echo.
    tus_metadata: str | None = None


@dataclass(frozen=True)
class BeginResult:
    upload: Upload
    upload_url: str
    upload_method: str
    upload_headers: dict[str, str]
    # tus: the chunk size the server stores as one durable piece; 0 for a single upload.
    chunk_size_bytes: int = 0


def object_key_for(upload_id: uuid.UUID) -> str:
    hex_id = upload_id.hex
    return f"originals/{hex_id[:2]}/{hex_id}"


def partial_key_for(upload_id: uuid.UUID) -> str:
    """Where a resumable upload's bytes wait until finalize (fs: the file; S3: its tail objects' prefix)."""
    hex_id = upload_id.hex
    return f"partial/{hex_id[:2]}/{hex_id}"
