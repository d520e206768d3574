"""The arq worker, riding out a Redis failover instead of exiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, cast

import arq
import redis
from redis.exceptions import RedisError

from mediavault import metrics
from mediavault.config import Settings
from workers.maintenance import queue_label
from workers.settings import cron_worker_settings, video_worker_settings, worker_settings

log = logging.getLogger(__name__)

_FIRST_DELAY_SECONDS = 0.1
_MAX_DELAY_SECONDS = 5.0

HEALTH_CHECK_INTERVAL_SECONDS = 30
CANCELLED_JOBS_SECONDS = 2.0


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
        self._queue_label = queue_label(self.ctx)
        metrics.WORKER_JOB_SLOTS_MAX.labels(self._queue_label).set(self.max_jobs)

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            await self._ride_out(exc)
            return
        finally:
            # After the poll has started what it could: a worker with every slot busy and jobs
            # waiting shows full at every poll, one whose jobs drain shows the slots they free.
            metrics.WORKER_JOB_SLOTS_IN_USE.labels(self._queue_label).set(self.job_counter)
        # Every poll, not only after an outage: the gauge starts at 0.
        metrics.WORKER_REDIS_UP.set(1)
        if self._outage_since is not None:
            log.warning("redis reachable again", extra={"outage_seconds": round(time.monotonic() - self._outage_since, 1)})
            self._outage_since = None
            self._retry_delay = _FIRST_DELAY_SECONDS

    async def close(self) -> None:
        """arq's close, made to finish whatever it meets.

        arq's own raises, before its on_shutdown, the CancelledError of a job task cancelled
        outside its job function (while it starts, or records its result) and the error of
        deleting the health record from a Redis that is down: the worker's pools, transcoder and
        spans would stay open, and the process exit with an error.

        A job cancelled during a statement ends only once asyncpg has the connection back, which
        it gets when the statement ends: never on a PostgreSQL that stopped answering, nor behind
        PgBouncer 1.18 while the statement waits for a server connection (its cancel is ignored).
        Jobs still running after CANCELLED_JOBS_SECONDS have their database connections cut, and
        so end, and arq queues them again, as it does every job cancelled here.
        """
        self.handle_sig(signal.SIGUSR1)
        running = list(self.tasks.values())
        if running:
            _, stuck = await asyncio.wait(running, timeout=CANCELLED_JOBS_SECONDS)
            if stuck and "pool" in self.ctx:
                self.ctx["pool"].terminate()
            await asyncio.gather(*running, return_exceptions=True)
        self.tasks.clear()
        if self._pool is None:
            return
        try:
            await self._pool.delete(self.health_check_key)
        except (RedisError, OSError):
            log.warning("health record not deleted, redis unreachable: it expires by itself", extra={"queue": self.queue_name})
        try:
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self._pool.aclose()
            self._pool = None

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


def health_check_key(queue_name: str, pid: int | None = None) -> str:
    """The key under which the worker process pid (this one by default) on this host records
    its health on queue_name, every HEALTH_CHECK_INTERVAL_SECONDS, kept one second longer.

    Not arq's default, one key per queue: every replica wrote that one only hourly, so a hung
    worker looked healthy for an hour, and any replica's close deleted it for all of them.
    """
    return f"{queue_name}:health-check:{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def _queue_options(settings: Settings) -> list[dict[str, Any]]:
    options = [worker_settings(settings), video_worker_settings(settings), cron_worker_settings(settings)]
    return [kwargs for kwargs in options if kwargs is not None]


def queue_workers(settings: Settings) -> list[Worker]:
    """The workers of one `mediavault worker` process: the photo queue's first, then the video
    queue's and the cron queue's (none when every cleanup job is disabled)."""
    return [
        Worker(
            **kwargs,
            handle_signals=False,
            health_check_key=health_check_key(kwargs["queue_name"]),
            health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
        )
        for kwargs in _queue_options(settings)
    ]


def check_health(settings: Settings) -> int:
    """The compose health check: 0 when a process on this host (in a container, the container's
    processes) has recorded its health on every queue a `mediavault worker` with these settings
    serves, within the last HEALTH_CHECK_INTERVAL_SECONDS + 1; else 1."""
    queues = [kwargs["queue_name"] for kwargs in _queue_options(settings)]
    pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    client = redis.Redis.from_url(settings.redis_url)
    try:
        # redis-py types its sync and asyncio clients' commands alike.
        records = cast(list[bytes | None], client.mget([health_check_key(queue, pid) for pid in pids for queue in queues]))
    finally:
        client.close()
    if any(all(records[i : i + len(queues)]) for i in range(0, len(records), len(queues))):
        return 0
    print(f"no worker process on {socket.gethostname()} has recorded its health on {', '.join(queues)}", file=sys.stderr)
    return 1


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
