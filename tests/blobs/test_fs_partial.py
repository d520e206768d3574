"""The fs store's partial writer (tus chunks): its file descriptor outlives no chunk."""

from __future__ import annotations

import asyncio
import os
import threading

from mediavault.blobs import PartialState
from mediavault.blobs.fs import FsBlobStore
from mediavault.blobs.signing import UrlSigner

PARTIAL_KEY = "partial/ab/abcdef"


def descriptors_of(path: str) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == path
        except OSError:
            continue
    return count


async def test_a_close_cancelled_while_the_threads_finish_still_closes_the_file(tmp_path) -> None:
    store = FsBlobStore(tmp_path / "blobs", UrlSigner(b"k" * 32, "http://127.0.0.1:1"))
    digesting, release = threading.Event(), threading.Event()

    def slow_digest(batch: list[bytes]) -> None:
        digesting.set()
        release.wait(10)

    writer = await store.open_partial(PARTIAL_KEY, "originals/ab/abcdef", None, PartialState(0), slow_digest)
    path = os.path.realpath(store.path(PARTIAL_KEY))
    assert descriptors_of(path) == 1
    await writer.write(b"x" * 1000)
    await asyncio.to_thread(digesting.wait, 10)

    async def chunk() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await writer.close()

    task = asyncio.create_task(chunk())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    # The cleanup in the finally waits for the digest thread; a second cancellation ends the wait.
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert descriptors_of(path) == 1, "the thread may still use the descriptor"
    release.set()
    for _ in range(100):
        if descriptors_of(path) == 0:
            break
        await asyncio.sleep(0.02)
    assert descriptors_of(path) == 0
    await store.close()
