"""Bytes a client sends, held to a minimum pace while they are waited for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

# An upload's stream (a tus PATCH body, an UploadContent stream, a signed PUT's body) must
# bring at least this many bytes within every TUS_IDLE_TIMEOUT_SECONDS spent waiting for it, or it
# ends as a cut connection does: a stream trickling a byte every few seconds, or silent, would
# otherwise hold its connection, its file and a resumable upload's writer slot for ever, and with
# every slot held other uploads' chunks are refused (WritersBusy). 64 KiB in the default 60 s is
# about 1 KiB/s, far below any real mobile link (2G EDGE carries tens of KiB/s), so only a stalled
# or trickling client is cut.
MIN_PROGRESS_BYTES = 64 * 1024


class Stalled(Exception):
    """A stream held to making_progress with raise_stalled stopped making progress."""


async def making_progress(
    chunks: AsyncIterable[bytes], idle_seconds: float, *, raise_stalled: bool = False
) -> AsyncIterator[bytes]:
    """The chunks until the stream ends, or until it has been waited on for idle_seconds in all
    since it last brought MIN_PROGRESS_BYTES: then it ends as a cut one does, what came kept, or,
    with raise_stalled, raises Stalled, for a caller that keeps a stream whole or not at all and
    must not take the stalled one's end for the stream's."""
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
        except StopAsyncIteration:
            return
        except TimeoutError:
            if raise_stalled:
                raise Stalled from None
            return
        waited += loop.time() - started
        brought += len(data)
        if brought >= MIN_PROGRESS_BYTES:
            waited, brought = 0.0, 0
        yield data
