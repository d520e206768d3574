"""Batcher: concurrent submissions run together, one batch in flight."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from mediavault.batching import Batcher


class Recorder:
    """A run function that records its batches and holds each until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_on: int | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await self.release.wait()
        if self.fail_on in items:
            raise ValueError("statement failed")
        return [item * 10 for item in items]


async def test_calls_arriving_while_a_batch_runs_form_the_next_batch():
    run = Recorder()
    batcher = Batcher(run, max_batch=3)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(2, 8)]
    await asyncio.sleep(0)
    assert run.batches == [[1]]
    run.release.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [20, 30, 40, 50, 60, 70]
    assert run.batches == [[1], [2, 3, 4], [5, 6, 7]]


async def test_a_failing_batch_fails_its_own_callers_only():
    run = Recorder()
    run.fail_on = 3
    batcher = Batcher(run)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    doomed = [asyncio.create_task(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    run.release.set()
    assert await first == 10
    for task in doomed:
        with pytest.raises(ValueError, match="statement failed"):
            await task
    assert await batcher.submit(4) == 40


async def test_a_cancelled_caller_does_not_disturb_the_others():
    run = Recorder()
    batcher = Batcher(run)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    run.release.set()
    assert await tasks[0] == 10
    assert await tasks[2] == 30
    assert tasks[1].cancelled()
    assert run.batches == [[1, 2, 3]]


async def test_a_run_returning_the_wrong_number_of_results_fails_the_batch():
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher = Batcher(short)
    with pytest.raises(RuntimeError, match="returned"):
        await asyncio.gather(batcher.submit(1), batcher.submit(2))


def test_max_batch_must_be_positive_and_spacing_not_negative():
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        Batcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="spacing must not be negative"):
        Batcher(Recorder(), spacing=-0.001)


class Timed:
    """A run function that takes `duration` seconds and records when each batch started."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.batches: list[tuple[float, list[int]]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append((asyncio.get_running_loop().time(), items))
        await asyncio.sleep(self.duration)
        return items


async def test_with_spacing_batches_after_a_shared_one_start_spacing_apart_and_carry_the_calls_that_waited():
    run = Timed(duration=0.005)
    batcher = Batcher(run, spacing=0.05)
    loop = asyncio.get_running_loop()
    calls = []
    for i in range(40):
        calls.append(asyncio.create_task(batcher.submit(i)))
        await asyncio.sleep(0.002)
    assert await asyncio.gather(*calls) == list(range(40))
    pairs = list(itertools.pairwise(run.batches))
    assert all(later - earlier >= 0.05 - 0.002 for (earlier, items), (later, _) in pairs if len(items) > 1)
    # 40 calls over about 80 ms: without spacing about 15 batches of two or three; with it, four or five.
    assert len(run.batches) <= 6
    assert sorted(item for _, items in run.batches for item in items) == list(range(40))
    assert loop.time() - run.batches[0][0] < 0.5


async def test_with_spacing_a_lone_caller_in_sequence_never_waits():
    run = Timed(duration=0.0)
    batcher = Batcher(run, spacing=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(5):
        assert await batcher.submit(i) == i
    assert loop.time() - started < 0.1
    assert [items for _, items in run.batches] == [[0], [1], [2], [3], [4]]


async def test_with_spacing_a_call_after_a_quiet_spell_starts_at_once():
    run = Timed(duration=0.0)
    batcher = Batcher(run, spacing=0.2)
    assert await batcher.submit(1) == 1
    await asyncio.sleep(0.25)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await batcher.submit(2) == 2
    assert run.batches[-1][0] - started < 0.05
    assert len(run.batches) == 2


@pytest.mark.parametrize("started", [True, False])
async def test_a_cancelled_drain_cancels_its_callers_and_the_next_call_starts_anew(started):
    run = Recorder()
    batcher = Batcher(run)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    for _ in range(2 if started else 1):
        await asyncio.sleep(0)
    assert run.batches == ([[1, 2]] if started else [])
    batcher._draining.cancel()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
    run.release.set()
    assert await asyncio.wait_for(batcher.submit(3), timeout=5) == 30
