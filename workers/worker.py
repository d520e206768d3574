"""The arq worker, riding out a Redis failover instead of exiting."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import arq
from redis.exceptions import RedisError

from mediavault import metrics
from mediavault.config import Settings
from workers.settings import cron_worker_settings, video_worker_settings, worker_settings

log = logging.getLogger(__name__)

_FIRST_DELAY_SECONDS = 0.1
_MAX_DELAY_SECONDS = 5.0


class Worker(arq.Worker):
    """arq's worker, whose poll loop survives Redis going away for up to redis_outage_seconds.

    arq's own loop lets the first Redis error end the process. Here a failed poll is
    retried with backoff (redis-py reconnects on the next command) and the worker goes
    on with the queue once Redis answers; only an outage longer than the tolerance ends
    it, as before, for the supervisor to restart. Jobs that were running finish on their
    own; one whose result could not be written is run again after its timeout, which
    every job here tolerates (they are idempotent).
    """

    def __init__(self, *args: Any, redis_outage_seconds: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.redis_outage_seconds = redis_outage_seconds
        self._outage_since: float | None = None
        self._retry_delay = _FIRST_DELAY_SECONDS

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            await self._ride_out(exc)
            return
        # Every poll, not only after an outage: the gauge starts at 0.
        metrics.WORKER_REDIS_UP.set(1)
        if self._outage_since is not None:
            log.warning("redis reachable again", extra={"outage_seconds": round(time.monotonic() - self._outage_since, 1)})
            self._outage_since = None
            self._retry_delay = _FIRST_DELAY_SECONDS

    async def close(self) -> None:
        """arq's close, once the job tasks have ended whichever way.

        arq's own close gathers them and raises the CancelledError of one cancelled outside its
        job function (while it starts, or records its result) before its on_shutdown: the
        worker's pools, transcoder and spans would stay open, and the process exit with an error.
        """
        self.handle_sig(signal.SIGUSR1)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        await super().close()

    async def _ride_out(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            metrics.WORKER_REDIS_UP.set(0)
            log.warning("redis unreachable; the worker waits for it", extra={"tolerance_seconds": self.redis_outage_seconds})
        if now - self._outage_since > self.redis_outage_seconds:
            raise exc
        await asyncio.sleep(self._retry_delay)
        self._retry_delay = min(self._retry_delay * 2, _MAX_DELAY_SECONDS)


def queue_workers(settings: Settings) -> list[Worker]:
    """The workers of one `mediavault worker` process: the photo queue's first, then the video
    queue's and the cron queue's (none when every cleanup job is disabled)."""
    options = [worker_settings(settings), video_worker_settings(settings), cron_worker_settings(settings)]
    return [Worker(**kwargs, handle_signals=False) for kwargs in options if kwargs is not None]


async def run_workers(settings: Settings) -> None:
    """The photo, video and cron queues' workers, in one process until SIGTERM or SIGINT: each
    stops taking jobs, cancels its running ones (their runs are retried, as arq does on a
    signal) and closes."""
    workers = queue_workers(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runs = [asyncio.create_task(worker.async_run()) for worker in workers]
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*runs, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        # Each closes whatever another's close meets.
        closed = await asyncio.gather(*(worker.close() for worker in workers), return_exceptions=True)
        for run in runs:
            run.cancel()
        results = await asyncio.gather(*runs, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    for result in (*closed, *results):
        if isinstance(result, Exception):
            raise result
