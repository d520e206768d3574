"""The process pool: results and errors cross it, a stuck job is killed, the event loop stays free."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from mediavault.imaging import ImagingError, Limits, PermanentImagingError, Transcoder
from tests.imaging.helpers import corpus

HEIC = corpus("images/heic/IMG_5195.HEIC").read_bytes()  # about 0.4 s of decoding
JOLLA = corpus("images/camera/jolla.jpg").read_bytes()
PNG = corpus("images/formats/hopper.png").read_bytes()


def worker_pids() -> set[int]:
    """Live pool processes of this test process (the resource tracker is not one)."""
    children = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children.update(int(pid) for pid in (task / "children").read_text().split())
    return {pid for pid in children if running(pid) and b"spawn_main" in proc(pid, "cmdline")}


def proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def running(pid: int) -> bool:
    stat = proc(pid, "stat")
    # The state follows the parenthesised command name; Z is a zombie, X is dead.
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


async def gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while running(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_pool_is_sized_to_the_cores_and_runs_jobs_in_parallel() -> None:
    async with Transcoder() as transcoder:
        assert transcoder.size == os.cpu_count()
        results = await asyncio.gather(*(transcoder.run(JOLLA, "image/jpeg") for _ in range(3)))
    assert all((r.kind, r.width, r.height) == ("image", 3264, 2448) for r in results)
    assert all(len(r.variants) == 3 for r in results)


async def test_permanent_errors_cross_the_pool_and_keep_the_worker() -> None:
    before = worker_pids()
    async with Transcoder(workers=1) as transcoder:
        await transcoder.run(PNG, "image/png")
        (pid,) = worker_pids() - before
        with pytest.raises(PermanentImagingError, match=r"^corrupt image$"):
            await transcoder.run(corpus("images/bad/broken.png").read_bytes(), "image/png")
        with pytest.raises(PermanentImagingError, match=r"^unsupported format$"):
            await transcoder.run(b"%!PS-Adobe-3.0 EPSF-3.0\n", "image/jpeg")
        assert worker_pids() - before == {pid}
        assert (await transcoder.run(PNG, "image/png")).width == 128


async def test_timeout_kills_the_stuck_worker_and_the_pool_recovers() -> None:
    before = worker_pids()
    async with Transcoder(workers=1) as transcoder:
        await transcoder.run(PNG, "image/png")
        (pid,) = worker_pids() - before
        transcoder.limits = Limits(job_timeout_seconds=0.05)
        started = time.monotonic()
        with pytest.raises(PermanentImagingError, match=r"^processing timed out$"):
            await transcoder.run(HEIC, "image/heic")
        assert time.monotonic() - started < 0.3
        assert await gone(pid), "the timed-out worker is still running"
        transcoder.limits = Limits()
        result = await transcoder.run(HEIC, "image/heic")
        assert (result.width, result.height) == (2566, 3313)
        assert pid not in worker_pids()


def solid_png(width: int, height: int) -> bytes:
    """A PNG of a few kilobytes whose decode needs width x height x 3 bytes."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(out, "PNG", compress_level=9)
    return out.getvalue()


