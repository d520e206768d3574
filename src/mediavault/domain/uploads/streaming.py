"""Bytes streamed through the service (gRPC UploadContent) stored as an upload's object."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from mediavault.blobs import BlobStore, BlobStoreError, ObjectExists
from mediavault.domain.uploads.records import Upload
from mediavault.errors import BlobStoreUnavailable, InvalidArgument, StreamStalled
from mediavault.pacing import MIN_PROGRESS_BYTES, Stalled, making_progress


class _TooManyBytes(Exception):
    pass


async def store_stream(blobs: BlobStore, upload: Upload, chunks: AsyncIterable[bytes], *, idle_seconds: float) -> None:
    """Writes the stream as the upload's object unless one is there; refuses a stream longer than
    the declared size, or one that stalls (pacing.making_progress, idle_seconds)."""

    async def bounded() -> AsyncIterator[bytes]:
        received = 0
        async for chunk in making_progress(chunks, idle_seconds, raise_stalled=True):
            received += len(chunk)
            if received > upload.size_bytes:
                raise _TooManyBytes
            yield chunk

    try:
        await blobs.write(upload.object_key, bounded(), content_type=upload.content_type, create_only=True)
    except _TooManyBytes:
        # Both backends publish an object only when its stream completes, so nothing was stored.
        raise InvalidArgument.single("chunk", f"stream exceeds the declared {upload.size_bytes} bytes") from None
    except Stalled:
        # Nothing was stored either, so the upload stays pending for a retry within its reservation.
        raise StreamStalled(
            f"the stream brought less than {MIN_PROGRESS_BYTES // 1024} KiB within {idle_seconds:g} s;"
            " nothing was stored, send it again"
        ) from None
    except ObjectExists:
        # Another stream or the signed PUT stored the object first. Once stored, an object is
        # never replaced (finalize may already have verified it), so finalize judges that one.
        return
    except BlobStoreError as exc:
        raise BlobStoreUnavailable("the blob store could not store the stream; retry") from exc
