"""Work on a stream of byte pieces in a worker thread, in order, while the event loop takes the next ones.

A tus chunk arrives as pieces of whatever size the socket gave; writing and hashing each one on
the event loop stops it from reading the socket meanwhile. InOrder hands the pieces to a thread
in batches, one batch at a time: whatever arrived while the thread worked on a batch is the next
batch, so a slow worker gets larger batches rather than more hand-offs, and the order of the
pieces is kept. The functions given must release the GIL (os.write, hashing, a ctypes call).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class InOrder:
    """Runs work(batch) on the pieces put, in order, a batch at a time in the loop's default executor."""

    def __init__(self, work: Callable[[list[bytes]], None], *, max_waiting_bytes: int) -> None:
        self._work = work
        # Past this many bytes waiting, put() waits for the thread: the socket is then read no
        # faster than the worker keeps up, and memory stays bounded.
        self._max_waiting_bytes = max_waiting_bytes
        self._batch: list[bytes] = []
        self._waiting_bytes = 0
        self._running: asyncio.Future[None] | None = None

    async def put(self, piece: bytes) -> None:
        """Queues piece after the ones before; raises the error of an earlier batch."""
        self._batch.append(piece)
        self._waiting_bytes += len(piece)
        if self._running is not None:
            if not self._running.done() and self._waiting_bytes < self._max_waiting_bytes:
                return
            await self._finish_running()
        self._start()

    async def drain(self) -> None:
        """Returns once every piece put has been worked on; raises the error of any batch."""
        while self._running is not None or self._batch:
            if self._running is None:
                self._start()
            await self._finish_running()

    async def settle(self) -> None:
        """Waits for the batch in the thread to end, never cancelling it, and drops what still waits.

        For the end of a stream, drained or failed: after a failure the thread may still use what
        the caller is about to release (a file descriptor), and its error is no longer news.
        """
        self._batch, self._waiting_bytes = [], 0
        running, self._running = self._running, None
        if running is not None:
            await asyncio.wait([running])
            if not running.cancelled():
                running.exception()

    def _start(self) -> None:
        batch, self._batch, self._waiting_bytes = self._batch, [], 0
        self._running = asyncio.get_running_loop().run_in_executor(None, self._work, batch)

    async def _finish_running(self) -> None:
        assert self._running is not None
        running = self._running
        # Shielded: a cancelled caller must not leave the batch looking finished while the thread
        # still works on it; settle() then waits for it.
        await asyncio.shield(running)
        self._running = None
