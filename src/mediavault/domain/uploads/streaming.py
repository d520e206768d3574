"""Bytes streamed through the service (gRPC UploadContent) stored as an upload's object."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

from mediavault.blobs import BlobStore, BlobStoreError, ObjectExists
from mediavault.domain.uploads.records import Upload
from mediavault.errors import BlobStoreUnavailable, InvalidArgument

# A resumable upload's stream (a tus PATCH body, a TUS upload's UploadContent) must bring at
# least this many bytes within every TUS_IDLE_TIMEOUT_SECONDS spent waiting for it, or it ends as
# a cut connection does: a stream trickling a byte every few seconds, or silent, would otherwise
# hold a writer slot for ever, and with every slot held other uploads' chunks are refused
# (WritersBusy). 64 KiB in the default 60 s is about 1 KiB/s, far below any real mobile link
# (2G EDGE carries tens of KiB/s), so only a stalled or trickling client is cut.
MIN_PROGRESS_BYTES = 64 * 1024


async def making_progress(chunks: AsyncIterable[bytes], idle_seconds: float) -> AsyncIterator[bytes]:
    """The chunks until the stream ends, or until it has been waited on for idle_seconds in all
    since it last brought MIN_PROGRESS_BYTES: then it ends as a cut one does, what came kept."""
    loop = asyncio.get_running_loop()
    iterator = aiter(chunks)
    # Only the time spent waiting for the client's bytes counts: while the server stores what it
    # read (a sync, an S3 part), the client's next bytes wait unread through no fault of its own.
    waited = 0.0
    brought = 0
    while True:
        started = loop.time()
        try:
            async with asyncio.timeout(idle_seconds - waited):
                data = await anext(iterator)
        except (StopAsyncIteration, TimeoutError):
            return
        waited += loop.time() - started
        brought += len(data)
        if brought >= MIN_PROGRESS_BYTES:
            waited, brought = 0.0, 0
        yield data


class _TooManyBytes(Exception):
    pass


async def store_stream(blobs: BlobStore, upload: Upload, chunks: AsyncIterable[bytes]) -> None:
    """Writes the stream as the upload's object unless one is there; refuses a stream longer than the declared size."""

    async def bounded() -> AsyncIterator[bytes]:
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > upload.size_bytes:
                raise _TooManyBytes
            yield chunk

    try:
        await blobs.write(upload.object_key, bounded(), content_type=upload.content_type, create_only=True)
    except _TooManyBytes:
        # Both backends publish an object only when its stream completes, so nothing was stored.
        raise InvalidArgument.single("chunk", f"stream exceeds the declared {upload.size_bytes} bytes") from None
    except ObjectExists:
        # Another stream or the signed PUT stored the object first. Once stored, an object is
        # never replaced (finalize may already have verified it), so finalize judges that one.
        return
    except BlobStoreError as exc:
        raise BlobStoreUnavailable("the blob store could not store the stream; retry") from exc
