"""The arq worker, riding out a Redis failover instead of exiting."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import arq
from redis.exceptions import RedisError

from mediavault import metrics

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
        if self._outage_since is not None:
            log.warning("redis reachable again", extra={"outage_seconds": round(time.monotonic() - self._outage_since, 1)})
            metrics.WORKER_REDIS_UP.set(1)
            self._outage_since = None
            self._retry_delay = _FIRST_DELAY_SECONDS

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