def data_limit(pid: int) -> int | None:
    """The process's RLIMIT_DATA soft limit in bytes, None when unlimited."""
    for line in proc(pid, "limits").decode().splitlines():
        if line.startswith("Max data size"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    raise AssertionError("no data limit line")


def budget_of(pid: int) -> int:
    """The private memory the process may still take on top of what it holds: its limit less its VmData."""
    limit = data_limit(pid)
    assert limit is not None
    (held,) = [int(line.split()[1]) * 1024 for line in proc(pid, "status").decode().splitlines() if line.startswith("VmData:")]
    return limit - held


async def test_a_job_past_the_memory_limit_fails_as_too_large_and_the_pool_recovers() -> None:
    big = solid_png(10_000, 8_000)  # 240 MB of pixels once decoded, within max_pixels
    before = worker_pids()
    async with Transcoder(workers=1, limits=Limits(process_memory_bytes=200 * 1024**2)) as transcoder:
        await transcoder.prewarm()
        (pid,) = worker_pids() - before
        # The budget on top of what the process held at start (at most what it holds now).
        assert 150 * 1024**2 < budget_of(pid) <= 200 * 1024**2
        with pytest.raises(PermanentImagingError, match=r"^image too large$"):
            await transcoder.run(big, "image/png")
        assert await gone(pid), "the worker that ran out of memory is still running"
        await transcoder.prewarm()
        (replacement,) = worker_pids() - before
        assert 150 * 1024**2 < budget_of(replacement) <= 200 * 1024**2
        result = await transcoder.run(JOLLA, "image/jpeg")
        assert (result.width, result.height) == (3264, 2448)
    # The same picture under the default limit: the limit, not the picture, refused it.
    async with Transcoder(workers=1) as transcoder:
        await transcoder.prewarm()
        (pid,) = worker_pids() - before
        assert Limits().process_memory_bytes - 50 * 1024**2 < budget_of(pid) <= Limits().process_memory_bytes
        result = await transcoder.run(big, "image/png")
        assert (result.width, result.height) == (10_000, 8_000)


async def test_a_crashed_worker_fails_its_job_as_retryable_and_is_replaced() -> None:
    before = worker_pids()
    async with Transcoder(workers=1) as transcoder:
        await transcoder.run(PNG, "image/png")
        (pid,) = worker_pids() - before
        job = asyncio.create_task(transcoder.run(HEIC, "image/heic"))
        await asyncio.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ImagingError) as caught:
            await job
        assert not isinstance(caught.value, PermanentImagingError)
        assert (await transcoder.run(PNG, "image/png")).width == 128


async def test_a_worker_killed_while_idle_costs_the_next_job_nothing() -> None:
    before = worker_pids()
    async with Transcoder(workers=1) as transcoder:
        await transcoder.run(PNG, "image/png")
        (pid,) = worker_pids() - before
        os.kill(pid, signal.SIGKILL)
        assert await gone(pid)
        result = await transcoder.run(JOLLA, "image/jpeg")
        assert (result.width, result.height) == (3264, 2448)
        (fresh,) = worker_pids() - before
        assert fresh != pid


async def test_event_loop_keeps_running_while_a_job_decodes() -> None:
    gaps = []

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with Transcoder(workers=1) as transcoder:
        await transcoder.run(PNG, "image/png")
        beating = asyncio.create_task(heartbeat())
        await transcoder.run(HEIC, "image/heic")
        beating.cancel()
    assert len(gaps) > 10
    assert max(gaps) < 0.2


async def test_cancelled_job_does_not_leave_its_worker_busy() -> None:
    before = worker_pids()
    async with Transcoder(workers=1) as transcoder:
        await transcoder.run(PNG, "image/png")
        (pid,) = worker_pids() - before
        job = asyncio.create_task(transcoder.run(HEIC, "image/heic"))
        await asyncio.sleep(0.1)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert await gone(pid)
        started = time.monotonic()
        assert (await transcoder.run(PNG, "image/png")).width == 128
        assert time.monotonic() - started < 5


async def test_closed_transcoder_refuses_jobs_and_leaves_no_process() -> None:
    before = worker_pids()
    transcoder = Transcoder(workers=2)
    await asyncio.gather(transcoder.run(PNG, "image/png"), transcoder.run(PNG, "image/png"))
    assert len(worker_pids() - before) == 2
    await transcoder.close()
    with pytest.raises(ImagingError):
        await transcoder.run(PNG, "image/png")
    deadline = time.monotonic() + 5
    while worker_pids() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not worker_pids() - before


async def test_prewarm_starts_every_worker_before_the_first_job() -> None:
    before = worker_pids()
    async with Transcoder(workers=2) as transcoder:
        await transcoder.prewarm()
        warm = worker_pids() - before
        assert len(warm) == 2
        await transcoder.prewarm()
        assert worker_pids() - before == warm, "a second prewarm starts nothing more"
        results = await asyncio.gather(*(transcoder.run(JOLLA, "image/jpeg") for _ in range(2)))
        assert [len(r.variants) for r in results] == [3, 3]
        assert worker_pids() - before == warm, "the jobs ran in the prewarmed processes"
    for pid in warm:
        assert await gone(pid)
