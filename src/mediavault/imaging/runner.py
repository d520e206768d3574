"""Pixel work off the event loop: one process per core, a wall-clock limit per job."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import resource
import signal
import sys
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TypeVar

from mediavault.imaging.errors import IMAGE_TOO_LARGE, TIMED_OUT, ImagingError, PermanentImagingError
from mediavault.imaging.pipeline import made_on_request, transcode, transcode_poster
from mediavault.imaging.spec import DEFAULT_LIMITS, DEFAULT_VARIANTS, Limits, VariantSet
from mediavault.imaging.tuning import tune_worker_process
from mediavault.imaging.variants import TranscodeResult, Variant

T = TypeVar("T")

# Spawned, not forked: the parent runs grpc and asyncio threads that a fork would copy half-way.
_CONTEXT = multiprocessing.get_context("spawn")
# Starting a worker (interpreter, PIL, PyAV) takes about a second; it does not depend
# on the input, so it is bounded apart from the job's own limit.
_START_TIMEOUT_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1


def _start_worker(parent_pid: int, memory_bytes: int) -> None:
    _die_with_parent(parent_pid)
    # A Ctrl-C in a terminal signals the whole process group: the parent stops the pool itself
    # when it shuts down, instead of its jobs failing and its processes dying with tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_bytes:
        _limit_private_memory(memory_bytes)
    tune_worker_process()


def _limit_private_memory(budget: int) -> None:
    # RLIMIT_DATA, not RLIMIT_AS: it counts what the process can write (heap, anonymous maps,
    # thread stacks), not the libraries' code. It counts what is mapped already too, which some
    # runtimes make large before the first job (AddressSanitizer's shadow memory: terabytes,
    # reserved and never touched), so the budget comes on top of what the process holds now.
    limit = _private_bytes() + budget
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _private_bytes() -> int:
    """The process's private writable memory as RLIMIT_DATA counts it (VmData)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmData in /proc/self/status")


def _die_with_parent(parent_pid: int) -> None:
    # A SIGKILLed worker cannot shut its pool down, and the pool process would wait on
    # its call queue forever (it holds that pipe's write end too): have the kernel kill
    # it with its parent. The executor starts it from the event loop's thread, which
    # lives as long as the parent, as the parent-death signal requires.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def _ready() -> int:
    # By now the initializer has imported the pipeline (PIL, pillow-heif, PyAV) and
    # tuned the process, so a job's time limit never pays for interpreter start-up.
    return os.getpid()


