"""InOrder: pieces worked on in a thread, in order, with the memory waiting bounded and no batch left running."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mediavault.offload import InOrder


async def test_pieces_are_worked_on_in_order_and_waiting_bytes_stay_bounded():
    seen: list[bytes] = []
    batches: list[int] = []

    def work(batch: list[bytes]) -> None:
        time.sleep(0.002)
        batches.append(sum(map(len, batch)))
        seen.extend(batch)

    queue = InOrder(work, max_waiting_bytes=10_000)
    pieces = [i.to_bytes(2, "big") * 1000 for i in range(200)]
    for piece in pieces:
        await queue.put(piece)
    await queue.drain()
    assert seen == pieces
    # A slow worker gets more than one piece per batch, never much more than the bound.
    assert len(batches) < len(pieces)
    assert max(batches) <= 10_000 + 2000


async def test_an_error_in_a_batch_is_raised_to_the_caller():
    def work(batch: list[bytes]) -> None:
        if b"bad" in batch:
            raise OSError("disk full")

    queue = InOrder(work, max_waiting_bytes=1)
    await queue.put(b"good")
    await queue.put(b"bad")
    with pytest.raises(OSError, match="disk full"):
        await queue.drain()
    await queue.settle()


async def test_settle_waits_for_the_running_batch_even_after_a_cancelled_drain():
    release = threading.Event()
    finished = threading.Event()

    def work(batch: list[bytes]) -> None:
        release.wait(5)
        finished.set()

    queue = InOrder(work, max_waiting_bytes=1 << 20)
    await queue.put(b"piece")
    draining = asyncio.create_task(queue.drain())
    await asyncio.sleep(0.05)
    draining.cancel()
    with pytest.raises(asyncio.CancelledError):
        await draining
    assert not finished.is_set()

    settling = asyncio.create_task(queue.settle())
    await asyncio.sleep(0.05)
    assert not settling.done()
    release.set()
    await settling
    assert finished.is_set()
