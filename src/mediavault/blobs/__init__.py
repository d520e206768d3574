"""Blob storage behind one small interface: ``fs`` (default) or ``s3``."""

from __future__ import annotations

from mediavault.blobs.base import (
    BlobStore,
    BlobStoreError,
    Digest,
    DirectParts,
    Inspection,
    ListedObject,
    MultipartUpload,
    ObjectExists,
    ObjectInfo,
    PartialState,
    PartialWriter,
    SignedRequest,
    StoredPart,
    check_key,
    is_sha256_hex,
    single_chunk,
)
from mediavault.config import Settings

__all__ = ["BlobStore", "BlobStoreError", "Digest", "DirectParts", "StoredPart", "Inspection", "ListedObject", "MultipartUpload", "ObjectExists", "ObjectInfo", "PartialState", "PartialWriter", "SignedRequest", "check_key", "is_sha256_hex", "open_blob_store", "single_chunk"]


async def open_blob_store(settings: Settings) -> BlobStore:
    if settings.blob_backend == "s3":
        from mediavault.blobs.s3 import S3BlobStore

        return await S3BlobStore.open(settings)
    from mediavault.blobs.fs import FsBlobStore
    from mediavault.blobs.signing import UrlSigner

    return FsBlobStore(settings.blob_dir, UrlSigner(settings.url_signing_key, settings.public_url))