class _Worker:
    """A single-process executor, so that one stuck job can be killed without touching the others."""

    def __init__(self, memory_bytes: int) -> None:
        self.executor = ProcessPoolExecutor(
            max_workers=1, mp_context=_CONTEXT, initializer=_start_worker, initargs=(os.getpid(), memory_bytes)
        )
        self.pid = 0

    async def start(self) -> None:
        future = self.executor.submit(_ready)
        try:
            self.pid = await asyncio.wait_for(asyncio.wrap_future(future), _START_TIMEOUT_SECONDS)
        except (TimeoutError, BrokenProcessPool):
            raise ImagingError("processing failed") from None

    def alive(self) -> bool:
        # Asks the process table rather than the executor, which learns of its process's
        # death only when its manager thread next runs.
        return any(child.pid == self.pid for child in multiprocessing.active_children())

    def kill(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.executor.shutdown(wait=False, cancel_futures=True)


def pool_size(workers: int | None) -> int:
    """The transcoding processes a Transcoder given workers runs: one per core unless said."""
    return workers or os.cpu_count() or 1


class Transcoder:
    """Runs `transcode` (and a video's `transcode_poster`) in a pool of worker processes, sized to
    the cores by default. A video goes to the pool as the path of its file, never as bytes: the
    poster needs only the file's first frames, and bytes would be copied whole into both processes.

    A job past `limits.job_timeout_seconds` has its process killed and replaced, and
    fails with PermanentImagingError("processing timed out"): the same bytes would
    stall again. One that needs more than `limits.process_memory_bytes` fails with
    PermanentImagingError("image too large") and its process is replaced too (its heap
    may be left as large as the limit). A worker that dies on its own during a job (a crash in a native decoder,
    the OOM killer) fails that job with a plain ImagingError, which the caller may retry;
    one found dead when a job is handed over is replaced, and the job runs in the new one.
    `jpeg_planes` off makes every JPEG go through Pillow, `lossless_display` off re-encodes
    every display (see strategies.choose).
    """

    def __init__(
        self,
        workers: int | None = None,
        variants: VariantSet = DEFAULT_VARIANTS,
        limits: Limits = DEFAULT_LIMITS,
        jpeg_planes: bool = True,
        lossless_display: bool = True,
    ) -> None:
        self.size = pool_size(workers)
        self.variants = variants
        self.limits = limits
        self.jpeg_planes = jpeg_planes
        self.lossless_display = lossless_display
        self._slots = asyncio.Semaphore(self.size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    async def __aenter__(self) -> Transcoder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def prewarm(self) -> None:
        """Starts every worker process now, so that the first jobs do not wait about a
        second each for an interpreter; best effort, a worker that fails to start is
        started again by the job that needs it."""
        missing = self.size - len(self._idle) - len(self._busy)
        workers = [_Worker(self.limits.process_memory_bytes) for _ in range(max(0, missing))]
        started = await asyncio.gather(*(worker.start() for worker in workers), return_exceptions=True)
        for worker, outcome in zip(workers, started, strict=True):
            if isinstance(outcome, BaseException) or self._closed:
                worker.kill()
            else:
                self._idle.append(worker)

    async def run(self, data: bytes, content_type: str) -> TranscodeResult:
        """`transcode` with this pool's variants, limits and strategies."""
        return await self._in_worker(
            transcode, data, content_type, self.variants, self.limits, self.jpeg_planes, self.lossless_display
        )

    async def run_poster(self, path: Path, content_type: str, picture_start_seconds: float = 0.0) -> TranscodeResult:
        """`transcode_poster` of the video file at path (on this host) with this pool's variants and limits."""
        return await self._in_worker(
            transcode_poster, path, content_type, self.variants, self.limits, picture_start_seconds
        )

    async def made_on_request(
        self,
        path: Path,
        content_type: str,
        requested: Mapping[str, Collection[str]],
        primary_bytes: Mapping[str, int],
        poster_seconds: float | None = None,
    ) -> list[Variant]:
        """`pipeline.made_on_request` of the file at path (on this host) with this pool's variants and limits."""
        return await self._in_worker(
            made_on_request, path, content_type, requested, primary_bytes, self.variants, self.limits, poster_seconds
        )

    async def _in_worker(self, job: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise ImagingError("transcoder is closed")
        async with self._slots:
            worker, future = await self._hand_over(job, args)
            healthy = False
            try:
                result = await asyncio.wait_for(asyncio.wrap_future(future), self.limits.job_timeout_seconds)
                healthy = True
                return result
            except PermanentImagingError:
                healthy = True
                raise
            except TimeoutError:
                raise PermanentImagingError(TIMED_OUT) from None
            except MemoryError:
                raise PermanentImagingError(IMAGE_TOO_LARGE) from None
            except BrokenProcessPool:
                raise ImagingError("processing failed") from None
            finally:
                self._release(worker, healthy)

    async def close(self) -> None:
        self._closed = True
        for worker in self._busy:
            worker.kill()
        idle, self._idle = self._idle, []
        for worker in idle:
            await asyncio.to_thread(worker.executor.shutdown, wait=True, cancel_futures=True)

    async def _hand_over(self, job: Callable[..., T], args: tuple[object, ...]) -> tuple[_Worker, Future[T]]:
        """The job submitted to an idle worker, or to a new one when none is idle, and that worker.

        An idle process can die unseen: kill -9, or the OOM killer, which picks the one still
        holding its last big decode's memory. The job never reached it, so it goes to the next
        worker instead of failing as if its input had crashed the process.
        """
        while self._idle:
            worker = self._idle.pop()
            # A refused submit is the same death, seen first by the executor's manager thread
            # (which may reap the process just as alive() asks, and leave it none the wiser).
            with contextlib.suppress(BrokenProcessPool):
                if worker.alive():
                    future = worker.executor.submit(job, *args)
                    self._busy.add(worker)
                    return worker, future
            worker.kill()
        worker = _Worker(self.limits.process_memory_bytes)
        try:
            await worker.start()
            future = worker.executor.submit(job, *args)
        except BrokenProcessPool:
            worker.kill()
            raise ImagingError("processing failed") from None
        except BaseException:
            worker.kill()
            raise
        self._busy.add(worker)
        return worker, future

    def _release(self, worker: _Worker, healthy: bool) -> None:
        self._busy.discard(worker)
        if healthy and not self._closed:
            self._idle.append(worker)
        else:
            # Timed out, cancelled or crashed: the process may still be chewing on the
            # job, so it goes, and the next job starts a fresh one.
            worker.kill()
